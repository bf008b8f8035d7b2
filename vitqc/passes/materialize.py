"""materialize: turn fake-quantized layers into integer weights + scales/zero-points.

Every module with a ``materialized()`` method is replaced by what it returns: rescaling factors are folded
into LayerNorm affines and weights, and every ``QuantLinear`` / ``QuantConv2d`` becomes an ``IntLinear`` / ``IntConv2d`` whose weight is stored as
integer codes (int8 storage for every width up to 8 bit, ternary included; packing is a backend's job) with
per-channel scales and zero points, and every matmul of two quantized activations (``q @ k^T``, ``attn @ v``)
becomes an ``IntMatmul`` holding its two quantizers. Other activation quantizers stay where they are with
their learned ranges, frozen. The FP weights are gone: the graph now holds exactly what a backend lowers, and it is what the
artifact exports. Integer layers compute in integer arithmetic (:mod:`vitqc.quant.intops`): the same codes
as the fake-quant graph and exact accumulation, so the outputs equal the fake-quant graph's up to float
rounding, and every backend that accumulates exactly reproduces them bit for bit.
"""
from __future__ import annotations

from torch import fx

from vitqc.graph import is_quantizer_node, owner_of, replace_submodule, unique_path
from vitqc.passes.base import CompileContext, NoOptions, PassResult, VitqcPass, graph_property, register_pass
from vitqc.passes.insert_quantizers import is_activation_matmul, quantizers
from vitqc.quant.modules import QUANT_LAYERS, IntConv2d, IntLinear, IntMatmul, freeze_quantizer


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
        matmuls = _integer_matmuls(gm)
        for q in quantizers(gm).values():
            freeze_quantizer(q)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        ctx.record[self.name] = {"integer_layers": count, "integer_matmuls": matmuls, "folded": len(replacements) - count}
        return PassResult(gm, count > 0)


def _integer_matmuls(gm: fx.GraphModule) -> int:
    """Replace every ``matmul(Q_a(a), Q_b(b))`` (both quantizers static per tensor or per token) by
    ``IntMatmul(a, b)``; the quantizer calls die with it unless something else uses their outputs."""
    count = 0
    for node in list(gm.graph.nodes):
        if not is_activation_matmul(node) or node.kwargs or len(node.args) != 2:
            continue
        qa, qb = node.args
        if not all(isinstance(q, fx.Node) and is_quantizer_node(gm, q) for q in (qa, qb)):
            continue
        lhs, rhs = gm.get_submodule(qa.target), gm.get_submodule(qb.target)
        if lhs.granularity not in ("tensor", "token") or rhs.granularity not in ("tensor", "token") \
                or not lhs.enabled or not rhs.enabled:
            continue
        owner = node.meta.get("vitqc_owner", owner_of(node))
        path = unique_path(gm, f"{owner + '.' if owner else ''}{node.name}_int")
        gm.add_submodule(path, IntMatmul(lhs, rhs))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (qa.args[0], qb.args[0]))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "vitqc_owner")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    return count
