"""LayerNorm as a materialized program computes it: sums in one fixed order, a correctly rounded square root.

Why not ATen's ``layer_norm``? Its mean and variance are sums in the order of its own vectorized kernel, and an
XNNPACK ``.pte`` sums in the order of its (CPU-dependent) reduction kernels; both round, differently, and a
quantized network turns last-bit differences into different activation codes downstream, enough to move argmaxes
(``benchmarks/executorch_pte.py float-sensitivity``). Square roots differ too: neither ATen's vectorized ``sqrt`` nor XNNPACK's x86 one is
correctly rounded. So a materialized program defines LayerNorm over the last dim ``C`` with operations whose every
result IEEE 754 fixes:

* ``pairwise_sum``: halves added elementwise (``x[..., :C/2] + x[..., C/2:]``) while the width is even, then the
  odd rest left to right: each addition one correctly rounded float32 add, the order fixed by the graph;
* ``mean = sum / C``, ``d = x - mean``, ``var = pairwise_sum(d * d) / C``;
* ``d / sqrt(var + eps)``, the square root correctly rounded (computed in float64 and rounded once, which is
  exact for a float32 square root); then ``* weight + bias``.

An ExecuTorch ``.pte`` runs the additions, divisions and products in XNNPACK (whose float32 elementwise ops are
IEEE's) and the square root, one value per row, in ExecuTorch's portable kernel (``std::sqrt``, correctly rounded):
the program's values exactly.
(measured costs and effects: docs/findings.md, "Float ops a backend reproduces").
"""
from __future__ import annotations

import torch
from torch import Tensor, fx

__all__ = ["pairwise_sum", "pairwise_layer_norm", "sqrt_rn", "pairwise_sum_nodes"]


def pairwise_sum(x: Tensor) -> Tensor:
    """Sum over the last dim (kept, size 1) in the fixed order described in the module docstring."""
    n = x.shape[-1]
    while n > 1 and n % 2 == 0:
        n //= 2
        x = x[..., :n] + x[..., n:]
    total = x[..., :1]
    for i in range(1, n):
        total = total + x[..., i:i + 1]
    return total


def sqrt_rn(v: Tensor) -> Tensor:
    """The correctly rounded float32 square root (float64's is correctly rounded, and 53 >= 2 * 24 + 2 bits make
    the second rounding exact)."""
    return torch.sqrt(v.double()).float()


def pairwise_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim of ``x`` (float32), as the module docstring defines it."""
    c = x.shape[-1]
    d = x - pairwise_sum(x) / c
    y = d / sqrt_rn(pairwise_sum(d * d) / c + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _slice_of(src: fx.Node, start: int, stop: int) -> fx.Node | None:
    """The user of ``src`` that is ``src[..., start:stop]`` (an exported ``aten.slice.Tensor`` over the last dim;
    ``stop`` may be written as anything at or past the width)."""
    val = src.meta.get("val")
    if val is None:
        return None
    last, width = val.dim() - 1, val.shape[-1]
    for u in src.users:
        if u.target is torch.ops.aten.slice.Tensor and len(u.args) >= 3 and u.args[1] in (last, -1) \
                and u.args[2] == start and min(u.args[3] if len(u.args) > 3 else width, width) == stop:
            return u
    return None


def _add_of(a: fx.Node | None, b: fx.Node | None) -> fx.Node | None:
    """The node ``add(a, b)`` (in that order), if both exist and it does."""
    if a is None or b is None:
        return None
    return next((u for u in a.users if u.target is torch.ops.aten.add.Tensor and u.args == (a, b)), None)


def pairwise_sum_nodes(g: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """``(input, output)`` of each :func:`pairwise_sum` in an exported (ATen) graph of rank >= 2 over a width of at
    least 2, found by following its slices and adds from the input as :func:`pairwise_sum` makes them. (Each
    level of a sum is the input of the rest of it: only the whole sum, from its first input, is returned.)"""
    found: dict[fx.Node, fx.Node] = {}
    for src in g.nodes:
        val = src.meta.get("val")
        if not isinstance(val, Tensor) or val.dim() < 2 or val.shape[-1] < 2:
            continue
        cur, n = src, int(val.shape[-1])
        while cur is not None and n > 1 and n % 2 == 0:
            n //= 2
            cur = _add_of(_slice_of(cur, 0, n), _slice_of(cur, n, 2 * n))
        if cur is None:
            continue
        if n == 1:  # x[..., :1] of a width-1 sum: exported as a slice, an alias, or nothing
            total = _slice_of(cur, 0, 1) or next((u for u in cur.users if u.target is torch.ops.aten.alias.default),
                                                 cur)
        else:
            total = _slice_of(cur, 0, 1)
            for i in range(1, n):
                total = _add_of(total, _slice_of(cur, i, i + 1))
        if total is not None and total not in found:
            found[total] = src
    return [(src, total) for total, src in found.items()]
