"""``canonicalize``: the first step of every pipeline. Runs ``decompose_sdpa``, ``decompose_mha`` and
``remove_dropout`` in that order, then (option ``normalize_ops``, on by default) rewrites the remaining
attention ops of non-fused models to the same forms those passes emit:

* ``nn.Softmax`` modules, ``F.softmax`` / ``torch.softmax`` calls and ``x.softmax(d)`` -> call_method
  ``softmax`` with args ``(x,)`` and kwargs ``{"dim": d}`` (plus ``dtype`` when one was given);
* ``torch.matmul``, ``torch.bmm`` and ``x.matmul(y)`` -> call_function ``operator.matmul``;
* ``F.layer_norm(x, shape, <path>.weight, <path>.bias, eps)`` (what subclasses of nn.LayerNorm such as timm's
  trace to) -> a call of an ``nn.LayerNorm`` module at ``<path>`` sharing those parameters, so passes that
  rescale or fold norms find them as modules.

After it, attention is ``operator.matmul`` -> call_method ``softmax`` -> ``operator.matmul`` everywhere.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from vitqc.graph import finish_graph
from vitqc.passes.base import CompileContext, PassResult, VitqcPass, register_pass
from vitqc.passes.decompose_mha import DecomposeMha
from vitqc.passes.decompose_sdpa import DecomposeSdpa
from vitqc.passes.properties import MATMUL_FUNCTIONS, SOFTMAX_FUNCTIONS
from vitqc.passes.remove_dropout import RemoveDropout

MATMUL_LIKE = tuple(f for f in MATMUL_FUNCTIONS if f is not operator.matmul)  # rewritten to operator.matmul


def is_softmax(node: fx.Node) -> bool:
    """The canonical softmax form: call_method ``softmax``."""
    return node.op == "call_method" and node.target == "softmax"


def is_matmul(node: fx.Node) -> bool:
    """The canonical matmul form: call_function ``operator.matmul``."""
    return node.op == "call_function" and node.target is operator.matmul


def _softmax_args(node: fx.Node, gm: fx.GraphModule) -> tuple[Any, Any, Any] | None:
    """(input, dim, dtype) of a softmax in any form, or None when it is not one (or has no explicit dim)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.Softmax and len(node.args) == 1 and not node.kwargs and mod.dim is not None:
            return node.args[0], mod.dim, None
        return None
    if node.op == "call_function" and node.target in SOFTMAX_FUNCTIONS or is_softmax(node):
        names = ("input", "dim", "_stacklevel", "dtype") if node.target is F.softmax else ("input", "dim", "dtype")
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)
        if "self" in bound:
            bound["input"] = bound.pop("self")
        if set(bound) - {"input", "dim", "dtype", "_stacklevel"} or bound.get("dim") is None or "input" not in bound:
            return None
        return bound["input"], bound["dim"], bound.get("dtype")
    return None


def _layer_norm_as_module(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """Replace a functional layer_norm over get_attr weight/bias of one module by a call of that module."""
    if node.op != "call_function" or node.target not in (F.layer_norm, torch.layer_norm):
        return None
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    weight, bias, shape = bound.get("weight"), bound.get("bias"), bound.get("normalized_shape")
    if not all(isinstance(n, fx.Node) and n.op == "get_attr" for n in (weight, bias)):
        return None
    path, _, wname = str(weight.target).rpartition(".")
    bpath, _, bname = str(bias.target).rpartition(".")
    if (path, wname, bname) != (bpath, "weight", "bias") or not path:
        return None
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) for d in shape):
        return None
    holder = gm.get_submodule(path)
    if isinstance(holder, nn.LayerNorm):
        norm = holder
    else:
        norm = nn.LayerNorm(tuple(shape), eps=float(bound.get("eps", 1e-5)))
        norm.weight, norm.bias = holder.weight, holder.bias
        parent_path, _, leaf = path.rpartition(".")
        setattr(gm.get_submodule(parent_path) if parent_path else gm, leaf, norm)
    with gm.graph.inserting_before(node):
        return gm.graph.call_module(path, (bound["input"],))


def normalize_ops(gm: fx.GraphModule) -> bool:
    """Rewrite softmax / matmul / layer_norm variants to the canonical forms. True if anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
        new = _layer_norm_as_module(gm, node)
        if new is not None:
            new.meta = dict(node.meta)
            new.meta["vitqc_owner"] = str(new.target).rpartition(".")[0]
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed = True
            continue
        parsed = _softmax_args(node, gm)
        if parsed is not None:
            x, dim, dtype = parsed
            kwargs = {"dim": dim} if dtype is None else {"dim": dim, "dtype": dtype}
            if is_softmax(node) and node.args == (x,) and dict(node.kwargs) == kwargs:
                continue
            with gm.graph.inserting_before(node):
                new = gm.graph.call_method("softmax", (x,), kwargs)
        elif (node.op == "call_function" and node.target in MATMUL_LIKE and len(node.args) == 2
              and not node.kwargs) or (node.op == "call_method" and node.target == "matmul"
                                       and len(node.args) == 2 and not node.kwargs):
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(operator.matmul, tuple(node.args))
        else:
            continue
        new.meta = dict(node.meta)
        if node.op == "call_module":  # the owner of the op is the module that called the Softmax module
            new.meta["vitqc_owner"] = node.meta.get("vitqc_owner", str(node.target).rpartition(".")[0])
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        finish_graph(gm)
    return changed


@register_pass
class Canonicalize(VitqcPass):
    name = "canonicalize"
    summary = "decompose_sdpa + decompose_mha + remove_dropout (+ softmax/matmul forms): the canonical graph"

    @dataclass
    class Options:
        normalize_ops: bool = True  # also rewrite nn.Softmax/F.softmax/torch.matmul/bmm to the canonical forms

    requires = ()
    ensures = ("canonical",)

    def call(self, graph_module: fx.GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        modified = False
        for step in (DecomposeSdpa(), DecomposeMha(), RemoveDropout()):
            result = step(gm, ctx)
            gm = result.graph_module
            modified |= bool(result.modified)
        if self.options.normalize_ops:
            modified |= normalize_ops(gm)
        return PassResult(gm, modified)
