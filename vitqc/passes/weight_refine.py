"""weight_refine: a learnable refinement of every quantized weight, trained by joint_optimize.

Choice: an additive offset in units of the quantizer step, w' = w + step * clamp(delta, -1, 1), rather than
learned rounding (AdaRound). Learned rounding chooses between floor(w/s) and ceil(w/s), which is only
well defined while the step s is fixed; here the steps are learned jointly, so the rounding grid moves
under the rounding variables. A bounded offset has the same reach (any weight can move to either
neighbouring level, one more than AdaRound), needs no annealed regulariser or temperature schedule, and
whatever the student used at the last step is exactly what ``materialize`` stores (the codes are computed
from the same refined weight). ``regularization`` (applied by joint_optimize) keeps offsets small.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from vitqc.passes.base import CompileContext, PassResult, VitqcPass, graph_property, register_pass
from vitqc.quant.modules import QUANT_LAYERS


@graph_property("refinable")
def has_refinement(gm: fx.GraphModule) -> bool:
    """Every fake-quant layer carries a weight refinement offset."""
    layers = [m for m in gm.modules() if isinstance(m, QUANT_LAYERS)]
    return bool(layers) and all(m.refinement is not None for m in layers)


@dataclass
class WeightRefineOptions:
    regularization: float = 1e-4  # weight of mean(delta^2) in joint_optimize's loss
    limits: ClassVar[dict[str, str]] = {"regularization": ">= 0"}


@register_pass
class WeightRefine(VitqcPass):
    name = "weight_refine"
    summary = "attach a learnable, step-bounded offset to every quantized weight (trained by joint_optimize)"
    Options = WeightRefineOptions
    requires = ("quantized",)
    ensures = ("refinable",)

    def call(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        count = 0
        for module in gm.modules():
            if isinstance(module, QUANT_LAYERS) and module.refinement is None:
                module.refinement = nn.Parameter(torch.zeros_like(module.weight))
                count += 1
        ctx.record[self.name] = {"refined_layers": count, "regularization": self.options.regularization}
        return PassResult(gm, count > 0)


class RefinementPenalty:
    """joint_optimize's ``weight * penalty``, ``penalty`` = the mean over layers of ``mean(delta^2)``, with its
    gradient ``2 * weight * delta / (layers * numel)`` added to each offset's ``.grad`` by two multi-tensor kernels
    instead of autograd's ~5 kernels per layer forward and backward (~250 per step on ViT-S). The penalty lies
    outside the compiled student, so under torch.compile those launches were a large part of what ran eagerly."""

    def __init__(self, gm: nn.Module, weight: float) -> None:
        self.offsets = [m.refinement for m in gm.modules() if isinstance(m, QUANT_LAYERS) and m.refinement is not None]
        self.weight = float(weight)
        n = len(self.offsets)
        self._grad_scales = [2.0 * self.weight / (n * t.numel()) for t in self.offsets]
        self._numels = torch.tensor([float(t.numel()) for t in self.offsets], device=self.offsets[0].device) if n else None

    def __bool__(self) -> bool:
        return bool(self.offsets) and self.weight > 0

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        """The penalty (unweighted, detached): ``||delta||^2 / numel`` per layer, averaged."""
        return (torch.stack(torch._foreach_norm(self.offsets)).square() / self._numels).mean()

    @torch.no_grad()
    def add_grad(self) -> None:
        """Add the weighted penalty's gradient to the offsets' ``.grad`` (after the loss's backward)."""
        for t in self.offsets:
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        torch._foreach_add_([t.grad for t in self.offsets], torch._foreach_mul(self.offsets, self._grad_scales))
