"""``decompose_sdpa``: replace ``F.scaled_dot_product_attention`` with explicit QK^T, softmax and .V nodes.

Canonical attention form (the same one ``decompose_mha`` emits, and what quantization passes match)::

    q_s    = operator.mul(q, scale)                       # call_function; scale a float (or a node, below)
    k_t    = k.transpose(-2, -1)                          # call_method "transpose"
    scores = operator.matmul(q_s, k_t)                    # call_function operator.matmul   <- QK^T
    scores = operator.add(scores, bias)                   # only with a float mask / is_causal / unknown mask
    scores = scores.masked_fill(operator.invert(m), -inf) # only with a mask known to be bool
    attn   = scores.softmax(dim=-1)                       # call_method "softmax", kwargs {"dim": -1}
    out    = operator.matmul(attn, v)                     # call_function operator.matmul   <- attn.V

* ``scale=None`` means ``1/sqrt(q.size(-1))``: a float constant when the head dim is known from
  ``tensor_meta`` (capture with an example input), otherwise computed at run time by
  ``q.size(-1)`` (call_method ``size``) and ``operator.pow(size, -0.5)``.
* A mask whose dtype is not known statically goes through :func:`attention_mask_bias` (bool -> 0/-inf), added.
* ``is_causal`` adds :func:`causal_attention_bias` (0 on/below the diagonal, -inf above; top-left aligned).
* ``enable_gqa`` repeats k and v over the head dim (``repeat_interleave``) to q's number of heads.
* ``dropout_p`` is ignored: the pass is for inference, where attention dropout is off.

New nodes keep the sdpa node's ``vitqc_owner`` / ``nn_module_stack`` (the attention module that called it).
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx

from vitqc.graph import NodeEmitter, finish_graph, static_dtype, static_tensor_meta
from vitqc.errors import VitqcError
from vitqc.passes.base import CompileContext, NoOptions, PassResult, VitqcPass, register_pass
from vitqc.passes.properties import SDPA_TARGETS

SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                                 "enable_gqa": False}


@torch.fx.wrap
def attention_mask_bias(mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """sdpa's mask as an additive bias: bool masks (True = attend) become 0/-inf, float masks are returned."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).masked_fill(~mask, float("-inf"))
    return mask


@torch.fx.wrap
def causal_attention_bias(scores: torch.Tensor) -> torch.Tensor:
    """0 on and below the diagonal, -inf above (sdpa's ``is_causal``: top-left aligned), shape (L, S)."""
    length, source = scores.shape[-2], scores.shape[-1]
    keep = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril(diagonal=0)
    return torch.zeros(length, source, dtype=scores.dtype, device=scores.device).masked_fill(~keep, float("-inf"))


def sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of an sdpa node by name, defaults filled in."""
    if len(node.args) > len(SDPA_PARAMS):
        raise VitqcError(f"node {node.name}: scaled_dot_product_attention called with too many arguments")
    bound = dict(zip(SDPA_PARAMS, node.args))
    for key, value in node.kwargs.items():
        if key not in SDPA_PARAMS:
            raise VitqcError(f"node {node.name}: scaled_dot_product_attention got an unknown argument {key!r}")
        bound[key] = value
    for key, value in SDPA_DEFAULTS.items():
        bound.setdefault(key, value)
    for key in ("is_causal", "enable_gqa"):
        if isinstance(bound[key], fx.Node):
            raise VitqcError(f"node {node.name}: scaled_dot_product_attention's {key} must be a constant")
    return bound


def decompose_one(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    a = sdpa_arguments(node)
    emit = NodeEmitter(gm.graph, node)
    q, k, v = a["query"], a["key"], a["value"]
    if a["enable_gqa"]:
        heads_q = emit.method("size", q, -3)
        heads_k = emit.method("size", k, -3)
        repeat = emit.function(operator.floordiv, heads_q, heads_k)
        k = emit.method("repeat_interleave", k, repeat, dim=-3)
        v = emit.method("repeat_interleave", v, repeat, dim=-3)
    scale = a["scale"]
    if scale is None:
        meta = static_tensor_meta(q)
        if meta is not None and len(meta.shape) > 0:
            scale = 1.0 / math.sqrt(int(meta.shape[-1]))
        else:
            scale = emit.function(operator.pow, emit.method("size", q, -1), -0.5)
    q_scaled = emit.function(operator.mul, q, scale)
    k_t = emit.method("transpose", k, -2, -1)
    scores = emit.function(operator.matmul, q_scaled, k_t)
    if a["is_causal"]:
        scores = emit.function(operator.add, scores, emit.function(causal_attention_bias, scores))
    mask = a["attn_mask"]
    if mask is not None:
        dtype = static_dtype(gm, mask)
        if dtype == torch.bool:
            scores = emit.method("masked_fill", scores, emit.function(operator.invert, mask), float("-inf"))
        elif dtype is not None:
            scores = emit.function(operator.add, scores, mask)
        else:
            scores = emit.function(operator.add, scores, emit.function(attention_mask_bias, mask, scores))
    attn = emit.method("softmax", scores, dim=-1)
    out = emit.function(operator.matmul, attn, v)
    if "tensor_meta" in node.meta:
        out.meta["tensor_meta"] = node.meta["tensor_meta"]
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return out


@register_pass
class DecomposeSdpa(VitqcPass):
    name = "decompose_sdpa"
    summary = "replace F.scaled_dot_product_attention with explicit q@k^T, softmax, @v nodes"
    Options = NoOptions
    requires = ()
    ensures = ("no_fused_attention",)

    def call(self, graph_module: fx.GraphModule, ctx: CompileContext) -> PassResult:
        nodes = [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]
        for node in nodes:
            decompose_one(graph_module, node)
        if nodes:
            finish_graph(graph_module, delete_unused_submodules=False)
        return PassResult(graph_module, bool(nodes))
