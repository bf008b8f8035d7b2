"""Graph properties that passes name in ``requires`` / ``ensures``. Each is a predicate on a GraphModule."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from vitqc.passes.base import graph_property

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout)
MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm, torch.Tensor.matmul)  # operator.matmul: the canonical form
SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax, torch.Tensor.softmax)


def _modules(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


@graph_property("no_fused_attention")
def no_fused_attention(gm: fx.GraphModule) -> bool:
    """No call to scaled_dot_product_attention remains (QK^T, softmax and .V are explicit)."""
    return not any(n.op == "call_function" and n.target in SDPA_TARGETS for n in gm.graph.nodes)


@graph_property("no_multihead_attention_modules")
def no_multihead_attention_modules(gm: fx.GraphModule) -> bool:
    """No nn.MultiheadAttention module is called as a black box."""
    return not any(isinstance(_modules(gm, n), nn.MultiheadAttention) for n in gm.graph.nodes)


@graph_property("no_dropout")
def no_dropout(gm: fx.GraphModule) -> bool:
    """No dropout or identity node is left (they are no-ops at inference)."""
    for n in gm.graph.nodes:
        mod = _modules(gm, n)
        if isinstance(mod, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)):
            return False
        if n.op == "call_function" and n.target in DROPOUT_FUNCTIONS:
            return False
    return True


@graph_property("canonical")
def canonical(gm: fx.GraphModule) -> bool:
    """Attention is explicit and no dropout/identity is left: the form quantization passes expect."""
    return no_fused_attention(gm) and no_multihead_attention_modules(gm) and no_dropout(gm)
