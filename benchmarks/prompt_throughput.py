"""Throughput of ``learned-prompts``: prompt learning (seconds per class) and generation (images/s).

    python benchmarks/prompt_throughput.py [--arch tiny|sd-turbo] [--device cuda] [--steps 5] [--threads 1]

``--arch tiny`` (CPU): the tests' tiny diffusers pipeline (UNet 32/64 channels, VAE 16/32, 2-layer CLIP text,
16 px); not SD-Turbo numbers. ``--arch sd-turbo`` (a GPU): SD-Turbo's architecture built from its configs
(SD 2.1 UNet and VAE, OpenCLIP ViT-H/14 text encoder, 512 px, bf16) with random weights, because the weights
cannot be downloaded on the machines this ran on. The work per step does not depend on the weights' values,
so the timings are SD-Turbo's; the images are not. The classifier is timm ``vit_small_patch16_224`` (random
weights, one output per class timed: 8). Prompt learning runs ``--steps`` steps (the shipped default is 100: seconds per class
at 100 steps is extrapolated from it, and labelled so) with classes batched ``classes_per_step`` at a time.
Rows go to results/prompt_throughput-<arch>.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from common import ROOT, Timer, machine, write_result

sys.path.insert(0, str(ROOT))

from vitqc.calib.learned_prompts import LearnedPromptOptions  # noqa: E402

SHIPPED_STEPS = LearnedPromptOptions().steps  # what seconds per class is extrapolated to



def tiny_sampler(root: Path, device: str):
    from tests.calib.tiny_diffusion import build_tiny_sd
    from vitqc.calib.diffusion import load_diffusion

    return load_diffusion(str(build_tiny_sd(root)), device=device)


def sd_turbo_sampler(root: Path, device: str):
    """SD-Turbo's architecture with random weights (stabilityai/sd-turbo's unet/vae/text_encoder configs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tests.calib.tiny_diffusion import write_tokenizer
    from vitqc.calib.diffusion import OneStepSampler

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    write_tokenizer(root / "tokenizer")  # a small BPE vocabulary: only the sequence length (77) matters here
    tokenizer = CLIPTokenizer(str(root / "tokenizer" / "vocab.json"), str(root / "tokenizer" / "merges.txt"),
                              pad_token="!", model_max_length=77)
    with torch.device(device):
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=1024)).to(dtype)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True).to(dtype)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215).to(dtype)
    # SD 2.x's scaled-linear betas (SD-Turbo's scheduler), one step at t = 999
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    return OneStepSampler(unet, vae, text, tokenizer, alphas_cumprod, "epsilon", resolution=512,
                          source="SD-Turbo architecture, random weights")


def classifier(arch: str, classes: int):
    from vitqc.data import Preprocess

    if arch == "tiny":
        from tests.conftest import tiny_vit

        return tiny_vit(num_classes=classes), Preprocess(input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)
    import timm

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=classes).eval()
    return model, Preprocess(input_size=(3, 224, 224), mean=(0.5,) * 3, std=(0.5,) * 3)


def measure(arch: str, device: str, steps: int, classes: int = 8, modes: int = 4,
            groupings: tuple[int, ...] = (1, 8), generate: int = 64) -> dict:
    """Seconds per class of prompt learning at each ``classes_per_step``, and generation images/s."""
    from vitqc.calib.learned_prompts import LearnedPromptSource

    names = [f"class {i}" for i in range(classes)]
    model, pre = classifier(arch, classes)
    out: dict = {"arch": arch, "device": device, "steps": steps, "modes": modes, "classes": classes}
    with tempfile.TemporaryDirectory() as tmp:
        sampler = (tiny_sampler if arch == "tiny" else sd_turbo_sampler)(Path(tmp), device)
        out["resolution"], out["dtype"] = sampler.resolution, str(sampler.dtype)
        for per_step in groupings:
            src = LearnedPromptSource(model, pre, names, sampler=sampler, seed=0, device=device, quiet=True,
                                      modes=modes, steps=steps, classes_per_step=per_step)
            src.learn(list(range(min(per_step, classes))), steps=1)  # warm-up (kernels, autotuning)
            src.learn(list(range(classes)))
            s = src.stats["learn_seconds_per_class"]
            out[f"learn_classes_per_step_{per_step}"] = {
                "seconds_per_class": s, "images_per_second": src.stats["learn_images_per_second"],
                f"seconds_per_class_at_{SHIPPED_STEPS}_steps_extrapolated": round(s * SHIPPED_STEPS / steps, 1)}
            print(f"learn, {per_step} classes per step: {s:.2f} s per class at {steps} steps "
                  f"(~{s * SHIPPED_STEPS / steps:.0f} s at {SHIPPED_STEPS}), "
                  f"{src.stats['learn_images_per_second']} images/s", flush=True)
        src.embeddings.update(src.learn(list(range(classes)), steps=1))
        labels, indices = torch.arange(generate) % classes, torch.arange(generate) // classes
        src.generate_batch(labels[:8], indices[:8])  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        with Timer() as t:
            for k in range(0, generate, 16):
                src.generate_batch(labels[k:k + 16], indices[k:k + 16])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        out["generate_images_per_second"] = round(generate / t.seconds, 2)
        print(f"generate: {generate / t.seconds:.2f} images/s (batches of 16)", flush=True)
    if device.startswith("cuda"):
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out["machine"] = machine()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tiny", choices=("tiny", "sd-turbo"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5, help="prompt-learning steps timed per grouping")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args.arch, args.device, args.steps)
    path = write_result(f"prompt_throughput-{args.arch}", result)
    print(result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
