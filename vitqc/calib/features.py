"""What the calibration sources need from the FP model: logits, a pooled feature, and patch tokens.

timm ViT-style models (``forward_features`` returning [B, N, C] tokens, ``forward_head``,
``num_prefix_tokens``) give all three. Any other module gives its logits; patch tokens then come from a
forward hook on the last element of a ``blocks`` container when it has one (prefix tokens are inferred
from the token count), and the pooled feature falls back to the logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vitqc.data import Preprocess


@dataclass
class ModelOutputs:
    logits: torch.Tensor  # [B, classes]
    pooled: torch.Tensor  # [B, D]: pre-logits feature (the logits when the model exposes none)
    patches: torch.Tensor | None  # [B, P, C] patch tokens without prefix (cls/register) tokens, or None


def normalise(images01: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """[0, 1] pixels -> the model's normalised input (what ``Preprocess.transform`` produces)."""
    mean = torch.tensor(preprocess.mean, dtype=images01.dtype, device=images01.device).view(1, -1, 1, 1)
    std = torch.tensor(preprocess.std, dtype=images01.dtype, device=images01.device).view(1, -1, 1, 1)
    return (images01 - mean) / std


def num_classes(model: nn.Module, preprocess: Preprocess | None = None) -> int:
    """The number of outputs of ``model``: its ``num_classes`` attribute, else one forward on zeros."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    if preprocess is None:
        raise ValueError("cannot tell the number of classes without an input size")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        out = model(torch.zeros(1, *preprocess.input_size, device=device))
    return int(out.shape[-1])


def _is_timm_vit(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("forward_features", "forward_head"))


def _num_patches(model: nn.Module, height: int, width: int) -> int | None:
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    if grid is not None and getattr(pe, "dynamic_img_size", False) is False:
        return int(grid[0]) * int(grid[1])
    patch = getattr(pe, "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        return (height // ph) * (width // pw)
    return None


def forward(model: nn.Module, x: torch.Tensor, want_patches: bool = True) -> ModelOutputs:
    """Run ``model`` on normalised ``x`` and collect logits, pooled features and patch tokens."""
    if _is_timm_vit(model):
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        try:
            pooled = model.forward_head(feats, pre_logits=True)
        except TypeError:
            pooled = logits
        patches = None
        if want_patches and feats.dim() == 3:
            prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
            patches = feats[:, prefix:]
        elif want_patches and feats.dim() == 4:  # NHWC/NCHW token maps (e.g. Swin): flatten the grid
            patches = feats.flatten(1, 2) if feats.shape[-1] != feats.shape[1] else feats.flatten(2).transpose(1, 2)
        return ModelOutputs(logits, pooled, patches)
    captured: list[torch.Tensor] = []
    handle = None
    blocks = getattr(model, "blocks", None)
    if want_patches and isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        handle = blocks[-1].register_forward_hook(lambda _m, _i, out: captured.append(
            out[0] if isinstance(out, (tuple, list)) else out))
    try:
        logits = model(x)
    finally:
        if handle is not None:
            handle.remove()
    patches = None
    if captured and captured[-1].dim() == 3:
        tokens = captured[-1]
        n = _num_patches(model, x.shape[-2], x.shape[-1])
        prefix = tokens.shape[1] - n if n is not None and n <= tokens.shape[1] else 0
        patches = tokens[:, prefix:]
    return ModelOutputs(logits, logits, patches)
