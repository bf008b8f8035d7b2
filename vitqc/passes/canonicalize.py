"""``canonicalize``: the first step of every pipeline. Runs ``decompose_sdpa``, ``decompose_mha``,
``remove_dropout`` and ``lift_modules`` in that order, then (option ``normalize_ops``, on by default) rewrites
the remaining attention ops of non-fused models to the same forms those passes emit:

* ``nn.Softmax`` modules, ``F.softmax`` / ``torch.softmax`` calls and ``x.softmax(d)`` -> call_method
  ``softmax`` with args ``(x,)`` and kwargs ``{"dim": d}`` (plus ``dtype`` when one was given);
* ``torch.matmul``, ``torch.bmm``, ``x.matmul(y)`` and ``x.bmm(y)`` -> call_function ``operator.matmul``;
  ``torch.baddbmm(c, a, b)`` -> ``c + a @ b``;
* ``torch.einsum`` of two activations that is a batched matrix product (``"bhqd,bhkd->bhqk"``: one contracted
  index, at most one free index per operand) -> ``permute`` + ``operator.matmul`` (+ ``permute``);
* ``F.layer_norm(x, shape, <path>.weight, <path>.bias, eps)`` (what subclasses of nn.LayerNorm such as timm's
  trace to) -> a call of an ``nn.LayerNorm`` module at ``<path>`` sharing those parameters, so passes that
  rescale or fold norms find them as modules.

After it, whichever front end captured the model, every weight is an ``nn.Linear`` / ``nn.Conv2d`` call and
attention is ``operator.matmul`` -> call_method ``softmax`` -> ``operator.matmul`` (README, "Writing a pass").
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from vitqc.graph import NodeEmitter, finish_graph, get_attr_value
from vitqc.passes.base import CompileContext, PassResult, VitqcPass, register_pass
from vitqc.passes.decompose_mha import DecomposeMha
from vitqc.passes.decompose_sdpa import DecomposeSdpa
from vitqc.passes.lift_modules import LiftModules
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


def _is_activation(gm: fx.GraphModule, value: Any) -> bool:
    """A value computed by the graph (not a parameter, buffer or constant)."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "get_attr":
        try:
            return not isinstance(get_attr_value(gm, str(value.target)), torch.Tensor)
        except AttributeError:
            return True
    return True


def einsum_as_matmul(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """A two-activation ``torch.einsum`` that is a batched matrix product, as permutes around one
    ``operator.matmul`` (inserted before ``node``); None when it is not of that form."""
    if node.op != "call_function" or node.target is not torch.einsum or node.kwargs:
        return None
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if len(operands) != 2 or not isinstance(node.args[0], str) or not all(_is_activation(gm, v) for v in operands):
        return None
    equation = node.args[0].replace(" ", "")
    if "..." in equation or "->" not in equation:
        return None
    inputs, out = equation.split("->")
    if inputs.count(",") != 1:
        return None
    la, lb = inputs.split(",")
    if any(len(set(s)) != len(s) for s in (la, lb, out)):
        return None
    batch = [c for c in out if c in la and c in lb]
    contracted = [c for c in la if c in lb and c not in out]
    free_a = [c for c in la if c not in lb]
    free_b = [c for c in lb if c not in la]
    if len(contracted) != 1 or len(free_a) > 1 or len(free_b) > 1 or any(c not in out for c in free_a + free_b) \
            or set(out) != set(batch + free_a + free_b):
        return None
    emit = NodeEmitter(gm.graph, node)

    def permuted(value: fx.Node, labels: str, order: list[str]) -> fx.Node:
        perm = [labels.index(c) for c in order]
        return value if perm == list(range(len(perm))) else emit.method("permute", value, *perm)

    a = permuted(operands[0], la, batch + free_a + contracted)
    if not free_a:
        a = emit.method("unsqueeze", a, -2)
    b = permuted(operands[1], lb, batch + contracted + free_b)
    if not free_b:
        b = emit.method("unsqueeze", b, -1)
    product = emit.function(operator.matmul, a, b)
    labels = batch + (free_a or ["<a>"]) + (free_b or ["<b>"])
    if not free_b:
        product, labels = emit.method("squeeze", product, -1), labels[:-1]
    if not free_a:
        product, labels = emit.method("squeeze", product, -1 if not free_b else -2), [c for c in labels if c != "<a>"]
    perm = [labels.index(c) for c in out]
    return product if perm == list(range(len(perm))) else emit.method("permute", product, *perm)


def _baddbmm_as_matmul(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """``torch.baddbmm(c, a, b, beta=, alpha=)`` -> ``beta * c + alpha * (a @ b)``."""
    if node.op != "call_function" or node.target is not torch.baddbmm or len(node.args) != 3:
        return None
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if set(node.kwargs) - {"beta", "alpha"} or not all(isinstance(v, (int, float)) for v in (beta, alpha)):
        return None
    emit = NodeEmitter(gm.graph, node)
    c, a, b = node.args
    product = emit.function(operator.matmul, a, b)
    if alpha != 1:
        product = emit.function(operator.mul, product, alpha)
    if beta == 0:
        return product
    return emit.function(operator.add, c if beta == 1 else emit.function(operator.mul, c, beta), product)


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
        new = einsum_as_matmul(gm, node) or _baddbmm_as_matmul(node, gm)
        if new is not None:
            if "tensor_meta" in node.meta:
                new.meta["tensor_meta"] = node.meta["tensor_meta"]
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
              and not node.kwargs) or (node.op == "call_method" and node.target in ("matmul", "bmm")
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
        for node in list(gm.graph.nodes):  # the parameters a lifted layer_norm read
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        finish_graph(gm)
    return changed


@register_pass
class Canonicalize(VitqcPass):
    name = "canonicalize"
    summary = ("decompose_sdpa + decompose_mha + remove_dropout + lift_modules (+ softmax/matmul/einsum forms): "
               "the canonical graph")

    @dataclass
    class Options:
        normalize_ops: bool = True  # also rewrite nn.Softmax/F.softmax/torch.matmul/bmm to the canonical forms

    requires = ()
    ensures = ("canonical",)

    def call(self, graph_module: fx.GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        modified = False
        for step in (DecomposeSdpa(), DecomposeMha(), RemoveDropout(), LiftModules()):
            result = step(gm, ctx)
            gm = result.graph_module
            modified |= bool(result.modified)
        if self.options.normalize_ops:
            modified |= normalize_ops(gm)
        return PassResult(gm, modified)


def reference_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a captured graph to measure the quantized graph against (the FP reference of a compile).

    It has the module paths of the canonical graph (``decompose_mha``'s projections, lifted functional linears
    and convs, which the captured graph lacks), so per-layer SQNR finds every quantized layer in it, and it
    computes what the model computes: fused attention (``scaled_dot_product_attention``) is kept, every other
    step of ``canonicalize`` only renames or moves the same kernels."""
    import copy

    gm = copy.deepcopy(gm)
    ctx = CompileContext(quiet=True)
    for step in (DecomposeMha(), RemoveDropout(), LiftModules()):
        gm = step(gm, ctx).graph_module
    normalize_ops(gm)
    return gm
