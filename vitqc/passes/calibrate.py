"""calibrate: initialise every quantizer's range from calibration batches.

Weight quantizers are set from the weights themselves (``weight_method``). Activation quantizers observe
the FP activations of the calibration images (weights left in FP while observing, so every layer sees
the statistics of the model it approximates) and are then set by ``method``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import fx

from vitqc.passes.base import CompileContext, PassResult, VitqcPass, graph_property, register_pass
from vitqc.passes.insert_quantizers import bypassed, quantizers
from vitqc.console import progress_bar
from vitqc.quant.modules import QUANT_LAYERS


@graph_property("calibrated")
def is_calibrated(gm: fx.GraphModule) -> bool:
    """Every quantizer has a range (none would fail with 'used before calibration')."""
    qs = quantizers(gm)
    return bool(qs) and all(bool(q.initialized) for q in qs.values())


@dataclass
class CalibrateOptions:
    method: Literal["minmax", "percentile", "mse"] = "minmax"
    weight_method: Literal["minmax", "percentile", "mse"] = "minmax"
    percentile: float = 99.99
    batch_size: int = 32
    max_images: int = 0  # 0: every calibration image
    limits: ClassVar[dict[str, str]] = {"percentile": "50 to 100", "batch_size": ">= 1", "max_images": ">= 0"}


@register_pass
class Calibrate(VitqcPass):
    name = "calibrate"
    summary = "set quantizer ranges: weights from themselves, activations from calibration images"
    Options = CalibrateOptions
    requires = ("quantized",)
    ensures = ("calibrated",)

    def call(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        o = self.options
        weight_qs = {id(m.weight_quantizer) for m in gm.modules() if isinstance(m, QUANT_LAYERS)}
        with torch.no_grad():
            for layer in (m for m in gm.modules() if isinstance(m, QUANT_LAYERS)):
                q = layer.weight_quantizer
                q.init_method, q.percentile = o.weight_method, o.percentile
                q.init_from_tensor(layer.effective_weight())  # refinement offsets start at 0
        act_qs = [q for q in quantizers(gm).values() if id(q) not in weight_qs]
        for q in act_qs:
            q.init_method, q.percentile = o.method, o.percentile
        batches = list(ctx.calib_images()[: o.max_images or None].split(o.batch_size))
        images = sum(len(b) for b in batches)
        # weights stay FP while observing, so activations are the FP model's
        with bypassed(q for q in quantizers(gm).values() if id(q) in weight_qs):
            try:
                for q in act_qs:
                    q.observe(True)
                was_training = gm.training
                gm.eval()
                with torch.no_grad(), progress_bar("calibrate", total=images, unit="img", quiet=ctx.quiet) as bar:
                    for batch in batches:
                        gm(batch.to(ctx.device))
                        bar.advance(len(batch))
                gm.train(was_training)
            finally:
                for q in act_qs:
                    q.observe(False)
        for q in act_qs:
            q.init_from_observed()
        ctx.record[self.name] = {"images": images, "method": o.method, "weight_method": o.weight_method,
                                 "activation_quantizers": len(act_qs), "weight_quantizers": len(weight_qs)}
        return PassResult(gm, True)
