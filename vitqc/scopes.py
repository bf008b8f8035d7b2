"""Module scopes of graph nodes: which ``nn.Module`` path a node was computed inside.

A block's (or layer's) output is the last node computed inside its scope. Distillation taps block outputs
this way (joint_optimize, mixed_precision_search) and evaluation taps layer outputs this way, so FP and
quantized graphs are compared at the same module paths however differently their insides look.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable

from torch import fx

from vitqc.errors import VitqcError

COMPUTE_OPS = ("call_function", "call_method", "call_module")


def node_scopes(node: fx.Node) -> set[str]:
    """Every module path ``node`` lies inside: from capture's ``nn_module_stack`` and from the owner a pass
    recorded for the nodes it inserted (``vitqc_owner``, with all its parent paths)."""
    paths = set()
    owner = node.meta.get("vitqc_owner")
    if owner:
        parts = owner.split(".")
        paths.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    for entry in (node.meta.get("nn_module_stack") or {}).values():
        if isinstance(entry, tuple) and isinstance(entry[0], str) and entry[0]:
            paths.add(entry[0])
    return paths


def last_nodes(graph: fx.Graph, scopes: Iterable[str], ops: Iterable[str] = COMPUTE_OPS) -> dict[str, fx.Node]:
    """For each wanted scope, the last node (of the given ops) computed inside it; absent scopes are left out."""
    wanted, ops = set(scopes), set(ops)
    last: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node.op in ops:
            for scope in node_scopes(node) & wanted:
                last[scope] = node
    return last


def block_scopes(gm: fx.GraphModule, patterns: list[str]) -> list[str]:
    """Module paths of the blocks: those matching the first pattern that matches any scope in the graph
    (``blocks.*`` for ViT/DeiT, ``layers.*.blocks.*`` for Swin), in execution order of their indices. When no
    pattern matches (transformers' ``vit.layers.0``, PVT's ``stages.0.blocks.0``), the blocks are found by
    structure: :func:`attention_scopes`."""
    all_scopes = set().union(*(node_scopes(n) for n in gm.graph.nodes))
    for pattern in patterns:
        depth = pattern.count(".")
        hits = [p for p in all_scopes if p.count(".") == depth and fnmatch.fnmatchcase(p, pattern)]
        if hits:
            return sorted(hits, key=lambda p: [int(x) if x.isdigit() else x for x in p.split(".")])
    return attention_scopes(gm)


def _is_attention(node: fx.Node) -> bool:
    target = getattr(node.target, "__name__", node.target)
    return (node.op == "call_method" and node.target == "softmax") or \
        (node.op == "call_function" and target in ("softmax", "scaled_dot_product_attention"))


def attention_scopes(gm: fx.GraphModule) -> list[str]:
    """The outermost module scopes that hold exactly one attention (a softmax or a fused attention call):
    a transformer block whatever its path, in the order the graph runs them."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for index, node in enumerate(gm.graph.nodes):
        if node.op not in COMPUTE_OPS:
            continue
        for scope in node_scopes(node):
            first.setdefault(scope, index)
            if _is_attention(node):
                counts[scope] = counts.get(scope, 0) + 1
    single = {s for s, c in counts.items() if c == 1}
    outer = [s for s in single if not any(s.startswith(p + ".") for p in single)]
    return sorted(outer, key=lambda s: first[s])


def with_scope_outputs(gm: fx.GraphModule, scopes: list[str], who: str = "vitqc") -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s modules whose output is (original output, *last value of each scope)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output_node = None
    for node in gm.graph.nodes:
        if node.op == "output":
            output_node = node
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    last = last_nodes(gm.graph, scopes)
    missing = [s for s in scopes if s not in last]
    if missing:
        raise VitqcError(f"{who}: no graph node belongs to {missing[0]!r}; set {who}.features")
    original = fx.graph.map_arg(output_node.args[0], lambda n: env[n])
    graph.output((original, *[env[last[s]] for s in scopes]))
    return fx.GraphModule(gm, graph)
