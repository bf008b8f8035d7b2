"""A tiny SD-style diffusers pipeline built from config (no downloads): a 2-level UNet2DConditionModel, a
2-level AutoencoderKL, a 2-layer CLIPTextModel, a CLIP BPE tokenizer and SD-Turbo's noise schedule,
saved in the diffusers folder layout so tests go through the same loading code as SD-Turbo.

The tokenizer is a real CLIP byte-level BPE tokenizer (CLIP's byte alphabet, </w> word ends, CLIP's
special tokens) with a handful of merges instead of CLIP's 48,894; the full vocabulary needs the
open_clip_torch wheel (../shared/tools/make_clip_tokenizer.py), which tests must not download.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

MERGES = [("o", "f</w>"), ("p", "h"), ("ph", "o"), ("t", "o</w>"), ("a", "t</w>"), ("c", "at</w>")]


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in MERGES) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 16, "pad_token": "!",
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    return len(vocab)


def build_tiny_sd(root: Path, text_driven: bool = False) -> Path:
    """Write the tiny pipeline under ``root`` (unet/, vae/, text_encoder/, tokenizer/, scheduler/).

    An untrained UNet barely listens to its text: the images it makes move ~40x more with the latent noise
    than with the prompt embeddings, so a prompt-learning loss can hardly fall. ``text_driven=True`` makes
    the stand-in behave more like a trained model in that respect: v-prediction (SD 2.x-v style, so x0 is
    the UNet's output rather than noise minus it), the noise input scaled by 0.1 and the cross-attention
    outputs by 10."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vocab_size = write_tokenizer(root / "tokenizer")
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), latent_channels=4,
        layers_per_block=1, norm_num_groups=16, sample_size=16)
    # SD-Turbo's schedule: SD 2.x betas, one "trailing" step at t = 999, epsilon prediction
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="trailing",
                                       prediction_type="v_prediction" if text_driven else "epsilon")
    if text_driven:
        with torch.no_grad():
            unet.conv_in.weight.mul_(0.1)
            for name, module in unet.named_modules():
                if name.endswith("attn2.to_out.0"):
                    module.weight.mul_(10.0)
    text.save_pretrained(root / "text_encoder")
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    scheduler.save_pretrained(root / "scheduler")
    return root
