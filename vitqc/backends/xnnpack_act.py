"""vitqc's activation grids on XNNPACK's dynamic int8: the modules that stand in front of each float linear.

XNNPACK's int8 linear with a float output quantizes its input *dynamically*: per row, from the row's min and max
(widened to include 0), it takes ``multiplier = 255 / (max - min)``, a zero point from ``min * multiplier`` and
``scale = 1 / multiplier`` for the float epilogue (:func:`xnnpack_row_qparams`, as XNNPACK's
``xnn_qd8_asymmetric_quantization_params`` computes it). Its static int8 linear instead needs an int8 *output*
grid (XNNPACK partitioner: a static quantized linear must end in a quantize node), which vitqc's graphs do not
have: their linear outputs go on in float (residual adds, GELU, LayerNorm). So every quantized linear runs on the
dynamic path, and each row is made to carry vitqc's own grid:

* :class:`StaticInt8Linear` (static per-tensor grids of up to 256 levels, symmetric weights): vitqc's integer
  linear bit for bit. Its int8 codes (vitqc's own float ops, shifted into int8 as vitqc's GEMM takes them) go in
  with two anchor columns at -128 and 127, so XNNPACK's row grid has scale 1 and zero point 0 and takes the codes
  unchanged; the weight's per-channel scale is vitqc's output scale ``s * w_s`` and the bias vitqc's offset (bias
  minus the zero-point correction), so XNNPACK's epilogue ``fma(acc, s * w_s, offset)`` is vitqc's
  ``addcmul(offset, acc, s * w_s)`` (which ATen computes with one rounding on CPUs with FMA).
* :class:`AnchoredInput` (per-token grids other than A8, and static grids of asymmetric weights): two columns
  are appended to each row, with zero weights, at ``(qmin - z) * s`` and 255 steps above it. The row's values are
  first clipped to vitqc's range ``[(qmin - z) s, (qmax - z) s]``, so the two anchors are the row's min and max:
  XNNPACK's step is vitqc's ``s`` (up to float rounding: :func:`static_anchors`), its zero
  point vitqc's ``z``, and its rounding of ``x * (1 / s)`` gives vitqc's codes except where ``x / s`` lies within
  float rounding of a half step. The epilogue (``acc * s`` then ``* w_s + bias``) rounds differently from vitqc's.
* :class:`ClippedInput` (per-token asymmetric A8 with clip ratio <= 1): a clipped row already reaches both ends
  of vitqc's 255-step range, so no anchors are needed.
* :class:`PatchGemm`: a patchify conv (the ViT patch embedding) as non-overlapping patches times an anchored
  int8 linear, the integer GEMM vitqc's ``IntConv2d`` computes.
* :class:`QuantizedInput`: vitqc's codes computed in fp32, then the float layer (other convolutions).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from vitqc.backends.program import ActBuffers, ActQuant
from vitqc.quant.intops import patches, shift_for, token_qparams, token_range

__all__ = ["xnnpack_row_qparams", "static_anchors", "device_act", "StaticInt8Linear", "AnchoredInput",
           "ClippedInput", "PatchGemm", "QuantizedInput", "padded_linear", "ANCHORS"]

LEVELS = 255  # XNNPACK's dynamic int8 grid: [-128, 127]
ANCHORS = 2  # anchor columns appended to each row


def _f32(v: float | Tensor) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float32)


def xnnpack_row_qparams(lo: float | Tensor, hi: float | Tensor) -> tuple[Tensor, Tensor, int]:
    """``(scale, multiplier, zero_point)`` that XNNPACK's dynamic int8 takes for a row whose min is ``lo`` and max
    ``hi``, in float32 as XNNPACK computes them (``xnn_qd8_asymmetric_quantization_params``; the quantize step
    multiplies by ``1 / scale``)."""
    rmin, rmax = torch.minimum(_f32(lo), _f32(0.0)), torch.maximum(_f32(hi), _f32(0.0))
    mult = _f32(1.0) if bool(rmin == rmax) else _f32(float(LEVELS)) / (rmax - rmin)
    dmin, dmax = rmin * mult, rmax * mult
    zp = _f32(-128.0) - dmin if bool((_f32(-128.0) + dmin) + (_f32(127.0) + dmax) > 0) else _f32(127.0) - dmax
    zp = torch.clamp(zp, -128.0, 127.0)
    scale = _f32(1.0) / mult
    return scale, _f32(1.0) / scale, int(torch.round(zp))


def static_anchors(scale: float, zero_point: float, qmin: int, qmax: int) -> tuple[float, float]:
    """Anchor values ``(lo, hi)`` for a per-tensor grid (step ``scale``, zero point ``zero_point``, codes
    ``[qmin, qmax]``, at most 256 levels): ``lo`` is the grid's bottom ``(qmin - z) * s`` as vitqc computes it in
    float32, ``hi`` 255 steps above it (at least the grid's top). XNNPACK then takes vitqc's zero point and a scale
    within float rounding of ``s`` (``1 / (255 / (hi - lo))`` is not always ``s`` to the last bit)."""
    if qmax - qmin > LEVELS:
        raise ValueError(f"a grid of {qmax - qmin + 1} levels does not fit int8")
    s, z = _f32(scale), _f32(zero_point)
    lo = (_f32(float(qmin)) - z) * s
    return float(lo), float(torch.maximum(lo + _f32(float(LEVELS)) * s, (_f32(float(qmax)) - z) * s))


def device_act(act: ActQuant | None, symmetric_weights: bool = True) -> str:
    """How vitqc's input quantizer reaches XNNPACK: ``"fp32"`` (none), ``"static-int8"`` (per tensor, symmetric
    weights: :class:`StaticInt8Linear`), ``"xnnpack-grid"`` (per-token asymmetric A8 with clip ratio <= 1:
    :class:`ClippedInput`) or ``"anchored"`` (:class:`AnchoredInput`)."""
    if act is None:
        return "fp32"
    if act.granularity == "tensor":
        return "static-int8" if symmetric_weights else "anchored"
    if not act.symmetric and float(act.clip_ratio) <= 1 and act.qmax - act.qmin == LEVELS:
        return "xnnpack-grid"
    return "anchored"


def padded_linear(weight: Tensor, bias: Tensor | None, extra: int) -> nn.Linear:
    """A float linear holding ``weight`` [N, K] with ``extra`` zero input columns appended."""
    n, k = weight.shape
    layer = nn.Linear(k + extra, n, bias=bias is not None)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:, :k] = weight
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class StaticInt8Linear(nn.Module):
    """vitqc's integer linear with a static per-tensor input quantizer and symmetric weight codes ``codes`` [N, K],
    computed by XNNPACK as vitqc computes it (see the module docstring). ``weight_sum`` is vitqc's
    ``rowsum(codes)`` ([N]); the float linear holds ``codes * s * w_s`` and the offset, so PT2E's fixed scale
    ``s * w_s`` (:attr:`out_scale`) gives the codes back."""

    def __init__(self, act: ActQuant, codes: Tensor, weight_scale: Tensor, weight_sum: Tensor,
                 bias: Tensor | None) -> None:
        super().__init__()
        assert act.granularity == "tensor"
        self.act, self.shift = ActBuffers(act), shift_for(act.qmax)
        # the same float ops as vitqc.quant.intops.integer_linear, so the same constants to the last bit
        out_scale = self.act.scale * weight_scale.float().reshape(-1)
        offset = None if bias is None else bias.float()
        if not self.act.zero_free:
            z = self.act.zero_point
            correction = ((z - self.shift if self.shift else z) * weight_sum.to(torch.float32)) * out_scale
            offset = -correction if offset is None else offset - correction
        self.out_scale = out_scale
        self.layer = padded_linear(codes.float() * out_scale.unsqueeze(1), offset, ANCHORS)
        self.register_buffer("anchors", torch.tensor([-128.0, 127.0]))

    def forward(self, x: Tensor) -> Tensor:
        q, _, _ = self.act.codes(x, self.shift)
        return self.layer(torch.cat([q, self.anchors.expand(*q.shape[:-1], ANCHORS)], -1))


class AnchoredInput(nn.Module):
    """``layer([x clipped to vitqc's grid, anchor_lo, anchor_hi])``: see the module docstring. ``layer`` takes the
    two anchor columns last (zero weights: :func:`padded_linear`)."""

    def __init__(self, act: ActQuant, layer: nn.Linear) -> None:
        super().__init__()
        self.act, self.layer = ActBuffers(act), layer
        if act.granularity == "tensor":
            s, z = float(self.act.scale), float(self.act.zero_point)
            lo, hi = static_anchors(s, z, act.qmin, act.qmax)
            self.bounds = (lo, float((_f32(float(act.qmax)) - _f32(z)) * _f32(s)))
            self.register_buffer("anchors", torch.tensor([lo, hi]))

    def forward(self, x: Tensor) -> Tensor:
        a = self.act
        if a.granularity == "tensor":
            x = torch.clamp(x, *self.bounds)
            anchors = self.anchors.expand(*x.shape[:-1], ANCHORS)
        else:
            _, s, z = token_qparams(x, a.clip_ratio, a.qmin, a.qmax, a.symmetric)
            lo = (a.qmin - z) * s if z is not None else a.qmin * s
            hi = (a.qmax - z) * s if z is not None else a.qmax * s
            x = torch.minimum(torch.maximum(x, lo), hi)
            anchors = torch.cat([lo, lo + LEVELS * s], -1)
        return self.layer(torch.cat([x, anchors], -1))


class ClippedInput(nn.Module):
    """``layer(x clipped to vitqc's per-token range)``, for per-token asymmetric A8 with clip ratio <= 1: each
    clipped row reaches both ends of vitqc's range, so XNNPACK's dynamic int8 of it has vitqc's step and zero
    point, and vitqc's own rounding (several float ops per element) need not run first. With ratio 1 the clip
    changes nothing and is left out."""

    def __init__(self, act: ActQuant, layer: nn.Module) -> None:
        super().__init__()
        assert act.clip_ratio is not None
        self.layer, self.ratio = layer, float(act.clip_ratio)

    def forward(self, x: Tensor) -> Tensor:
        if self.ratio == 1.0:
            return self.layer(x)
        lo, hi = token_range(x)
        return self.layer(torch.minimum(torch.maximum(x, lo * self.ratio), hi * self.ratio))


class PatchGemm(nn.Module):
    """A patchify conv (stride == kernel, no padding, dilation or groups) as vitqc's ``IntConv2d`` computes it:
    non-overlapping patches [B * Ho * Wo, C * kh * kw] times the weight through ``gemm`` (an anchored linear),
    back to [B, N, Ho, Wo]."""

    def __init__(self, gemm: nn.Module, kernel: tuple[int, int], out_channels: int) -> None:
        super().__init__()
        self.gemm, self.kh, self.kw, self.out_channels = gemm, kernel[0], kernel[1], out_channels

    def forward(self, x: Tensor) -> Tensor:
        rows, ho, wo = patches(x, self.kh, self.kw)
        y = self.gemm(rows)
        return y.reshape(x.shape[0], ho, wo, self.out_channels).permute(0, 3, 1, 2)


class QuantizedInput(nn.Module):
    """``layer(dequantize(vitqc's activation codes of x))``: vitqc's input quantizer computed with the same float
    ops (:func:`vitqc.quant.intops.act_codes`) in front of a float layer (a conv that is not a patchify conv)."""

    def __init__(self, act: ActQuant, layer: nn.Module) -> None:
        super().__init__()
        self.act, self.layer = ActBuffers(act), layer

    def forward(self, x: Tensor) -> Tensor:
        q, s, z = self.act.codes(x)
        return self.layer((q - z) * s)
