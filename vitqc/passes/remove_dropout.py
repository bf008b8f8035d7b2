"""``remove_dropout``: drop the nodes that are no-ops at inference.

Removed (uses are rewired to the node's input):

* ``call_module`` of ``nn.Dropout``, ``nn.Dropout1d/2d/3d``, ``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``,
  ``nn.Identity`` and timm's ``DropPath`` (when it was kept as a leaf);
* ``call_function`` of ``F.dropout``, ``F.dropout1d/2d/3d``, ``F.alpha_dropout``, ``F.feature_alpha_dropout``
  and ``torch.dropout`` (whatever their ``training`` argument says: vitqc graphs are inference graphs).

The modules left unused are deleted from the GraphModule.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from vitqc.graph import finish_graph
from vitqc.passes.base import CompileContext, NoOptions, PassResult, VitqcPass, register_pass
from vitqc.passes.properties import DROPOUT_FUNCTIONS

DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Identity,
)
try:
    from timm.layers import DropPath

    DROPOUT_MODULES = (*DROPOUT_MODULES, DropPath)
except ImportError:  # pragma: no cover
    pass

REMOVED_FUNCTIONS = (*DROPOUT_FUNCTIONS, F.feature_alpha_dropout, torch.feature_dropout, torch.alpha_dropout,
                     torch.feature_alpha_dropout)


def _input_of(node: fx.Node) -> Any:
    if node.args:
        return node.args[0]
    if "input" in node.kwargs:
        return node.kwargs["input"]
    return next(iter(node.kwargs.values()), None)


def is_removable(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), DROPOUT_MODULES) and bool(node.args or node.kwargs)
    return node.op == "call_function" and node.target in REMOVED_FUNCTIONS


@register_pass
class RemoveDropout(VitqcPass):
    name = "remove_dropout"
    summary = "remove dropout / identity nodes (no-ops at inference)"
    Options = NoOptions
    requires = ()
    ensures = ("no_dropout",)

    def call(self, graph_module: fx.GraphModule, ctx: CompileContext) -> PassResult:
        gm = graph_module
        removed = 0
        for node in list(gm.graph.nodes):
            if not is_removable(gm, node):
                continue
            source = _input_of(node)
            if isinstance(source, fx.Node):
                node.replace_all_uses_with(source)
            elif node.users:  # a constant input (unusual): keep the node rather than lose the value
                continue
            gm.graph.erase_node(node)
            removed += 1
        if removed:
            finish_graph(gm)
        return PassResult(gm, removed > 0)
