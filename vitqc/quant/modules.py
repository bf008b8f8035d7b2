"""Quantized layers that passes swap into the graph.

``QuantLinear`` / ``QuantConv2d`` keep the FP weight and fake-quantize it on the fly, so later passes can
learn quantizer steps, channel-wise rescaling factors and weight refinement. ``materialize`` calls each
module's ``materialized()``: fake-quant layers become ``IntLinear`` / ``IntConv2d`` (integer weight codes plus
scales/zero-points, nothing learnable) and ``RescaledLayerNorm`` folds its factors into a plain LayerNorm.
A layer keeps its input quantizer, so it is one self-contained unit at one module path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitqc.quant.quantizer import UniformQuantizer

__all__ = ["ChannelFactors", "RescaledLayerNorm", "QuantLinear", "QuantConv2d", "IntLinear", "IntConv2d",
           "QUANT_LAYERS", "INT_LAYERS", "freeze_quantizer"]


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

    def dequantized_weight(self) -> torch.Tensor:
        return (self.weight_codes.to(self.weight_scale.dtype) - self.weight_zero_point) * self.weight_scale

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


class IntLinear(_IntWeightMixin, nn.Module):
    """A linear layer with integer weight codes: y = Q_in(x) @ ((codes - zp) * scale)^T + b."""

    def __init__(self, quant: QuantLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = quant.in_features, quant.out_features
        self._store_codes(quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.dequantized_weight(), self.bias)


class IntConv2d(_IntWeightMixin, nn.Module):
    def __init__(self, quant: QuantConv2d) -> None:
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = quant.stride, quant.padding, quant.dilation, quant.groups
        self._store_codes(quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quantize_input(x), self.dequantized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


QUANT_LAYERS = (QuantLinear, QuantConv2d)
INT_LAYERS = (IntLinear, IntConv2d)
