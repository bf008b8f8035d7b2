"""The torch.export front end: an exported program becomes a graph in vitqc's fx form.

``torch.export`` captures what fx symbolic tracing cannot (transformers models, which branch on input shapes;
timm blocks that compute sizes with ``math.ceil``) and is the form of ``.pt2`` inputs. Its graph is ATen:
``aten.linear(x, p_weight, p_bias)``, ``aten.view(x, [s0, 197, 3, 6, 64])``, parameters lifted to inputs.
:func:`graph_from_exported` turns the unlifted program (``ExportedProgram.module()``) into a plain
``fx.GraphModule`` that looks like a symbolic trace:

* parameters and buffers are ``get_attr`` nodes at their module paths (``blocks.0.attn.qkv.weight``), held by
  submodules at the same paths; the pytree input/output plumbing and the shape-guard module are gone;
* ATen ops become the torch-level forms fx tracing gives (:func:`_rewrite`'s tables): ``F.linear``, ``F.conv2d``,
  ``F.layer_norm``, ``F.scaled_dot_product_attention``, ``operator.matmul`` / ``add`` / ``mul``, call_method
  ``view`` / ``reshape`` / ``permute`` / ``transpose`` / ``softmax`` ..., slices as ``operator.getitem``.
  Ops without a rule stay ATen calls (they run and export as they are);
* ``nn_module_stack`` keeps the module paths export recorded, so ownership (``vitqc_owner``) and scopes are the
  same as fx's.

``canonicalize`` then lifts the functional linears/convs to ``nn.Linear`` / ``nn.Conv2d`` modules, exactly as
for a symbolically traced model. A dynamic batch dimension stays symbolic (``x.size(0)`` nodes), so the graph
runs at any batch size; a program exported for one fixed batch size is refused with the fix.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from vitqc.errors import TraceFailure
from vitqc.graph import owner_of

__all__ = ["is_exported_module", "export_model", "graph_from_exported"]

aten = torch.ops.aten

# aten packet -> Tensor method of the same arguments (in schema order; trailing defaults dropped)
_METHODS = {
    "view": "view", "reshape": "reshape", "_unsafe_view": "reshape", "permute": "permute", "transpose": "transpose",
    "flatten": "flatten", "unflatten": "unflatten", "expand": "expand", "unbind": "unbind", "select": "select",
    "squeeze": "squeeze", "unsqueeze": "unsqueeze", "chunk": "chunk", "split": "split",
    "split_with_sizes": "split", "repeat": "repeat", "repeat_interleave": "repeat_interleave", "mean": "mean",
    "sum": "sum", "amax": "amax", "amin": "amin", "roll": "roll", "narrow": "narrow", "contiguous": "contiguous",
    "clone": "clone", "softmax": "softmax", "log_softmax": "log_softmax", "masked_fill": "masked_fill",
    "sym_size": "size", "t": "t", "exp": "exp", "sqrt": "sqrt", "rsqrt": "rsqrt", "pow": "pow", "flip": "flip",
    "type_as": "type_as", "expand_as": "expand_as", "view_as": "view_as", "abs": "abs", "norm": "norm",
    "clamp": "clamp", "clamp_min": "clamp_min", "cumsum": "cumsum", "sign": "sign", "reciprocal": "reciprocal",
}
# aten packet -> a function taking the same arguments in schema order
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv, "neg": operator.neg,
    "matmul": operator.matmul, "bmm": torch.bmm, "mm": torch.mm, "addmm": torch.addmm, "baddbmm": torch.baddbmm,
    "linear": F.linear, "conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d,
    "layer_norm": F.layer_norm, "group_norm": F.group_norm,
    "scaled_dot_product_attention": F.scaled_dot_product_attention,
    "gelu": F.gelu, "silu": F.silu, "relu": F.relu, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "cat": torch.cat, "stack": torch.stack, "pad": F.pad,
    "adaptive_avg_pool2d": F.adaptive_avg_pool2d, "adaptive_avg_pool1d": F.adaptive_avg_pool1d,
    "avg_pool2d": F.avg_pool2d, "max_pool2d": F.max_pool2d, "where": torch.where, "erf": torch.erf,
    "sin": torch.sin, "cos": torch.cos, "arange": torch.arange, "zeros": torch.zeros, "ones": torch.ones,
    "full": torch.full,
}
# arguments the torch-level form does not take and that do not change the result
_DROP = {"expand": ("implicit",), "layer_norm": ("cudnn_enable",),
         "group_norm": ("cudnn_enabled",)}
# overloads whose torch-level form differs in meaning: left as ATen calls
_KEEP_ATEN = {aten.div.Tensor_mode}
Rewrite = tuple  # (op, target, args, kwargs) of the torch-level node
_ASSERTS = ("_assert_scalar", "_assert_tensor_metadata", "sym_constrain_range", "sym_constrain_range_for_size",
            "_assert_async")


def _bound(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _schema_args(node: fx.Node, drop: tuple[str, ...] = ()) -> tuple[list[Any], dict[str, Any]]:
    """Positional arguments in schema order, trailing defaults dropped; kwarg-only ones as kwargs; the
    arguments named in ``drop`` left out."""
    schema = node.target._schema  # type: ignore[union-attr]
    bound = _bound(node)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for arg in schema.arguments:
        if arg.name not in bound:
            break
        value = bound[arg.name]
        if arg.name in drop:
            continue
        at_default = arg.has_default_value() and _same(value, arg.default_value)
        if arg.kwarg_only:
            if not at_default:
                kwargs[arg.name] = value
        else:
            args.append(value)
    # drop trailing positional defaults so the nodes read like a trace
    positional = [a for a in schema.arguments if not a.kwarg_only and a.name not in drop]
    while args and positional[len(args) - 1].has_default_value() and _same(args[-1], positional[len(args) - 1].default_value):
        args.pop()
    return args, kwargs


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    try:
        return bool(a == b) and type(a) is type(b) or (a is None and b is None)
    except Exception:  # tensors and other values without a plain ==
        return False


def _slice(b: dict[str, Any], node: fx.Node) -> Rewrite | None:
    """``aten.slice(x, dim, start, end, step)`` -> ``x[:, ..., start:end:step]`` (``operator.getitem``)."""
    dim = b.get("dim", 0)
    if not isinstance(dim, int):
        return None
    if dim < 0:
        val = b["self"].meta.get("val") if isinstance(b["self"], fx.Node) else None
        if val is None or not hasattr(val, "dim"):
            return None
        dim += val.dim()
    end = b.get("end")
    if isinstance(end, int) and end >= 2 ** 62:
        end = None
    return "call_function", operator.getitem, (b["self"], (*([slice(None)] * dim), slice(b.get("start"), end, b.get("step", 1)))), {}


def _convolution(b: dict[str, Any], node: fx.Node) -> Rewrite | None:
    """Core ATen's ``convolution`` (every conv) -> ``F.conv1d`` / ``F.conv2d`` when it is not transposed."""
    weight = b["weight"].meta.get("val") if isinstance(b["weight"], fx.Node) else None
    conv = {3: F.conv1d, 4: F.conv2d}.get(weight.dim() if weight is not None else 0)
    if conv is None or b["transposed"]:
        return None
    return "call_function", conv, (b["input"], b["weight"], b["bias"], b["stride"], b["padding"], b["dilation"],
                                   b["groups"]), {}


# ops whose torch-level form takes other arguments than their schema's (arguments by schema name -> rewrite)
_SPECIAL: dict[str, Callable[[dict[str, Any], fx.Node], Rewrite | None]] = {
    "slice": _slice,
    "convolution": _convolution,
    "_softmax": lambda b, n: None if b.get("half_to_float") else ("call_method", "softmax", (b["self"], b["dim"]), {}),
    "einsum": lambda b, n: ("call_function", torch.einsum, (b["equation"], *b["tensors"]), {}),
    "constant_pad_nd": lambda b, n: ("call_function", F.pad, (b["self"], b["pad"], "constant", b.get("value", 0)), {}),
    "add": lambda b, n: None if b.get("alpha", 1) != 1 else ("call_function", operator.add, (b["self"], b["other"]), {}),
    "sub": lambda b, n: None if b.get("alpha", 1) != 1 else ("call_function", operator.sub, (b["self"], b["other"]), {}),
    "dropout": lambda b, n: ("call_function", F.dropout, (b["input"], b["p"]), {"training": b["train"]}),
}


def _rewrite(node: fx.Node) -> Rewrite | None:
    """The torch-level form of an ATen node: a rule of :data:`_SPECIAL`, a Tensor method of :data:`_METHODS` or a
    function of :data:`_FUNCTIONS` taking the schema's arguments; None keeps the ATen call."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target in _KEEP_ATEN:
        return None
    packet = target.overloadpacket.__name__
    if packet in _SPECIAL:
        return _SPECIAL[packet](_bound(node), node)
    first = target._schema.arguments[0] if target._schema.arguments else None
    if packet in _METHODS and first is not None and isinstance(first.type, torch.TensorType):
        args, kwargs = _schema_args(node, _DROP.get(packet, ()))
        return "call_method", _METHODS[packet], tuple(args), kwargs
    if packet in _FUNCTIONS:
        args, kwargs = _schema_args(node, _DROP.get(packet, ()))
        if kwargs.get("pin_memory") is False:  # torch.zeros & co. take it, but only ATen spells it out
            kwargs.pop("pin_memory")
        return "call_function", _FUNCTIONS[packet], tuple(args), kwargs
    return None


def is_exported_module(module: nn.Module) -> bool:
    """``ExportedProgram.module()``: a GraphModule of ATen ops with pytree input/output specs."""
    return isinstance(module, fx.GraphModule) and hasattr(module, "_in_spec") and hasattr(module, "_out_spec")


def _module_stack(meta: dict[str, Any]) -> dict[str, tuple[str, Any]] | None:
    """export's nn_module_stack without its placeholder entries (module paths only)."""
    stack = meta.get("nn_module_stack")
    if not stack:
        return None
    kept = {k: v for k, v in stack.items()
            if isinstance(v, tuple) and isinstance(v[0], str) and not str(k).startswith("_empty_nn_module_stack")}
    return kept or None


def _first_output_only(node: fx.Node) -> bool:
    return all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in node.users)


def _is_assert(node: fx.Node) -> bool:
    target = node.target
    name = getattr(getattr(target, "overloadpacket", None), "__name__", None) or getattr(target, "__name__", "")
    return node.op == "call_function" and name in _ASSERTS and not node.users


def graph_from_exported(module: fx.GraphModule, what: str = "the program") -> fx.GraphModule:
    """The unlifted exported program ``module`` as a plain GraphModule in vitqc's fx form (see the module doc)."""
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TraceFailure(f"{what} takes {len(placeholders)} inputs; vitqc quantizes image models of one input "
                           f"(the image batch)")
    val = placeholders[0].meta.get("val")
    if val is not None and hasattr(val, "shape") and len(val.shape) and isinstance(val.shape[0], int):
        raise TraceFailure(
            f"{what} was exported for a fixed batch size of {val.shape[0]}; vitqc calibrates and evaluates "
            f"batches of any size: export it with a dynamic batch dimension, torch.export.export(model, (x,), "
            f"dynamic_shapes=({{0: torch.export.Dim('batch')}},))")
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for node in module.graph.nodes:
        if node.op == "call_module" and str(node.target) == "_guards_fn" or _is_assert(node):
            continue
        if node.op == "output":
            flat, _ = tree_flatten(node.args[0])
            tensors = [v for v in flat if isinstance(v, fx.Node)]
            if not tensors:
                raise TraceFailure(f"{what} returns no tensor")
            if len(flat) != 1:
                from vitqc.console import warn

                warn(f"{what} returns {len(flat)} values; vitqc uses the first, {tensors[0].name}, as the model's "
                     f"output (logits)")
            graph.output(env[tensors[0]])
            continue
        new = graph.node_copy(node, lambda n: env[n])
        new.meta = {}
        stack = _module_stack(node.meta)
        if stack:
            new.meta["nn_module_stack"] = stack
        if "stack_trace" in node.meta:
            new.meta["stack_trace"] = node.meta["stack_trace"]
        if "val" in node.meta:
            new.meta["val"] = node.meta["val"]  # for the rewrite below (slice ranks); dropped after
        env[node] = new
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.native_layer_norm.default and _first_output_only(node):
            # core ATen's layer_norm returns (out, mean, rstd); when only `out` is used it is F.layer_norm
            b = _bound(node)
            with graph.inserting_before(node):
                norm = graph.call_function(F.layer_norm, (b["input"], b["normalized_shape"], b["weight"],
                                                          b["bias"], b["eps"]))
            norm.meta = dict(node.meta)
            for user in list(node.users):
                user.replace_all_uses_with(norm)
                graph.erase_node(user)
            graph.erase_node(node)
            continue
        rewrite = _rewrite(node)
        if rewrite is None:
            continue
        op, target, args, kwargs = rewrite
        with graph.inserting_before(node):
            replacement = graph.create_node(op, target, args, kwargs)
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    for node in graph.nodes:
        node.meta.pop("val", None)
    graph.eliminate_dead_code()
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    for node in gm.graph.nodes:
        node.meta["vitqc_owner"] = owner_of(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def export_model(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``torch.export`` ``model`` (eval mode, non-strict, dynamic batch) and return its unlifted module."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    # two images: a batch of one would be specialised to the constant 1 (0/1 specialisation)
    x = example[:1].expand(2, *example.shape[1:]).contiguous()
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TraceFailure(f"torch.export could not capture {type(model).__qualname__} either: "
                           f"{type(e).__name__}: {first}") from e
    return program.module()
