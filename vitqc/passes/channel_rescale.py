"""channel_rescale: learnable per-channel factors wherever an exact fold exists.

Two kinds of fold, each a producer that divides channel j by s_j and consumers that multiply the
matching weight input column by s_j (the product is the identity while weights are FP):

* LayerNorm -> the linear layer(s) it feeds (qkv; fc1), also through ops that only move tokens around
  (Swin's window partition, shifts and padding); the factors end up in the LayerNorm affine;
* the value rows of a fused ``qkv`` projection -> the ``proj`` after attention (softmax(QK^T) mixes tokens,
  not channels, and the head split keeps channel order), likewise ``in_proj`` -> ``out_proj``.

Candidates are found structurally and each is *verified* numerically with random factors before it is
kept, so a graph whose ops mix channels somewhere is left alone rather than silently changed. Factors
start from activation statistics (SmoothQuant: s_j = max|x_j|^alpha / max|w_j|^(1-alpha)), which moves
activation outliers into the weights, and stay learnable (log-parametrised) for joint_optimize.
``materialize`` folds them into LayerNorm affines and integer weights.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from vitqc.graph import reads_shape_only, replace_submodule
from vitqc.passes.base import CompileContext, PassResult, VitqcPass, applied, graph_property, register_pass
from vitqc.passes.insert_quantizers import bypassed, quantizers
from vitqc.quant.modules import ChannelFactors, QuantLinear, RescaledLayerNorm

# ops that move tokens but never mix or reorder the last (channel) dimension
_TOKEN_MOVING_METHODS = {"view", "reshape", "permute", "contiguous", "roll", "transpose", "flatten"}
_TOKEN_MOVING_FUNCTIONS = {torch.roll, F.pad, operator.getitem, torch.reshape, torch.flatten, torch.permute}


@graph_property("rescaled")
def is_rescaled(gm: fx.GraphModule) -> bool:
    """channel_rescale has run: factors are attached wherever an exact fold was found (maybe nowhere)."""
    return applied(gm, "channel_rescale") or any(
        isinstance(m, RescaledLayerNorm) or (isinstance(m, QuantLinear) and m.output_factors is not None)
        for m in gm.modules())


@dataclass
class ChannelRescaleOptions:
    alpha: float = 0.5  # migration strength: 0 keeps activations as they are, 1 moves all range into weights
    layernorm: bool = True
    attention_values: bool = True
    calib_images: int = 64
    tolerance: float = 1e-4  # relative max error accepted when verifying a fold with random factors
    limits: ClassVar[dict[str, str]] = {"alpha": "0 to 1", "calib_images": ">= 1", "tolerance": "> 0"}


@dataclass
class _Fold:
    kind: str
    producer: str  # module path of the LayerNorm, or of the qkv linear
    consumers: list[str]
    channels: int
    output_slice: tuple[int, int] = (0, 0)


@register_pass
class ChannelRescale(VitqcPass):
    name = "channel_rescale"
    summary = "learnable per-channel factors folded between LayerNorm->linear and v->proj (exact while FP)"
    Options = ChannelRescaleOptions
    requires = ("quantized",)
    ensures = ("rescaled",)

    def call(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        o = self.options
        candidates = (self._layernorm_folds(gm) if o.layernorm else []) + \
                     (self._value_folds(gm) if o.attention_values else [])
        images = ctx.calib_images()[: o.calib_images].to(ctx.device)
        # verification and statistics are about the FP function
        with bypassed(quantizers(gm).values()), torch.no_grad():
            input_amax = _input_channel_amax(gm, images)
            probe = images[:2]
            reference = gm(probe)
            kept, rejected = [], []
            gen = torch.Generator().manual_seed(ctx.seed)
            for fold in candidates:
                random = torch.exp(torch.empty(fold.channels).uniform_(-0.7, 0.7, generator=gen)).to(images.device)
                undo = _apply(gm, fold, random)
                try:
                    err = float((gm(probe) - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
                except RuntimeError:  # e.g. a pad or slice of the channel dimension: not a fold
                    err = float("inf")
                undo()
                if err <= o.tolerance:
                    kept.append(fold)
                else:
                    rejected.append({"producer": fold.producer, "consumers": fold.consumers, "error": err})
            for fold in kept:
                _apply(gm, fold, self._smoothquant(gm, fold, input_amax))
        gm.recompile()
        ctx.record[self.name] = {"folds": [vars(f) for f in kept], "rejected": rejected}
        return PassResult(gm, bool(kept))

    # ------------------------------------------------------------------------------------ candidates
    def _layernorm_folds(self, gm: fx.GraphModule) -> list[_Fold]:
        folds = []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            norm = gm.get_submodule(node.target)
            if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
                continue
            consumers = _linear_consumers(gm, node)
            channels = norm.normalized_shape[0]
            if consumers and all(gm.get_submodule(c).in_features == channels for c in consumers):
                folds.append(_Fold("layernorm", str(node.target), consumers, channels))
        return folds

    def _value_folds(self, gm: fx.GraphModule) -> list[_Fold]:
        folds = []
        modules = dict(gm.named_modules())
        for path, module in modules.items():
            for fused, out in (("qkv", "proj"), ("in_proj", "out_proj")):
                if not path.endswith("." + fused) and path != fused:
                    continue
                owner = path[: -len(fused)]
                proj = modules.get(owner + out)
                if isinstance(module, QuantLinear) and isinstance(proj, QuantLinear) \
                        and module.out_features == 3 * proj.in_features and module.output_factors is None:
                    c = proj.in_features
                    folds.append(_Fold("attention_values", path, [owner + out], c, (2 * c, 3 * c)))
        return folds

    def _smoothquant(self, gm: fx.GraphModule, fold: _Fold, input_amax: dict[str, torch.Tensor]) -> torch.Tensor:
        alpha = self.options.alpha
        x_max = torch.stack([input_amax[c] for c in fold.consumers]).amax(0)
        w_max = torch.stack([gm.get_submodule(c).effective_weight().abs().amax(0) for c in fold.consumers]).amax(0)
        s = x_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
        return s.clamp(1e-4, 1e4)


def _linear_consumers(gm: fx.GraphModule, start: fx.Node) -> list[str]:
    """QuantLinear modules reached from ``start`` through token-moving ops only; [] if anything else uses it."""
    found, frontier, seen = [], [start], set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if reads_shape_only(user):
                continue
            if user.op == "call_module" and isinstance(gm.get_submodule(user.target), QuantLinear):
                if user.args[0] is not node:
                    return []
                found.append(str(user.target))
            elif (user.op == "call_method" and user.target in _TOKEN_MOVING_METHODS) or \
                    (user.op == "call_function" and user.target in _TOKEN_MOVING_FUNCTIONS):
                frontier.append(user)
            else:
                return []
    return sorted(set(found))


def _apply(gm: fx.GraphModule, fold: _Fold, factors: torch.Tensor):
    """Attach shared factors to the producer and consumers; returns a function that undoes it."""
    shared = ChannelFactors(factors)
    consumers = [gm.get_submodule(c) for c in fold.consumers]
    for c in consumers:
        c.input_factors = shared
    if fold.kind == "layernorm":
        norm = gm.get_submodule(fold.producer)
        replace_submodule(gm, fold.producer, RescaledLayerNorm(norm, shared))
    else:
        qkv = gm.get_submodule(fold.producer)
        qkv.output_factors, qkv.output_slice = shared, fold.output_slice

    def undo() -> None:
        for c in consumers:
            c.input_factors = None
        if fold.kind == "layernorm":
            replace_submodule(gm, fold.producer, norm)
        else:
            qkv.output_factors, qkv.output_slice = None, (0, 0)

    return undo


def _input_channel_amax(gm: fx.GraphModule, images: torch.Tensor, batch: int = 16) -> dict[str, torch.Tensor]:
    """max |x_j| over all tokens of the input of every QuantLinear (its own input quantizer disabled)."""
    amax: dict[str, torch.Tensor] = {}
    hooks = []
    for path, module in gm.named_modules():
        if isinstance(module, QuantLinear):
            def hook(mod, args, path=path):
                x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
                amax[path] = x if path not in amax else torch.maximum(amax[path], x)
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        for chunk in images.split(batch):
            gm(chunk)
    finally:
        for h in hooks:
            h.remove()
    return amax
