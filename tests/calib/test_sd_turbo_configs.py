"""The SD-Turbo path without its weights: a diffusers text-to-image pipeline built from SD-Turbo's own component
configs (random weights, widths shrunk), saved in the diffusers layout, loaded by vitqc, and compared with
diffusers' own ``encode_prompt`` and one-step pipeline call from the same latents.

The config values are stabilityai/sd-turbo's published ones (scheduler/scheduler_config.json,
unet/config.json, vae/config.json, text_encoder/config.json); only the widths and depths marked "shrunk"
differ, so that the test runs on a CPU in seconds. The tokenizer is CLIP's real BPE vocabulary when
../shared/tools/make_clip_tokenizer.py and its open_clip wheel are at hand, else the tests' small CLIP BPE
tokenizer (tests/calib/tiny_diffusion.py) with SD-Turbo's pad token and length.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARED_TOOL = Path(__file__).resolve().parents[3] / "shared" / "tools" / "make_clip_tokenizer.py"

# stabilityai/sd-turbo scheduler/scheduler_config.json
SCHEDULER = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "trailing", "timestep_type": "discrete", "trained_betas": None, "use_karras_sigmas": False,
}
# unet/config.json (SD 2.1's UNet): block_out_channels (320, 640, 1280, 1280), attention_head_dim (5, 10, 20, 20)
# and cross_attention_dim 1024 shrunk (widths / 10 rounded to GroupNorm's 32 groups, head size 32)
UNET = {
    "act_fn": "silu", "attention_head_dim": (1, 2, 4, 4), "block_out_channels": (32, 64, 128, 128),
    "center_input_sample": False, "cross_attention_dim": 64,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "upcast_attention": None, "use_linear_projection": True,
}
# vae/config.json: block_out_channels (128, 256, 512, 512) shrunk
VAE = {
    "act_fn": "silu", "block_out_channels": (32, 32, 64, 64), "down_block_types": ("DownEncoderBlock2D",) * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 768, "scaling_factor": 0.18215, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
# text_encoder/config.json (OpenCLIP ViT-H/14's text tower): hidden_size 1024, intermediate_size 4096,
# 23 layers, 16 heads shrunk
TEXT = {
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu",
    "hidden_size": 64, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 256,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 4, "num_hidden_layers": 2,
    "pad_token_id": 1, "projection_dim": 64,
}
RESOLUTION = 64  # pixels (8 x 8 latents): any multiple of the VAE's 8 goes through the same code


def _tokenizer(folder: Path):
    """CLIP's BPE tokenizer (the real one if it can be built here), with SD-Turbo's pad token and length."""
    from transformers import CLIPTokenizer

    real = SHARED_TOOL.exists() and subprocess.run(
        [sys.executable, "-c", "import open_clip"], capture_output=True).returncode == 0
    if real:
        subprocess.run([sys.executable, str(SHARED_TOOL), str(folder)], check=True, capture_output=True)
    else:
        from tests.calib.tiny_diffusion import write_tokenizer

        write_tokenizer(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!",
                              model_max_length=77)
    return tokenizer, real


@pytest.fixture(scope="module")
def sd_turbo_like(tmp_path_factory):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd_turbo_like")
    tokenizer, real = _tokenizer(root / "tokenizer_files")
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT))
    # from_config, as diffusers reads the published JSON files (keys a class does not take are ignored there too)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(VAE), text_encoder=text, tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_config(UNET), scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "sd")
    return pipe, root / "sd", real


def test_prompt_embeddings_equal_diffusers_encode_prompt(sd_turbo_like):
    from vitqc.calib.diffusion import load_diffusion

    pipe, folder, _ = sd_turbo_like
    sampler = load_diffusion(str(folder), device="cpu", resolution=RESOLUTION)
    assert sampler.max_length == 77 and sampler.embed_dim == TEXT["hidden_size"]
    prompts = ["a photo of a tench", "a blurry photo of an old great white shark", ""]
    ours = sampler.encode_prompts(prompts)
    theirs, negative = pipe.encode_prompt(prompts, torch.device("cpu"), 1, False)
    assert negative is None and ours.shape == theirs.shape == (3, 77, TEXT["hidden_size"])
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_one_step_images_equal_diffusers_pipeline_output(sd_turbo_like):
    from vitqc.calib.diffusion import load_diffusion

    pipe, folder, _ = sd_turbo_like
    sampler = load_diffusion(str(folder), device="cpu", resolution=RESOLUTION)
    assert sampler.timestep == 999 and sampler.prediction_type == "epsilon"
    prompts = ["a photo of a cat", "a bright photo of a small ship"]
    noise = sampler.noise([11, 12])  # unit latents: the pipeline scales them by init_noise_sigma as we do
    with torch.no_grad():
        ours = sampler(sampler.encode_prompts(prompts), noise)
        theirs = pipe(prompts, num_inference_steps=1, guidance_scale=0.0, latents=noise.clone(), height=RESOLUTION,
                      width=RESOLUTION, output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, RESOLUTION, RESOLUTION)
    assert theirs.std() > 0.01  # a real image, not a constant the comparison would pass trivially
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_the_scheduler_config_is_sd_turbos_one_trailing_step(sd_turbo_like):
    pipe, _, _ = sd_turbo_like
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]
    assert pipe.scheduler.init_noise_sigma == pytest.approx(float(pipe.scheduler.sigmas.max()))
