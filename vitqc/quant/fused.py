"""Fused fake-quantization for training: one forward pass and one analytic backward per quantizer.

:class:`~vitqc.quant.quantizer.UniformQuantizer` writes its forward with plain tensor ops (straight-through
rounding, LSQ gradient scaling) so that ``torch.export`` can capture it. Under autograd those ops record a dozen
element-wise kernels per quantizer and keep their temporaries for backward. The functions here compute the
same values with a few in-place passes, keep the input, the output (which the consuming linear or matmul keeps
for its own backward anyway) and a one-byte in-range mask, and need four passes in backward.

It saves memory kept for backward and per-quantizer time; whether the whole step gets faster depends on what
dominates it (measured: docs/findings.md, "Fused fake-quant"; benchmarks/results/joint_throughput-*.json).
Under autocast the codes are computed in float32 (see ``_f32``), which the plain path does not do.

The gradients:

* ``x`` gets the clipped straight-through gradient: ``grad`` where the code is inside ``[qmin, qmax]``, else 0;
* the step ``s`` gets LSQ's ``sum(grad * (q - x/s))`` over in-range values and ``sum(grad * (qclamped - z))``
  over clipped ones, times the LSQ gradient scale, and only where ``s`` is above the smallest scale;
* an asymmetric zero point gets ``-s * sum(grad)`` over clipped values (the rounded, clamped zero point passes
  the gradient straight through while it lies in ``[qmin, qmax]``);
* per token (dynamic), the row ranges are statistics of the input (no gradient); the learnable clip ratio
  gets the rows' step gradients times ``range / (qmax - qmin)``.

These are exactly the gradients autograd derives from the plain form (tests/quant/test_fused.py compares
them); only float rounding differs (``grad * s / s`` becomes ``grad``). Values are bit-identical in float32.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from vitqc.quant.intops import token_qparams

__all__ = ["fake_quant_static", "fake_quant_token", "fused_enabled", "fused_fake_quant"]

_ENABLED = True


def fused_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def fused_fake_quant(enabled: bool) -> Iterator[None]:
    """Switch the fused training path on or off inside the block (benchmarks and tests compare both)."""
    global _ENABLED
    saved, _ENABLED = _ENABLED, bool(enabled)
    try:
        yield
    finally:
        _ENABLED = saved


def _f32(x: Tensor) -> Tensor:
    """Codes are computed in float32 even when autocast hands the quantizer bf16/fp16 activations: a bf16
    ``x / s`` cannot hold a code and its fraction (8 bits of mantissa), and the materialized integer program
    computes its codes in float32 too. (The plain path, used for export in float32, needs no such cast.)"""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _reduce_to(t: Tensor, like: Tensor) -> Tensor:
    """Sum ``t`` over the dimensions that ``like`` broadcasts (0-d: everything)."""
    if like.dim() == 0:
        return t.sum()
    dims = [i for i, n in enumerate(like.shape) if n == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


def _fake_quant_forward(x: Tensor, s: Tensor, z: Tensor | None, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """``(out, clipped)``: ``out = (clamp(round(x/s) + z, qmin, qmax) - z) * s`` in float32, built in place on one
    fresh tensor, and ``clipped``, whether each code lay outside ``[qmin, qmax]`` before the clamp (for backward:
    ``masked_fill(clipped, 0)`` is one kernel where ``where(inside, t, 0.0)`` is two, the 0.0 becoming a tensor)."""
    q = torch.div(_f32(x), s).round_()
    if z is not None:
        q = q.add_(z)
    qc = q.clamp(qmin, qmax)
    clipped = q != qc
    if z is not None:
        qc = qc.sub_(z)
    return qc.mul_(s), clipped


def _step_grad(grad: Tensor, x: Tensor, out: Tensor, clipped: Tensor, s: Tensor, like: Tensor) -> Tensor:
    """``sum(grad * d out/d s)`` reduced to ``like``'s shape. Per element ``d out / d s`` is ``q - z - x/s``
    inside the range and ``clamp(q) - z`` outside, i.e. ``(out - inside * x) / s``; ``s`` is constant over each
    reduced group, so the division comes after the sum: four passes over the data, nothing recomputed."""
    d = out - _f32(x).masked_fill(clipped, 0.0)
    return _reduce_to(d.mul_(grad), like) / s


class _FakeQuantStatic(torch.autograd.Function):
    """Tensor or channel granularity: ``s`` and ``z`` are already shaped to broadcast against ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, eps: float,
                lsq: float) -> Tensor:
        s = scale.clamp_min(eps)
        z = None if zero_point is None else zero_point.round().clamp(qmin, qmax)
        out, clipped = _fake_quant_forward(x, s, z, qmin, qmax)
        # `out` is what the consuming linear / matmul keeps for its own backward anyway: saving it costs nothing
        ctx.save_for_backward(x, out, clipped, scale, zero_point)
        ctx.consts = (qmin, qmax, eps, lsq)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out, clipped, scale, zero_point = ctx.saved_tensors
        qmin, qmax, eps, lsq = ctx.consts
        s = scale.clamp_min(eps)
        grad = grad.float() if grad.dtype != out.dtype else grad
        grad_x = grad_scale = grad_zp = None
        grad_in = grad.masked_fill(clipped, 0.0)
        if ctx.needs_input_grad[0]:
            grad_x = grad_in.to(x.dtype)
        if ctx.needs_input_grad[1]:
            g = _step_grad(grad, x, out, clipped, s, scale)
            grad_scale = (g * lsq).masked_fill_(scale < eps, 0.0)
        if zero_point is not None and ctx.needs_input_grad[2]:
            # clipped values' gradient = all of it minus the inside part
            g = (_reduce_to(grad, zero_point) - _reduce_to(grad_in, zero_point)) * -s
            zr = zero_point.round()
            grad_zp = g.masked_fill_((zr < qmin) | (zr > qmax), 0.0)
        return grad_x, grad_scale, grad_zp, None, None, None, None


class _FakeQuantToken(torch.autograd.Function):
    """Dynamic per-token (rows of the last dim) with a learnable clip ratio, as ``_forward_token``."""

    @staticmethod
    def forward(ctx, x: Tensor, clip_ratio: Tensor, qmin: int, qmax: int, symmetric: bool, eps: float,
                lsq: float) -> Tensor:
        r = clip_ratio.clamp_min(eps)
        s_raw, s, z = token_qparams(_f32(x), r, qmin, qmax, symmetric)
        span = s_raw / r  # d s_raw / d r: the row's range over the number of levels
        out, clipped = _fake_quant_forward(x, s, z, qmin, qmax)
        ctx.save_for_backward(x, out, clipped, clip_ratio, span, s_raw, s)
        ctx.consts = (qmin, qmax, eps, lsq)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, out, clipped, clip_ratio, span, s_raw, s = ctx.saved_tensors
        qmin, qmax, eps, lsq = ctx.consts
        grad = grad.float() if grad.dtype != out.dtype else grad
        grad_x = grad_ratio = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.masked_fill(clipped, 0.0).to(x.dtype)
        if ctx.needs_input_grad[1]:
            g_rows = _step_grad(grad, x, out, clipped, s, s)
            g = (g_rows.masked_fill_(s_raw < eps, 0.0) * span).sum()
            grad_ratio = (g * lsq).masked_fill_(clip_ratio < eps, 0.0)
        return grad_x, grad_ratio, None, None, None, None, None


def fake_quant_static(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, eps: float,
                      lsq: float) -> Tensor:
    """``(clamp(round(x/s) + z, qmin, qmax) - z) * s`` with ``s = scale.clamp_min(eps)`` and
    ``z = clamp(round(zero_point))`` (None: symmetric); ``lsq`` multiplies the step's gradient."""
    return _FakeQuantStatic.apply(x, scale, zero_point, qmin, qmax, eps, lsq)


def fake_quant_token(x: Tensor, clip_ratio: Tensor, qmin: int, qmax: int, symmetric: bool, eps: float,
                     lsq: float) -> Tensor:
    """Dynamic per-token fake quantization with a learnable clip ratio (see ``UniformQuantizer``)."""
    return _FakeQuantToken.apply(x, clip_ratio, qmin, qmax, symmetric, eps, lsq)
