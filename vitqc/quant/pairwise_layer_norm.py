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
from torch import Tensor

__all__ = ["pairwise_sum", "pairwise_layer_norm", "sqrt_rn"]


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

