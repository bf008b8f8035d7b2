"""Range search: quantization parameters for a value range, and the clipping searches that choose the range
(min-max, percentile, MSE) from observed samples. Pure functions of tensors; conventions in
:mod:`vitqc.quant.quantizer`."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vitqc.quant.intops import EPS, token_qparams

__all__ = ["qparams_for_range", "hard_fake_quant", "quantile", "percentile_range", "mse_range", "token_clip_ratio",
           "MSE_GRID"]

MSE_GRID = 100  # number of clipping ratios tried by the mse search, linspace(0.01, 1)


def qparams_for_range(lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Scale (>= EPS) and integer-valued zero point for the range [lo, hi]."""
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        s = amax / qmax
        s = torch.where(s > EPS, s, torch.full_like(s, EPS))
        return s, torch.zeros_like(s)
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    s = (hi - lo) / (qmax - qmin)
    s = torch.where(s > EPS, s, torch.full_like(s, EPS))
    z = (qmin - torch.round(lo / s)).clamp(qmin, qmax)
    return s, z


def hard_fake_quant(x: Tensor, s: Tensor, z: Tensor, qmin: int, qmax: int) -> Tensor:
    """Fake quantization without gradient tricks (what the searches score)."""
    return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s


def quantile(x: Tensor, q: float, dim: int = -1) -> Tensor:
    """Linear-interpolation quantile along ``dim`` (``torch.quantile`` refuses inputs above 16M elements)."""
    n = x.shape[dim]
    srt = x.sort(dim=dim).values
    pos = q * (n - 1)
    i0 = int(math.floor(pos))
    i1 = min(i0 + 1, n - 1)
    frac = pos - i0
    v0 = srt.select(dim, i0)
    v1 = srt.select(dim, i1)
    return v0 + (v1 - v0) * frac


def _token_fake_quant(x: Tensor, ratio: Tensor | float, qmin: int, qmax: int, symmetric: bool) -> Tensor:
    """Hard dynamic per-token fake quantization (rows of the last dim), for the clip-ratio search."""
    _, s, z = token_qparams(x, ratio, qmin, qmax, symmetric)
    if z is None:
        return torch.clamp(torch.round(x / s), qmin, qmax) * s
    return hard_fake_quant(x, s, z, qmin, qmax)


def percentile_range(samples: Tensor, percentile: float, symmetric: bool) -> tuple[Tensor, Tensor]:
    """[lo, hi] at the ``percentile`` of ``samples`` along the last dim (per row for channel samples)."""
    p = percentile / 100.0
    if symmetric:
        amax = quantile(samples.abs(), p)
        return -amax, amax
    return quantile(samples, 1.0 - p), quantile(samples, p)


def mse_range(samples: Tensor, lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool,
              per_channel: bool) -> tuple[Tensor, Tensor]:
    """Best ``alpha * [lo, hi]`` over a grid of clipping ratios (per row of ``samples`` when ``per_channel``)."""
    alphas = torch.linspace(0.01, 1.0, MSE_GRID).tolist()
    col = (lambda t: t.unsqueeze(1)) if per_channel else (lambda t: t)
    best_err: Tensor | None = None
    best_alpha = torch.ones_like(lo)
    for a in alphas:
        s, z = qparams_for_range(lo * a, hi * a, qmin, qmax, symmetric)
        err = (hard_fake_quant(samples, col(s), col(z), qmin, qmax) - samples).pow(2)
        err = err.mean(1) if per_channel else err.mean()
        if best_err is None:
            best_err, best_alpha = err, torch.full_like(lo, a)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_alpha = torch.where(better, torch.full_like(lo, a), best_alpha)
    return lo * best_alpha, hi * best_alpha


def token_clip_ratio(rows: Tensor, method: str, percentile: float, qmin: int, qmax: int, symmetric: bool) -> float:
    """The per-tensor clip ratio of a dynamic per-token quantizer, from observed token ``rows``: 1 for min-max,
    the mean percentile/min-max range ratio for percentile, the best grid ratio for mse."""
    if method == "minmax":
        return 1.0
    if method == "percentile":
        p = percentile / 100.0
        if symmetric:
            full, clipped = rows.abs().amax(-1), quantile(rows.abs(), p)
        else:
            full = rows.amax(-1).clamp(min=0) - rows.amin(-1).clamp(max=0)
            clipped = quantile(rows, p).clamp(min=0) - quantile(rows, 1.0 - p).clamp(max=0)
        keep = full > 0
        return float((clipped[keep] / full[keep]).mean()) if bool(keep.any()) else 1.0
    best_a, best_err = 1.0, math.inf
    for a in torch.linspace(0.01, 1.0, MSE_GRID).tolist():
        err = float((_token_fake_quant(rows, a, qmin, qmax, symmetric) - rows).pow(2).mean())
        if err < best_err:
            best_a, best_err = a, err
    return best_a
