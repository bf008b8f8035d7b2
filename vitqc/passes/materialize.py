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

The float ops a quantized network is sensitive to get definitions that fix every bit, so that the program means
the same values on every backend that lowers it (ATen's kernels and XNNPACK's differ in last bits, and
quantization turns those into different codes downstream):

* GELU (erf form) becomes :func:`vitqc.quant.rational_gelu.rational_gelu`, the formula XNNPACK's GELU kernel
  computes (``gelu = "xnnpack"``, the default);
* LayerNorm over the last dim becomes :func:`vitqc.quant.pairwise_layer_norm.pairwise_layer_norm`: sums in a
  fixed pairwise order, a correctly rounded square root (``layer_norm = "pairwise"``, the default).

``"aten"`` keeps ATen's kernel for either (fewer passes when the program runs in PyTorch; an ExecuTorch ``.pte``
then agrees with the program only up to the difference, which its export states).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import fx

from vitqc.graph import is_quantizer_node, owner_of, replace_submodule, unique_path
from vitqc.console import warn
from vitqc.passes.base import CompileContext, PassResult, VitqcPass, graph_property, register_pass
from vitqc.passes.insert_quantizers import is_activation_matmul, quantizers
from vitqc.quant.modules import QUANT_LAYERS, IntConv2d, IntLinear, IntMatmul, freeze_quantizer
from vitqc.quant.pairwise_layer_norm import pairwise_layer_norm
from vitqc.quant.rational_gelu import fma_is_fused, is_erf_gelu, rational_gelu

GELU_FUNCTIONS = (F.gelu, torch._C._nn.gelu, torch.ops.aten.gelu.default)
GELU_MODULES = ("GELU", "GELUActivation")  # torch.nn's and transformers' (which calls F.gelu)


@graph_property("materialized")
def is_materialized(gm: fx.GraphModule) -> bool:
    """No fake-quant layer with FP weights is left; nothing in the graph is learnable."""
    no_fake = not any(isinstance(m, QUANT_LAYERS) for m in gm.modules())
    return no_fake and not any(p.requires_grad for q in quantizers(gm).values() for p in q.parameters())


@dataclass
class MaterializeOptions:
    gelu: Literal["xnnpack", "aten"] = "xnnpack"  # the program's GELU: XNNPACK's rational erf, or ATen's kernel
    layer_norm: Literal["pairwise", "aten"] = "pairwise"  # the program's LayerNorm: fixed-order sums, or ATen's


@register_pass
class Materialize(VitqcPass):
    name = "materialize"
    summary = "replace fake-quant layers by integer weight codes + scales; freeze activation ranges"
    Options = MaterializeOptions
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
        gelus = _rational_gelus(gm) if self.options.gelu == "xnnpack" else 0
        norms = _pairwise_layer_norms(gm) if self.options.layer_norm == "pairwise" else 0
        if gelus and not fma_is_fused("cpu"):
            warn("torch.addcmul rounds twice on this CPU (a torch build without FMA kernels): the program's GELU "
                 "may differ from XNNPACK's in the last bit")
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        ctx.record[self.name] = {"integer_layers": count, "integer_matmuls": matmuls, "folded": len(replacements) - count,
                                 "gelu": self.options.gelu, "rational_gelus": gelus,
                                 "layer_norm": self.options.layer_norm, "pairwise_layer_norms": norms}
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


def _replace_by_call(gm: fx.GraphModule, node: fx.Node, fn, args: tuple) -> None:
    """``node`` (a GELU or LayerNorm) replaced by a call of ``fn(*args)``, keeping the metadata passes read."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(fn, args)
    new.meta.update({k: v for k, v in node.meta.items() if k in ("tensor_meta", "vitqc_owner", "nn_module_stack")})
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _rational_gelus(gm: fx.GraphModule) -> int:
    """Replace every GELU of the erf form (``nn.GELU`` / transformers' ``GELUActivation`` modules, ``F.gelu`` /
    ``aten.gelu`` calls) by :func:`rational_gelu`; the tanh approximation is left as it is."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            hit = type(module).__name__ in GELU_MODULES and is_erf_gelu(module) \
                and getattr(module, "act", F.gelu) is F.gelu and len(node.args) == 1
        else:
            hit = node.op == "call_function" and node.target in GELU_FUNCTIONS and is_erf_gelu(None, node.kwargs) \
                and len(node.args) == 1
        if not hit:
            continue
        _replace_by_call(gm, node, rational_gelu, (node.args[0],))
        count += 1
    return count


def _pairwise_layer_norms(gm: fx.GraphModule) -> int:
    """Replace every ``nn.LayerNorm`` over the last dim (the canonical form's LayerNorm) by
    :func:`pairwise_layer_norm` on the module's own parameters."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        norm = gm.get_submodule(node.target)
        if not isinstance(norm, torch.nn.LayerNorm) or len(norm.normalized_shape) != 1:
            continue
        with gm.graph.inserting_before(node):
            weight = gm.graph.get_attr(f"{node.target}.weight") if norm.weight is not None else None
            bias = gm.graph.get_attr(f"{node.target}.bias") if norm.bias is not None else None
        _replace_by_call(gm, node, pairwise_layer_norm, (node.args[0], weight, bias, float(norm.eps)))
        count += 1
    return count
