"""GELU as a materialized program computes it: XNNPACK's rational approximation of erf, bit for bit.

Why not ATen's ``gelu``? Its erf is its own (an Abramowitz-Stegun formula around Sleef's ``expf`` on x86; other
code elsewhere), so two implementations of "GELU" differ in the last bits of many outputs, and a quantized network
turns last-bit differences into different activation codes downstream, enough to move argmaxes
(``benchmarks/executorch_pte.py float-sensitivity``). A materialized program therefore defines GELU as the one
formula XNNPACK computes on every CPU it targets with FMA (x86 FMA3 and AVX-512, aarch64 NEON:
``src/f32-vgelu/rational-12-10.c.in``, the ``*_rational_12_10_div`` kernels): clamp to +-5.1638283730, a degree
11/10 rational in x with the Horner steps as fused multiply-adds, one division, ``(x * 0.5) * (erf + 1)``. An
ExecuTorch ``.pte`` then runs XNNPACK's own GELU kernel on it and gets the program's values exactly.

The fused multiply-adds are ``torch.addcmul``: ATen's CPU kernels built for AVX2 / AVX-512 and its CUDA kernels
round ``a + b * c`` once. :func:`fma_is_fused` checks that on a device (a torch build without FMA kernels rounds
twice, and GELU then differs from XNNPACK's in the last bit on some inputs: said, not silent).

Cost: about 20 elementwise passes where ATen's GELU makes one (docs/findings.md, "Float ops a backend
reproduces"). A program run in PyTorch (``Artifact.quantized``, the packed backend) computes it with :func:`rational_gelu_fast`
instead: the same operations in place, on cache-sized chunks, the same values.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor, fx

__all__ = ["rational_gelu", "rational_gelu_fast", "fma_is_fused", "GELU_LIMIT", "is_erf_gelu", "rational_gelu_nodes",
           "replace_rational_gelus", "fast_rational_gelus"]

CHUNK = 1 << 18  # elements per chunk of rational_gelu_fast: its few buffers stay in a CPU's L2/L3

# XNNPACK src/f32-vgelu/rational-12-10.c.in, FMA variant: erf(x / sqrt(2)) ~ x * P(x^2) / Q(x^2) on |x| <= LIMIT
GELU_LIMIT = 5.1638283730e+00
_ALPHA = (7.9788452387e-01, 6.6972173750e-02, 9.3065137044e-03, 3.2973114867e-04, 1.2609783880e-05,
          4.5835321316e-08)  # numerator, x^1 .. x^11
_BETA = (1.0, 2.5060352683e-01, 2.8431978077e-02, 1.8622842617e-03, 7.2267655923e-05,
         1.1988805682e-06)  # denominator, x^0 .. x^10


def _horner(x2: Tensor, coefficients: tuple[float, ...], out: Tensor | None = None) -> Tensor:
    """``c[0] + x2 * (c[1] + x2 * (...))`` with every step one fused multiply-add, highest degree first (into
    ``out`` when given)."""
    c = [x2.new_full((), v) for v in coefficients]
    acc = torch.addcmul(c[-2], x2, c[-1], out=out) if out is not None else torch.addcmul(c[-2], x2, c[-1])
    for v in reversed(c[:-2]):
        acc = torch.addcmul(v, x2, acc, out=acc) if out is not None else torch.addcmul(v, x2, acc)
    return acc


def rational_gelu(x: Tensor) -> Tensor:
    """GELU (erf form) as XNNPACK's ``f32-vgelu`` rational kernels compute it (float32)."""
    v = torch.clamp(x, -GELU_LIMIT, GELU_LIMIT)
    v2 = v * v
    erf = (v * _horner(v2, _ALPHA)) / _horner(v2, _BETA)
    return (x * 0.5) * (erf + 1.0)


def _rational_gelu_into(x: Tensor, out: Tensor, scratch: Tensor) -> None:
    """:func:`rational_gelu` of ``x`` written into ``out`` (``scratch``: a buffer like it), op for op."""
    v = torch.clamp(x, -GELU_LIMIT, GELU_LIMIT)
    v2 = v * v
    _horner(v2, _ALPHA, out)
    _horner(v2, _BETA, scratch)
    out.mul_(v).div_(scratch).add_(1.0)
    torch.mul(x, 0.5, out=scratch)
    out.mul_(scratch)


def rational_gelu_fast(x: Tensor) -> Tensor:
    """:func:`rational_gelu`, the same values, computed in place on chunks of :data:`CHUNK` elements (fewer
    allocations and passes over memory: for running a program in PyTorch, not for export)."""
    flat = x.detach().reshape(-1)
    out = torch.empty_like(flat)
    scratch = torch.empty_like(flat[:CHUNK])
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start:start + CHUNK]
        _rational_gelu_into(part, out[start:start + CHUNK], scratch[:part.numel()])
    return out.view(x.shape)


def rational_gelu_nodes(g: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """``(input, output)`` of each :func:`rational_gelu` in an exported (ATen) graph, found by its clamp to
    +-GELU_LIMIT (``clamp(x, -L, L)``) and its last op, ``mul(mul(x, 0.5), add(div(p, q), 1.0))``."""
    aten = torch.ops.aten
    found = []
    for clamp in [n for n in g.nodes if n.op == "call_function" and n.target is aten.clamp.default]:
        if len(clamp.args) != 3 or clamp.args[1:] != (-GELU_LIMIT, GELU_LIMIT):
            continue
        x = clamp.args[0]
        for half in [u for u in x.users if u.target is aten.mul.Tensor and u.args == (x, 0.5)]:
            out = next(iter(half.users)) if len(half.users) == 1 else None
            if out is None or out.target is not aten.mul.Tensor or out.args[0] is not half:
                continue
            plus = out.args[1]
            if isinstance(plus, fx.Node) and plus.target is aten.add.Tensor and plus.args[1] == 1.0 \
                    and isinstance(plus.args[0], fx.Node) and plus.args[0].target is aten.div.Tensor:
                found.append((x, out))
    return found


def replace_rational_gelus(g: fx.Graph, target: Callable[..., Any]) -> int:
    """Replace each :func:`rational_gelu` of an exported graph (:func:`rational_gelu_nodes`) by one node calling
    ``target`` on its input; the ops between die with it."""
    found = rational_gelu_nodes(g)
    for x, out in found:
        with g.inserting_before(out):
            new = g.call_function(target, (x,))
        new.meta["val"] = out.meta.get("val")
        out.replace_all_uses_with(new)
    if found:
        g.eliminate_dead_code()
    return len(found)


def fast_rational_gelus(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` (an exported program's module) with its GELUs computed by :func:`rational_gelu_fast`: the same
    values, faster in PyTorch."""
    if replace_rational_gelus(gm.graph, rational_gelu_fast):
        gm.recompile()
    return gm


def is_erf_gelu(module_or_fn: object, kwargs: dict | None = None) -> bool:
    """Whether a graph node's target (``nn.GELU`` module, ``F.gelu`` or ``aten.gelu``) is GELU's erf form (the
    ``tanh`` approximation is another function and is left as it is)."""
    approximate = getattr(module_or_fn, "approximate", None) or (kwargs or {}).get("approximate", "none")
    return approximate == "none"


@functools.lru_cache(maxsize=None)
def fma_is_fused(device: str = "cpu") -> bool:
    """Whether ``torch.addcmul`` rounds once on ``device`` (a fused multiply-add), as :func:`rational_gelu` needs
    for XNNPACK's values: ``(1 + 2^-12)^2 - (1 + 2^-11)`` is ``2^-24`` fused and 0 rounded twice. Checked at a
    vector length and at a tail length."""
    ok = True
    for n in (64, 37):
        a = torch.full((n,), 1.0 + 2.0**-12, device=device)
        c = torch.full((), -(1.0 + 2.0**-11), device=device)
        ok &= bool((torch.addcmul(c, a, a) == 2.0**-24).all())
    return ok
