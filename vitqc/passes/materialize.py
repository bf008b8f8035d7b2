"""materialize: turn fake-quantized layers into integer weights + scales/zero-points.

Every module with a ``materialized()`` method is replaced by what it returns: rescaling factors are folded
into LayerNorm affines and weights, and every ``QuantLinear`` / ``QuantConv2d`` becomes an ``IntLinear`` / ``IntConv2d`` whose weight is stored as
integer codes (int8 storage for every width up to 8 bit, ternary included; packing is a backend's job) with
per-channel scales and zero points. Activation quantizers stay where they are with their learned ranges,
frozen. The FP weights are gone: the graph now holds exactly what a backend lowers, and it is what the
artifact exports. The outputs do not change (the dequantized codes are bit-identical to the fake-quant
weights).
"""
from __future__ import annotations

from torch import fx

from vitqc.passes.base import CompileContext, NoOptions, PassResult, VitqcPass, graph_property, register_pass
from vitqc.passes.insert_quantizers import quantizers, replace_submodule
from vitqc.quant.modules import QUANT_LAYERS, IntConv2d, IntLinear, freeze_quantizer


@graph_property("materialized")
def is_materialized(gm: fx.GraphModule) -> bool:
    """No fake-quant layer with FP weights is left; nothing in the graph is learnable."""
    no_fake = not any(isinstance(m, QUANT_LAYERS) for m in gm.modules())
    return no_fake and not any(p.requires_grad for q in quantizers(gm).values() for p in q.parameters())


@register_pass
class Materialize(VitqcPass):
    name = "materialize"
    summary = "replace fake-quant layers by integer weight codes + scales; freeze activation ranges"
    Options = NoOptions
    requires = ("calibrated",)
    ensures = ("materialized",)

    def call(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        count = 0
        # Materialize every module first, then swap: factors shared by two modules must be read before
        # either is replaced.
        replacements = [(name, module.materialized()) for name, module in gm.named_modules()
                        if callable(getattr(module, "materialized", None))]
        for name, new in replacements:
            replace_submodule(gm, name, new)
            count += isinstance(new, (IntLinear, IntConv2d))
        for q in quantizers(gm).values():
            freeze_quantizer(q)
        gm.delete_all_unused_submodules()
        gm.recompile()
        ctx.record[self.name] = {"integer_layers": count, "folded": len(replacements) - count}
        return PassResult(gm, count > 0)
