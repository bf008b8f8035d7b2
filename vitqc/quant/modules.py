"""Quantized layers that passes swap into the graph.

``QuantLinear`` / ``QuantConv2d`` keep the FP weight and fake-quantize it on the fly, so later passes can
learn quantizer steps, channel-wise rescaling factors and weight refinement. ``materialize`` calls each
module's ``materialized()``: fake-quant layers become ``IntLinear`` / ``IntConv2d`` (integer weight codes plus
scales/zero-points, nothing learnable, computed in integer arithmetic: :mod:`vitqc.quant.intops`) and
``RescaledLayerNorm`` folds its factors into a plain LayerNorm; quantized attention matmuls become ``IntMatmul``.
A layer keeps its input quantizer, so it is one self-contained unit at one module path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitqc.quant.intops import integer_linear, integer_matmul, patches
from vitqc.quant.quantizer import UniformQuantizer

__all__ = ["ChannelFactors", "RescaledLayerNorm", "QuantLinear", "QuantConv2d", "IntLinear", "IntConv2d",
           "IntMatmul", "QUANT_LAYERS", "INT_LAYERS", "freeze_quantizer"]


class ChannelFactors(nn.Module):
    """Learnable positive per-channel factors s (kept as log s, so they stay positive under Adam).

    Shared by the producer that divides its output channels by s and the consumer(s) that multiply their
    input channels by s: the product is the identity while weights are FP.
    """

    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.log_factors = nn.Parameter(init.detach().clamp_min(1e-8).log().clone())

    def forward(self) -> torch.Tensor:
        return self.log_factors.exp()


class RescaledLayerNorm(nn.Module):
    """LayerNorm whose output channels are divided by shared ``ChannelFactors`` (folded into its affine)."""

    def __init__(self, norm: nn.LayerNorm, factors: ChannelFactors) -> None:
        super().__init__()
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        c = norm.normalized_shape[-1]
        self.weight = norm.weight if norm.weight is not None else nn.Parameter(torch.ones(c), requires_grad=False)
        self.bias = norm.bias if norm.bias is not None else nn.Parameter(torch.zeros(c), requires_grad=False)
        self.factors = factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.factors()
        return F.layer_norm(x, self.normalized_shape, self.weight / s, self.bias / s, self.eps)

    def materialized(self) -> nn.LayerNorm:
        norm = nn.LayerNorm(self.normalized_shape, eps=self.eps)
        with torch.no_grad():
            s = self.factors()
            norm.weight.copy_(self.weight / s)
            norm.bias.copy_(self.bias / s)
        return norm.requires_grad_(False)


class _QuantWeightMixin:
    """Shared by QuantLinear and QuantConv2d: weight fake-quant plus an input quantizer.

    Optional attachments (set by passes, each None when unused):
    * ``input_factors``: multiply the weight's input channels by s (consumer side of channel_rescale);
    * ``output_factors`` + ``output_slice``: divide output channels [start, stop) and their bias by s
      (producer side, e.g. the v rows of a fused qkv projection);
    * ``refinement``: weight refinement offset, in units of the quantizer step (weight_refine).
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_quantizer: UniformQuantizer
    input_quantizer: UniformQuantizer | None

    def _init_attachments(self) -> None:
        self.input_factors: ChannelFactors | None = None
        self.output_factors: ChannelFactors | None = None
        self.output_slice: tuple[int, int] = (0, 0)
        self.refinement: nn.Parameter | None = None

    def _output_divisor(self) -> torch.Tensor | None:
        if self.output_factors is None:
            return None
        start, stop = self.output_slice
        n = self.weight.shape[0]
        s = self.output_factors()
        return torch.cat([s.new_ones(start), s, s.new_ones(n - stop)])

    def effective_weight(self) -> torch.Tensor:
        """The FP weight after rescaling, before refinement and quantization."""
        w = self.weight
        if self.input_factors is not None:
            w = w * self.input_factors().reshape(1, -1, *([1] * (w.ndim - 2)))
        div = self._output_divisor()
        if div is not None:
            w = w / div.reshape(-1, *([1] * (w.ndim - 1)))
        return w

    def effective_bias(self) -> torch.Tensor | None:
        div = self._output_divisor()
        return self.bias if self.bias is None or div is None else self.bias / div

    def refined_weight(self) -> torch.Tensor:
        """What the weight quantizer sees: the effective weight moved by at most one step each way.

        The step is detached so the LSQ step gradient is not mixed with the refinement's.
        """
        w = self.effective_weight()
        if self.refinement is None:
            return w
        step = self.weight_quantizer.scale_tensor(ndim=w.ndim).detach()
        return w + step * self.refinement.clamp(-1.0, 1.0)

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.refined_weight())

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


class QuantLinear(_QuantWeightMixin, nn.Module):
    def __init__(self, linear: nn.Linear, weight_quantizer: UniformQuantizer,
                 input_quantizer: UniformQuantizer | None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self._init_attachments()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.effective_bias())

    def materialized(self) -> "IntLinear":
        return IntLinear(self)


class QuantConv2d(_QuantWeightMixin, nn.Module):
    def __init__(self, conv: nn.Conv2d, weight_quantizer: UniformQuantizer,
                 input_quantizer: UniformQuantizer | None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self._init_attachments()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quantize_input(x), self.quantized_weight(), self.effective_bias(), self.stride,
                        self.padding, self.dilation, self.groups)

    def materialized(self) -> "IntConv2d":
        return IntConv2d(self)


def freeze_quantizer(q: UniformQuantizer | None) -> UniformQuantizer | None:
    """Stop a quantizer from learning: its parameters become constants (still in its state dict)."""
    if q is not None:
        for p in q.parameters():
            p.requires_grad_(False)
    return q


class _IntWeightMixin:
    weight_codes: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor

    def _store_codes(self, quant: _QuantWeightMixin) -> None:
        """Codes of exactly the weight the fake-quant layer computed with (rescaled and refined)."""
        q = quant.weight_quantizer
        with torch.no_grad():
            w = quant.refined_weight()
            self.register_buffer("weight_codes", q.integer(w))
            # broadcast-ready shapes ([O, 1] for linear, [O, 1, 1, 1] for conv) so dequantization is one expression
            self.register_buffer("weight_scale", q.scale_tensor(ndim=w.ndim).detach().clone())
            self.register_buffer("weight_zero_point", q.zero_point_tensor(ndim=w.ndim).detach().clone())
            bias = quant.effective_bias()
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.weight_bits = q.bits
        self.weight_symmetric = q.symmetric
        self.input_quantizer = freeze_quantizer(quant.input_quantizer)
        self._store_gemm_constants()

    def _store_gemm_constants(self) -> None:
        """What the integer GEMM needs besides the codes: the shift that makes them int8 (only [0, 255]
        codes of asymmetric 8-bit weights need one), the zero points in shifted units (None if all zero) and
        ``rowsum - K * zero point`` (see :func:`vitqc.quant.intops.integer_linear`)."""
        n = self.weight_codes.shape[0]
        self.weight_shift = 128 if self.weight_codes.dtype == torch.uint8 else 0
        r = self.weight_int8().reshape(n, -1).to(torch.int32)
        zp = self.weight_zero_point.reshape(n).round().to(torch.int32) - self.weight_shift
        self.register_buffer("gemm_zero_point", zp if bool((zp != 0).any()) else None)
        self.register_buffer("gemm_weight_sum", r.sum(1) - r.shape[1] * zp)
        q = self.input_quantizer
        self.integer_input = q is not None and q.granularity in ("tensor", "token")

    def weight_int8(self) -> torch.Tensor:
        """The weight codes as int8 (shifted by ``weight_shift``)."""
        if not self.weight_shift:
            return self.weight_codes
        return (self.weight_codes.to(torch.int16) - self.weight_shift).to(torch.int8)

    def dequantized_weight(self) -> torch.Tensor:
        return (self.weight_codes.to(self.weight_scale.dtype) - self.weight_zero_point) * self.weight_scale

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _integer_rows(self, rows: torch.Tensor) -> torch.Tensor:
        n = self.weight_codes.shape[0]
        return integer_linear(rows, self.input_quantizer, self.weight_int8().reshape(n, -1),
                              self.weight_scale.reshape(n), self.gemm_zero_point, self.gemm_weight_sum, self.bias)


class IntLinear(_IntWeightMixin, nn.Module):
    """A linear layer on integer weight codes. With a per-tensor or per-token input quantizer it runs in
    integer arithmetic (:func:`vitqc.quant.intops.integer_linear`: exact int8 GEMM, then one rescale), which
    equals ``Q_in(x) @ ((codes - zp) * scale)^T + b`` up to float rounding; without one (weight-only) it is
    exactly that expression in float."""

    def __init__(self, quant: QuantLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = quant.in_features, quant.out_features
        self._store_codes(quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.integer_input:
            return F.linear(self.quantize_input(x), self.dequantized_weight(), self.bias)
        y = self._integer_rows(x.reshape(-1, self.in_features))
        return y.reshape(*x.shape[:-1], self.out_features)


class IntConv2d(_IntWeightMixin, nn.Module):
    """A conv on integer weight codes. A patchify conv (stride == kernel, no padding, dilation or groups: the
    ViT patch embedding) with a per-tensor input quantizer runs as patches x the integer GEMM; any other conv
    as a float conv of the dequantized codes on the fake-quantized input."""

    def __init__(self, quant: QuantConv2d) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = quant.stride, quant.padding, quant.dilation, quant.groups
        self._store_codes(quant)
        kernel = tuple(self.weight_codes.shape[2:])
        self.patchify = (tuple(self.stride) == kernel and not any(_pairs(self.padding))
                         and all(d == 1 for d in _pairs(self.dilation)) and self.groups == 1
                         and self.integer_input and self.input_quantizer.granularity == "tensor")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.patchify:
            return F.conv2d(self.quantize_input(x), self.dequantized_weight(), self.bias, self.stride,
                            self.padding, self.dilation, self.groups)
        kh, kw = self.weight_codes.shape[2:]
        rows, ho, wo = patches(x, kh, kw)
        y = self._integer_rows(rows)
        return y.reshape(x.shape[0], ho, wo, -1).permute(0, 3, 1, 2)


def _pairs(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class IntMatmul(nn.Module):
    """``Q_lhs(a) @ Q_rhs(b)`` for two activations (``q @ k^T``, ``attn @ v``) on their integer codes
    (:func:`vitqc.quant.intops.integer_matmul`). ``materialize`` puts it in place of a matmul whose inputs
    are both quantized, holding the two (frozen) quantizers."""

    def __init__(self, lhs: UniformQuantizer, rhs: UniformQuantizer) -> None:
        super().__init__()
        self.lhs, self.rhs = freeze_quantizer(lhs), freeze_quantizer(rhs)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return integer_matmul(a, b, self.lhs, self.rhs)


QUANT_LAYERS = (QuantLinear, QuantConv2d)
INT_LAYERS = (IntLinear, IntConv2d)
