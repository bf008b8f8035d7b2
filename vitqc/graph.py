"""Graph-editing helpers shared by capture and every pass: one home for node metadata and graph surgery.

* :func:`owner_of` / :class:`NodeEmitter`: the ``vitqc_owner`` / ``nn_module_stack`` metadata capture sets,
  kept on the nodes a pass creates;
* :func:`static_tensor_meta`, :func:`static_dtype`, :func:`get_attr_value`: what is known about a value
  without running the graph;
* :func:`replace_submodule`, :func:`unique_path`, :func:`insert_after`, :func:`insert_before_use`,
  :func:`is_quantizer_node`: putting modules into a GraphModule;
* :func:`reads_shape_only`: uses of a value that do not see its elements;
* :func:`finish_graph`: lint and recompile after a rewrite.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from vitqc.quant.quantizer import UniformQuantizer

__all__ = ["owner_of", "NodeEmitter", "static_tensor_meta", "get_attr_value", "static_dtype", "finish_graph",
           "is_quantizer_node", "replace_submodule", "unique_path", "insert_after", "insert_before_use",
           "reads_shape_only"]


def owner_of(node: fx.Node) -> str:
    """The path of the module a node belongs to (see the module docstring)."""
    if node.op in ("call_module", "get_attr"):
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if stack:
        return str(list(stack.values())[-1][0])
    return ""


class NodeEmitter:
    """Creates nodes before ``anchor`` that carry the capture metadata (for passes that rewrite the graph).

    Every emitted node gets ``vitqc_owner`` = ``owner`` (default: the anchor's owner; for ``call_module`` nodes
    always the parent path of the target) and a copy of the anchor's ``nn_module_stack``, extended with
    ``owner`` when ``owner_type`` is given and the stack does not already end there.
    """

    def __init__(self, graph: fx.Graph, anchor: fx.Node, owner: str | None = None,
                 owner_type: type | None = None) -> None:
        self.graph = graph
        self.anchor = anchor
        self.owner = owner if owner is not None else anchor.meta.get("vitqc_owner", owner_of(anchor))
        stack = dict(anchor.meta.get("nn_module_stack", {}) or {})
        if owner and owner_type is not None and (not stack or list(stack.values())[-1][0] != owner):
            stack[owner] = (owner, owner_type)
        self.stack = stack
        self.created: list[fx.Node] = []

    def _meta(self, node: fx.Node) -> fx.Node:
        if self.stack:
            node.meta["nn_module_stack"] = dict(self.stack)
        node.meta["vitqc_owner"] = owner_of(node) if node.op == "call_module" else self.owner
        self.created.append(node)
        return node

    def function(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            return self._meta(self.graph.call_function(target, tuple(args), kwargs))

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            return self._meta(self.graph.call_method(name, tuple(args), kwargs))

    def module(self, target: str, *args: Any, **kwargs: Any) -> fx.Node:
        """A ``call_module`` node; like fx's, its ``nn_module_stack`` ends with the called module's own path."""
        with self.graph.inserting_before(self.anchor):
            node = self._meta(self.graph.call_module(target, tuple(args), kwargs))
        owner = self.graph.owning_module
        stack = dict(node.meta.get("nn_module_stack") or {})
        if owner is not None and (not stack or list(stack.values())[-1][0] != target):
            stack[target] = (target, type(owner.get_submodule(target)))
            node.meta["nn_module_stack"] = stack
        return node


def reads_shape_only(node: fx.Node) -> bool:
    """``x.shape`` / ``x.size()`` / ``x.dim()`` (or export's ``sym_size``): uses that do not see the values."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1:] in (("shape",), ("ndim",))
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default)


def static_tensor_meta(value: Any) -> Any:
    """``tensor_meta`` of a node (ShapeProp at capture) when it describes a single tensor, else None."""
    if not isinstance(value, fx.Node):
        return None
    meta = value.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return meta
    return None


def get_attr_value(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def static_dtype(gm: fx.GraphModule, value: Any) -> torch.dtype | None:
    """A value's dtype when known without running the graph (tensor_meta, a get_attr tensor), else None."""
    if isinstance(value, torch.Tensor):
        return value.dtype
    meta = static_tensor_meta(value)
    if meta is not None:
        return meta.dtype
    if isinstance(value, fx.Node) and value.op == "get_attr":
        try:
            obj = get_attr_value(gm, str(value.target))
        except AttributeError:
            return None
        if isinstance(obj, torch.Tensor):
            return obj.dtype
    return None


def finish_graph(gm: fx.GraphModule, delete_unused_submodules: bool = True) -> None:
    """Lint and recompile after a rewrite (and drop submodules no node uses any more)."""
    gm.graph.lint()
    if delete_unused_submodules:
        gm.delete_all_unused_submodules()
    gm.recompile()


def is_quantizer_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), UniformQuantizer)


def replace_submodule(gm: fx.GraphModule, path: str, new: nn.Module) -> None:
    """Put ``new`` at ``path`` (the graph's call_module nodes then call it)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, leaf, new)


def unique_path(gm: fx.GraphModule, path: str) -> str:
    candidate, i = path, 1
    while True:
        try:
            gm.get_submodule(candidate)
        except AttributeError:
            return candidate
        candidate, i = f"{path}_{i}", i + 1


def insert_after(gm: fx.GraphModule, node: fx.Node, module: nn.Module, path: str) -> fx.Node:
    path = unique_path(gm, path)
    gm.add_submodule(path, module)
    with gm.graph.inserting_after(node):
        qnode = gm.graph.call_module(path, (node,))
    node.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
    qnode.meta["vitqc_owner"] = path.rpartition(".")[0]
    return qnode


def insert_before_use(gm: fx.GraphModule, user: fx.Node, arg: fx.Node, module: nn.Module, path: str) -> fx.Node:
    path = unique_path(gm, path)
    gm.add_submodule(path, module)
    with gm.graph.inserting_before(user):
        qnode = gm.graph.call_module(path, (arg,))
    user.replace_input_with(arg, qnode)
    qnode.meta["vitqc_owner"] = path.rpartition(".")[0]
    return qnode
