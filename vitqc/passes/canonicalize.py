"""``canonicalize``: the first step of every pipeline. Runs ``decompose_sdpa``, ``decompose_mha`` and
``remove_dropout`` in that order, then (option ``normalize_ops``, on by default) rewrites the remaining
attention ops of non-fused models to the same forms those passes emit:

* ``nn.Softmax`` modules, ``F.softmax`` / ``torch.softmax`` calls and ``x.softmax(d)`` -> call_method
  ``softmax`` with args ``(x,)`` and kwargs ``{"dim": d}`` (plus ``dtype`` when one was given);
* ``torch.matmul``, ``torch.bmm`` and ``x.matmul(y)`` -> call_function ``operator.matmul``.

After it, attention is ``operator.matmul`` -> call_method ``softmax`` -> ``operator.matmul`` everywhere.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from vitqc.capture import finish_graph
from vitqc.passes.base import CompileContext, PassResult, VitqcPass, register_pass
from vitqc.passes.decompose_mha import DecomposeMha
from vitqc.passes.decompose_sdpa import DecomposeSdpa
from vitqc.passes.remove_dropout import RemoveDropout

SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax, torch.Tensor.softmax)
MATMUL_LIKE = (torch.matmul, torch.bmm, torch.Tensor.matmul)


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


def normalize_ops(gm: fx.GraphModule) -> bool:
    """Rewrite softmax / matmul variants to the canonical forms. True if anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
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
