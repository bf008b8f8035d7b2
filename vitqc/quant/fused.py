"""Fused fake-quantization for training: one forward pass and one analytic backward per quantizer.

:class:`~vitqc.quant.quantizer.UniformQuantizer` writes its forward with plain tensor ops (straight-through
rounding, LSQ gradient scaling) so that ``torch.export`` can capture it. Under autograd those ops cost a dozen
element-wise kernels and as many saved tensors per quantizer per step, forward and backward; in a joint
optimization step of a W4A4 ViT-S they took about half the student's time. The functions here compute the same
values and the same gradients with a few in-place passes forward, saving only the input, and recompute the
codes in backward:

* ``x`` gets the clipped straight-through gradient: ``grad`` where the code is inside ``[qmin, qmax]``, else 0;
* the step ``s`` gets LSQ's ``sum(grad * (q - x/s))`` over in-range values and ``sum(grad * (qclamped - z))``
  over clipped ones, times the LSQ gradient scale, and only where ``s`` is above the smallest scale;
* an asymmetric zero point gets ``-s * sum(grad)`` over clipped values (the rounded, clamped zero point passes
  the gradient straight through while it lies in ``[qmin, qmax]``);
* per token (dynamic), the row ranges are statistics of the input (no gradient); the learnable clip ratio
  gets the rows' step gradients times ``range / (qmax - qmin)``.

These are exactly the gradients autograd derives from the plain form (tests/quant/test_fused.py compares
them); only float rounding differs (``grad * s / s`` becomes ``grad``). Values are bit-identical.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

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


def _backward_terms(x: Tensor, s: Tensor, z: Tensor | None, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """``(inside, d out / d s)`` per element, recomputing the codes with the forward's float ops.

    ``inside``: the code ``round(x/s) + z`` lies in ``[qmin, qmax]`` (it equals its clamp). The step term is
    ``q - z - x/s`` inside the range and ``clamp(q) - z`` outside, i.e. ``clamp(q) - z - inside * x/s``.
    """
    t = _f32(x) / s
    q = t.round()
    if z is not None:
        q = q.add_(z)
    qc = q.clamp(qmin, qmax)
    inside = q == qc
    if z is not None:
        qc = qc.sub_(z)
    return inside, qc.sub_(torch.where(inside, t, 0.0))


def _fake_quant_forward(x: Tensor, s: Tensor, z: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """``(clamp(round(x/s) + z, qmin, qmax) - z) * s`` in place on one fresh tensor, in ``x``'s dtype."""
    out = torch.div(_f32(x), s).round_()
    if z is not None:
        out = out.add_(z).clamp_(qmin, qmax).sub_(z)
    else:
        out = out.clamp_(qmin, qmax)
    return out.mul_(s).to(x.dtype)


class _FakeQuantStatic(torch.autograd.Function):
    """Tensor or channel granularity: ``s`` and ``z`` are already shaped to broadcast against ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, eps: float,
                lsq: float) -> Tensor:
        s = scale.clamp_min(eps)
        z = None if zero_point is None else zero_point.round().clamp(qmin, qmax)
        out = _fake_quant_forward(x, s, z, qmin, qmax)
        ctx.save_for_backward(x, scale, zero_point)
        ctx.consts = (qmin, qmax, eps, lsq)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax, eps, lsq = ctx.consts
        s = scale.clamp_min(eps)
        zr = None if zero_point is None else zero_point.round()
        z = None if zr is None else zr.clamp(qmin, qmax)
        grad = grad.float() if grad.dtype != s.dtype else grad
        inside, step_term = _backward_terms(x, s, z, qmin, qmax)
        grad_x = grad_scale = grad_zp = None
        grad_in = torch.where(inside, grad, 0.0)
        if ctx.needs_input_grad[0]:
            grad_x = grad_in.to(x.dtype)
        if ctx.needs_input_grad[1]:
            g = _reduce_to(step_term.mul_(grad), scale)
            grad_scale = torch.where(scale >= eps, g * lsq, 0.0)
        if zero_point is not None and ctx.needs_input_grad[2]:
            # clipped values' gradient = all of it minus the inside part
            g = (_reduce_to(grad, zero_point) - _reduce_to(grad_in, zero_point)) * -s
            grad_zp = torch.where((zr >= qmin) & (zr <= qmax), g, 0.0)
        return grad_x, grad_scale, grad_zp, None, None, None, None


class _FakeQuantToken(torch.autograd.Function):
    """Dynamic per-token (rows of the last dim) with a learnable clip ratio, as ``_forward_token``."""

    @staticmethod
    def forward(ctx, x: Tensor, clip_ratio: Tensor, qmin: int, qmax: int, symmetric: bool, eps: float,
                lsq: float) -> Tensor:
        r = clip_ratio.clamp_min(eps)
        xf = _f32(x)
        # the same op order as UniformQuantizer._forward_token (r * range / levels), so the same scales
        if symmetric:
            amax = xf.abs().amax(-1, keepdim=True)
            s_raw, span = r * amax / qmax, amax / qmax
            s = s_raw.clamp_min(eps)
            z = None
        else:
            lo, hi = xf.aminmax(dim=-1, keepdim=True)
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
            s_raw, span = r * (hi - lo) / (qmax - qmin), (hi - lo) / (qmax - qmin)
            s = s_raw.clamp_min(eps)
            z = (qmin - torch.round(r * lo / s)).clamp(qmin, qmax)
        out = _fake_quant_forward(x, s, z, qmin, qmax)
        ctx.save_for_backward(x, clip_ratio, span, s_raw, s, z)
        ctx.consts = (qmin, qmax, eps, lsq)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, clip_ratio, span, s_raw, s, z = ctx.saved_tensors
        qmin, qmax, eps, lsq = ctx.consts
        grad = grad.float() if grad.dtype != s.dtype else grad
        inside, step_term = _backward_terms(x, s, z, qmin, qmax)
        grad_x = grad_ratio = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(inside, grad, 0.0).to(x.dtype)
        if ctx.needs_input_grad[1]:
            g_rows = step_term.mul_(grad).sum(-1, keepdim=True)
            g = (torch.where(s_raw >= eps, g_rows, 0.0) * span).sum()
            grad_ratio = torch.where(clip_ratio >= eps, g * lsq, 0.0)
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
