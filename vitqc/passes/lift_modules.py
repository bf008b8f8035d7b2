"""``lift_modules``: functional linears and convolutions on parameters become ``nn.Linear`` / ``nn.Conv*`` calls.

The quantization passes see weights as modules (``call_module`` of ``nn.Linear`` / ``nn.Conv2d``). Models and
front ends also apply weights functionally: timm's SwinV2, BEiT and EVA-02 run qkv as
``F.linear(x, self.qkv.weight, qkv_bias)``, a ``torch.export`` graph has ``F.linear`` / ``F.conv2d`` everywhere,
other code writes ``x @ self.proj`` or ``torch.addmm(b, x, w.t())``. Rules, each on a weight that is a
``get_attr`` of a parameter or buffer:

=============================================  ====================================================================
``F.linear(x, W, b)``                          ``Linear(x)``; a bias that is not a parameter (SwinV2's
                                               ``cat(q_bias, 0, v_bias)``) is added after: ``Linear(x) + b``
``torch.addmm(b, x, W.t())`` / ``mm(x, W.t())``  the same (``W.t()``: ``t``, ``transpose(0, 1)``, ``permute(1, 0)``,
``x @ W.t()`` (matmul, any spelling)             ``.T``)
``x @ W`` (``W`` stored in x out)              ``Linear(x)`` with a transposed copy of ``W`` as its weight
``F.conv1d/2d(x, W, b, stride, ...)``          ``Conv1d/2d(x)`` with the same hyperparameters
=============================================  ====================================================================

Reads of a lifted weight's ``device`` / ``dtype`` (timm's XCiT: ``self.token_projection.weight.device``) read
the input image's instead, so nothing refers to a weight once ``materialize`` has replaced it by integer codes.

Where the module goes: the module that owns ``W`` when calling it computes exactly the functional op
(``blocks.0.attn.qkv`` for SwinV2: an ``nn.Linear`` whose own bias is None); else that owner replaced by the new
module when nothing else of it is used (the containers a ``torch.export`` graph gets: export's paths stay); else a
new child (``<owner>.in_proj`` for an ``in_proj_weight``). Parameters are shared, never copied (but for ``x @ W``).
The new nodes keep the functional node's metadata, with the module's own path on its ``nn_module_stack`` as fx
gives a ``call_module`` node.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from vitqc.graph import finish_graph, get_attr_value, owner_of, unique_path
from vitqc.passes.base import CompileContext, NoOptions, PassResult, VitqcPass, register_pass

__all__ = ["LiftModules", "lift_modules", "weight_operand", "LINEAR_FUNCTIONS", "CONV_FUNCTIONS"]

LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)
CONV_FUNCTIONS = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, torch.conv1d: nn.Conv1d, torch.conv2d: nn.Conv2d}
_MATMULS = (operator.matmul, torch.matmul, torch.Tensor.matmul, torch.mm, torch.bmm)
_CONV_PARAMS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _tensor_attr(gm: fx.GraphModule, node: Any, ndim: int | None = None) -> torch.Tensor | None:
    """The parameter/buffer a ``get_attr`` node reads (of ``ndim`` dims if given), else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    try:
        value = get_attr_value(gm, str(node.target))
    except AttributeError:
        return None
    if not isinstance(value, torch.Tensor) or (ndim is not None and value.dim() != ndim):
        return None
    return value


def _broadcast_source(node: fx.Node) -> fx.Node:
    """Through ``expand`` / ``view`` / ``reshape`` / ``unsqueeze`` / ``contiguous`` that only put leading
    broadcast dims before the same matrix (core ATen's ``x @ W.t()`` on 3-D ``x``: ``bmm`` with
    ``W.t().expand(b, k, m).view(b, k, m)``): the node holding that matrix."""
    current = node
    while current.op == "call_method" and current.target in ("expand", "view", "reshape", "unsqueeze", "contiguous"):
        source = current.args[0]
        if not isinstance(source, fx.Node):
            break
        out_meta, in_meta = current.meta.get("tensor_meta"), source.meta.get("tensor_meta")
        if out_meta is None or in_meta is None or len(in_meta.shape) < 2 or len(out_meta.shape) < 2 \
                or tuple(out_meta.shape[-2:]) != tuple(in_meta.shape[-2:]):
            break
        lead_in, lead_out = torch.Size(in_meta.shape[:-2]).numel(), torch.Size(out_meta.shape[:-2]).numel()
        if current.target == "expand" and lead_in != 1 or current.target in ("view", "reshape") and lead_in != lead_out:
            break
        current = source
    return current


def _transposed_attr(gm: fx.GraphModule, node: Any) -> fx.Node | None:
    """``W`` when ``node`` is ``W.t()`` / ``W.transpose(0, 1)`` / ``W.permute(1, 0)`` / ``W.T`` of a 2-D get_attr
    (broadcast over leading dims or not)."""
    if not isinstance(node, fx.Node):
        return None
    node = _broadcast_source(node)
    base = None
    if node.op == "call_method" and node.target in ("t", "transpose", "permute") or \
            node.op == "call_function" and node.target in (torch.t, torch.transpose, torch.permute):
        args = list(node.args[1:])
        if node.target in ("t", torch.t) and not args or sorted(map(str, args)) in (["0", "1"], ["-1", "-2"]) \
                or args in ([[1, 0]], [(1, 0)]):
            base = node.args[0]
    elif node.op == "call_function" and node.target is getattr and node.args[1:] in (("T",), ("mT",)):
        base = node.args[0]
    return base if _tensor_attr(gm, base, 2) is not None else None


def weight_operand(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None, Any, bool] | None:
    """``(x, W, bias, transposed)`` when ``node`` applies a 2-D parameter/buffer ``W`` as a linear layer
    (``transposed``: W is stored in x out, ``x @ W``), else None. ``bias`` is None, a node or a constant."""
    if node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
        bound = dict(zip(("input", "weight", "bias"), node.args))
        bound.update(node.kwargs)
        w = bound.get("weight")
        if _tensor_attr(gm, w, 2) is not None and isinstance(bound.get("input"), fx.Node):
            return bound["input"], w, bound.get("bias"), False
        return None
    if node.kwargs:
        return None
    if node.op == "call_function" and node.target is torch.addmm and len(node.args) == 3:
        bias, x, wt = node.args
        w = _transposed_attr(gm, wt)
        return (x, w, bias, False) if w is not None and isinstance(x, fx.Node) else None
    is_matmul = (node.op == "call_function" and node.target in _MATMULS) or \
        (node.op == "call_method" and node.target in ("matmul", "mm", "bmm"))
    if is_matmul and len(node.args) == 2 and isinstance(node.args[0], fx.Node):
        x, rhs = node.args
        if _tensor_attr(gm, x) is not None:  # a parameter on the left is not a linear layer of x
            return None
        w = _transposed_attr(gm, rhs)
        if w is not None:
            return x, w, None, False
        if _tensor_attr(gm, rhs, 2) is not None:
            return x, rhs, None, True
    return None


def _users_of_holder(gm: fx.GraphModule, path: str) -> set[str]:
    """Attribute names of the module at ``path`` that the graph reads (``"<call>"`` when it is called)."""
    used = set()
    prefix = path + "." if path else ""
    for n in gm.graph.nodes:
        if n.op == "call_module" and str(n.target) == path:
            used.add("<call>")
        elif n.op in ("get_attr", "call_module") and str(n.target).startswith(prefix):
            used.add(str(n.target)[len(prefix):].split(".")[0])
    return used


def _replaceable(gm: fx.GraphModule, path: str, names: set[str]) -> bool:
    """The module at ``path`` can be swapped for a new layer: the graph only reads ``names`` of it and it owns
    nothing else (no children, no other parameters or buffers)."""
    if not path:
        return False
    holder = gm.get_submodule(path)
    own = {n for n, _ in holder.named_parameters(recurse=False)} | {n for n, _ in holder.named_buffers(recurse=False)}
    return not list(holder.children()) and own <= names and _users_of_holder(gm, path) <= names


def _put(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, leaf, module)


def _placement(gm: fx.GraphModule, weight: fx.Node, bias: Any, fits: Any, build: Any,
               transposed: bool = False) -> tuple[str, Any]:
    """Module path for the layer applying ``weight`` (the module put there if new), and the bias left to add
    after it: None when the module applies it, else the bias node."""
    wpath, _, wname = str(weight.target).rpartition(".")
    holder = gm.get_submodule(wpath) if wpath else gm
    has_bias_attr = _tensor_attr(gm, bias, 1) is not None
    own_bias = has_bias_attr and str(bias.target) == (f"{wpath}.bias" if wpath else "bias")
    if wname == "weight" and not transposed:
        if fits(holder):
            holder_bias = getattr(holder, "bias", None)
            if own_bias or bias is None and holder_bias is None:
                return wpath, None
            if holder_bias is None:
                return wpath, bias
        if _replaceable(gm, wpath, {"weight", "bias"} if own_bias else {"weight"}):
            _put(gm, wpath, build(own_bias))
            return wpath, None if own_bias else bias
    stem = wname[: -len("_weight")] if wname.endswith("_weight") and not transposed else f"{wname}_layer"
    path = unique_path(gm, f"{wpath}.{stem}" if wpath else stem)
    gm.add_submodule(path, build(has_bias_attr))
    return path, None if has_bias_attr else bias


def _linear_fits(w: torch.Tensor):
    return lambda m: isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and m.weight is w


def _call(gm: fx.GraphModule, node: fx.Node, path: str, x: fx.Node, module_type: type, extra_bias: Any) -> fx.Node:
    """Replace ``node`` by ``path(x)`` (``+ extra_bias``), keeping its metadata."""
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, (x,))
        out = new if extra_bias is None else gm.graph.call_function(operator.add, (new, extra_bias))
    new.meta = dict(node.meta)
    stack = dict(node.meta.get("nn_module_stack") or {})
    if not stack or list(stack.values())[-1][0] != path:
        stack[path] = (path, module_type)
    new.meta["nn_module_stack"] = stack
    new.meta["vitqc_owner"] = owner_of(new)
    if out is not new:
        out.meta = dict(node.meta)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return new


def _lift_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    found = weight_operand(gm, node)
    if found is None:
        return False
    x, weight, bias, transposed = found
    w = _tensor_attr(gm, weight, 2)
    assert w is not None
    if bias is not None and not isinstance(bias, fx.Node):
        return False  # a constant bias: rare enough to leave (coverage reports it)
    b = _tensor_attr(gm, bias, 1)

    def build(with_bias: bool) -> nn.Linear:
        out_f, in_f = (w.shape[1], w.shape[0]) if transposed else w.shape
        lin = nn.Linear(in_f, out_f, bias=with_bias, device="meta")
        lin.weight = (nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad) if transposed
                      else w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False))
        if with_bias:
            lin.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False)
        return lin

    path, extra = _placement(gm, weight, bias, _linear_fits(w), build, transposed)
    _call(gm, node, path, x, nn.Linear, extra)
    return True


def _lift_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in CONV_FUNCTIONS:
        return False
    conv_type = CONV_FUNCTIONS[node.target]
    bound = dict(zip(_CONV_PARAMS, node.args))
    bound.update(node.kwargs)
    ndim = 3 if conv_type is nn.Conv1d else 4
    w = _tensor_attr(gm, bound.get("weight"), ndim)
    bias = bound.get("bias")
    if w is None or not isinstance(bound.get("input"), fx.Node) or bias is not None and not isinstance(bias, fx.Node):
        return False
    b = _tensor_attr(gm, bias, 1)
    spatial = ndim - 2

    def tup(v: Any) -> Any:
        return v if isinstance(v, str) else tuple(v) if isinstance(v, (tuple, list)) else (v,) * spatial

    hyper = {"stride": tup(bound.get("stride", 1)), "padding": tup(bound.get("padding", 0)),
             "dilation": tup(bound.get("dilation", 1)), "groups": int(bound.get("groups", 1))}

    def fits(m: nn.Module) -> bool:
        return (isinstance(m, conv_type) and type(m).forward is conv_type.forward and m.weight is w
                and m.padding_mode == "zeros" and all(tup(getattr(m, k)) == v for k, v in hyper.items() if k != "groups")
                and m.groups == hyper["groups"])

    def build(with_bias: bool) -> nn.Module:
        conv = conv_type(w.shape[1] * hyper["groups"], w.shape[0], tuple(w.shape[2:]), bias=with_bias, device="meta",
                         **hyper)
        conv.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
        if with_bias:
            conv.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False)
        return conv

    path, extra = _placement(gm, bound["weight"], bias, fits, build)
    if extra is not None:  # a computed conv bias is per channel: broadcast over the spatial dims
        with gm.graph.inserting_before(node):
            extra = gm.graph.call_method("reshape", (extra, -1, *([1] * spatial)))
            extra.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "vitqc_owner")}
    _call(gm, node, path, bound["input"], conv_type, extra)
    return True


def _read_input_metadata(gm: fx.GraphModule) -> int:
    """``<weight>.device`` / ``.dtype`` of a lifted weight -> the same attribute of the graph's first input."""
    placeholder = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    weights = {f"{str(n.target)}.{name}" for n in gm.graph.nodes if n.op == "call_module"
               for name in ("weight", "bias")}
    changed = 0
    for node in list(gm.graph.nodes):
        if placeholder is None or not (node.op == "call_function" and node.target is getattr
                                       and node.args[1:] in (("device",), ("dtype",))):
            continue
        source = node.args[0]
        if isinstance(source, fx.Node) and source.op == "get_attr" and str(source.target) in weights:
            node.args = (placeholder, node.args[1])
            changed += 1
    return changed


def lift_modules(gm: fx.GraphModule) -> int:
    """Apply the rules of the module docstring; returns how many nodes changed."""
    lifted = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        lifted += _lift_linear(gm, node) or _lift_conv(gm, node)
    lifted += _read_input_metadata(gm)
    if lifted:
        gm.graph.eliminate_dead_code()  # the weights' get_attr (and transpose) nodes the functional ops read
        finish_graph(gm)
    return lifted


@register_pass
class LiftModules(VitqcPass):
    name = "lift_modules"
    summary = "F.linear / addmm / x @ W / F.conv2d on parameters -> nn.Linear / nn.Conv2d module calls"
    Options = NoOptions
    requires = ()
    ensures = ()

    def call(self, graph_module: fx.GraphModule, ctx: CompileContext) -> PassResult:
        return PassResult(graph_module, lift_modules(graph_module) > 0)
