"""Integer kernels: the arithmetic that defines a materialized (quantized) vitqc model.

A materialized graph computes every quantized linear, patch-embedding conv and attention matmul in integer
arithmetic: activation codes (computed with exactly the fake-quantizer's float ops), an exact integer GEMM,
then one float rescale. The packed backend calls these same functions on unpacked weights, so the packed
model is bit-identical to the artifact's program, not merely close to it.

Why not the fake-quant form (dequantize, then an fp32 GEMM)? Its accumulation rounds, and a quantized
network turns rounding differences into different activation codes downstream (how many argmaxes move:
docs/findings.md, "Integer arithmetic"; benchmarks/backend_latency.py --agreement). Any kernel whose accumulation
differs would inherit that disagreement; integer accumulation is exact, so every implementation of it agrees.

Exactness: ``int8_matmul`` accumulates in int32 (``torch._int_mm`` on CPU and CUDA) or in float64 elsewhere (exact for
any K below 2^37 / 128^2), then converts to float32 once. The attention matmuls multiply integer codes in
float32, exact while ``K * max|a| * max|b| < 2^24`` (head dim or token count K <= 258 at 8 bits; every
ViT here), because PyTorch has no batched int8 GEMM on CPU.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["EPS", "token_qparams", "act_codes", "int8_matmul", "padded_int_mm", "integer_linear", "patches", "integer_matmul", "shift_for"]

EPS = 1e-8  # the smallest scale a quantizer uses (UniformQuantizer's _EPS)


def shift_for(qmax: int) -> int:
    """Subtracted from codes so that they fit int8: only the asymmetric 8-bit grid [0, 255] needs it."""
    return 128 if qmax > 127 else 0


def token_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` per row of the last dim for asymmetric per-token grids: the row's min and max, widened to
    include 0 (so that 0 is exactly representable)."""
    return x.amin(-1, keepdim=True).clamp(max=0.0), x.amax(-1, keepdim=True).clamp(min=0.0)


def token_qparams(x: Tensor, ratio: Tensor | float, qmin: int, qmax: int,
                  symmetric: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(s_raw, s, z)`` per row of the last dim for dynamic per-token quantization with clip ratio ``ratio``:
    ``s_raw = ratio * range / levels``, ``s = max(s_raw, EPS)``, ``z = clamp(qmin - round(ratio * lo / s))``
    (None when symmetric). The one definition that training (plain and fused), the clip-ratio search and the
    integer kernels share: the same float ops in the same order, so the same codes everywhere."""
    if symmetric:
        s_raw = ratio * x.abs().amax(-1, keepdim=True) / qmax
        return s_raw, s_raw.clamp_min(EPS), None
    lo, hi = token_range(x)
    s_raw = ratio * (hi - lo) / (qmax - qmin)
    s = s_raw.clamp_min(EPS)
    return s_raw, s, (qmin - torch.round(ratio * lo / s)).clamp(qmin, qmax)


def act_codes(x: Tensor, *, granularity: str, qmin: int, qmax: int, symmetric: bool, scale: Tensor | None = None,
              zero_point: Tensor | None = None, clip_ratio: Tensor | None = None,
              shift: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(q - shift, s, z)``: float integer codes ``clamp(round(x/s) + z, qmin, qmax)`` with exactly the
    fake-quantizer's float ops, the scale (0-d, or ``[..., 1]`` per token) and zero point (same shape).

    ``scale`` must already be clamped to >= EPS and ``zero_point`` rounded and clamped (as
    ``UniformQuantizer.scale_tensor`` / ``zero_point_tensor`` give them); per token, ``clip_ratio`` is the
    learned ratio. Integers in fp32 are exact, so folding ``shift`` into the clamp changes nothing.
    """
    if granularity == "tensor":
        assert scale is not None and zero_point is not None
        s, z = scale, zero_point
        v = torch.round(x / s)
        if symmetric:
            q = torch.clamp(v, qmin, qmax)
            return (q - shift if shift else q), s, z
        return torch.clamp(v + (z - shift), qmin - shift, qmax - shift), s, z
    if granularity != "token":
        raise ValueError(f"integer activation codes need tensor or token granularity, not {granularity!r}")
    assert clip_ratio is not None
    _, s, z = token_qparams(x, clip_ratio.clamp_min(EPS), qmin, qmax, symmetric)
    if z is None:
        q = torch.clamp(torch.round(x / s), qmin, qmax)
        return (q - shift if shift else q), s, torch.zeros_like(s)
    return torch.clamp(torch.round(x / s) + (z - shift), qmin - shift, qmax - shift), s, z


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for int8 ``a`` [M, K] and ``b`` [K, N], exact, as float32 (one rounding of the exact sum): int32
    accumulation by ``torch._int_mm`` on CPU and CUDA, float64 on other devices."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b).to(torch.float32)
    if a.device.type == "cuda":
        return padded_int_mm(a, b).to(torch.float32)
    return float64_matmul(a, b)


def padded_int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``torch._int_mm`` for any shape: CUDA's wants M > 16 and K, N multiples of 8, so ``a`` and ``b`` get
    zero rows / columns (which add nothing to any sum) and the result is cut back to [M, N]. ``a`` always gets
    16 rows more: M > 16 then holds with no branch on M, which ``torch.export`` keeps symbolic (dynamic batch)."""
    m, k = a.shape
    n = b.shape[1]
    pad_k, pad_n = -k % 8, -n % 8
    a = torch.nn.functional.pad(a, (0, pad_k, 0, 16))
    if pad_k or pad_n:  # pad b as [N, K] and transpose back: a weight's ``w.t()`` stays column-major
        b = torch.nn.functional.pad(b.t(), (0, pad_k, 0, pad_n)).t()
    return torch._int_mm(a, b)[:m, :n]


def float64_matmul(a: Tensor, b: Tensor) -> Tensor:
    """The off-CPU path of :func:`int8_matmul`: exact in float64 (int8 products summed over K < 2^38)."""
    return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.float32)


def integer_linear(x2: Tensor, act, weight: Tensor, weight_scale: Tensor, weight_zero_point: Tensor | None,
                   weight_sum: Tensor, bias: Tensor | None) -> Tensor:
    """``x2`` [M, K] float -> [M, N] float: activation codes x int8 weight codes [N, K], zero points folded.

    ``act`` is an activation quantizer (anything with ``codes(x, shift)``, ``qmax`` and ``zero_free``);
    ``weight_zero_point`` [N] int32 is None for symmetric weights; ``weight_sum`` [N] int32 is
    ``rowsum(weight) - K * weight_zero_point``. With ``a`` the shifted activation codes and ``za`` their zero
    point: ``sum_k (a - za)(w - zw) = a w^T - zw rowsum(a) - za (rowsum(w) - K zw)``.
    """
    shift = shift_for(act.qmax)
    q, s, z = act.codes(x2, shift)
    a = q.to(torch.int8)
    acc = int8_matmul(a, weight.t())
    if weight_zero_point is not None:
        acc = acc - a.to(torch.float32).sum(1, keepdim=True) * weight_zero_point.to(torch.float32)
    out_scale = s * weight_scale
    offset = bias
    if not act.zero_free:  # the activation zero-point term, applied after scaling: one [N] (or [M, N]) term
        correction = ((z - shift if shift else z) * weight_sum.to(torch.float32)) * out_scale
        offset = -correction if offset is None else offset - correction
    return acc * out_scale if offset is None else torch.addcmul(offset, acc, out_scale)


def patches(x: Tensor, kh: int, kw: int) -> tuple[Tensor, int, int]:
    """Non-overlapping ``kh x kw`` patches of ``x`` [B, C, H, W] as rows [B * Ho * Wo, C * kh * kw]."""
    b, c, h, w = x.shape
    ho, wo = h // kh, w // kw
    x = x[:, :, :ho * kh, :wo * kw]
    rows = x.reshape(b, c, ho, kh, wo, kw).permute(0, 2, 4, 1, 3, 5).reshape(b * ho * wo, c * kh * kw)
    return rows, ho, wo


def integer_matmul(a: Tensor, b: Tensor, lhs, rhs) -> Tensor:
    """``Q(a) @ Q(b)`` on centered integer codes (fp32 GEMM of integers, exact below 2^24), then one rescale.
    A per-token quantized right operand varies along the contraction and is dequantized before the GEMM."""
    qa, sa, za = lhs.codes(a)
    qb, sb, zb = rhs.codes(b)
    ca = qa if lhs.zero_free else qa - za
    cb = qb if rhs.zero_free else qb - zb
    if rhs.granularity == "token":
        return torch.matmul(ca, cb * sb) * sa
    return torch.matmul(ca, cb) * (sa * sb)
