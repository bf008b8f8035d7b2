"""Quantized layers that passes swap into the graph.

``QuantLinear`` / ``QuantConv2d`` keep the FP weight and fake-quantize it on the fly (so later passes can
learn the quantizer steps, rescaling factors or weight refinement). ``materialize`` turns them into
``IntLinear`` / ``IntConv2d``, which hold integer weight codes plus scales/zero-points and nothing learnable.
Both kinds keep the input quantizer of the layer, so a layer is one self-contained unit at one module path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitqc.quant.quantizer import UniformQuantizer

__all__ = ["QuantLinear", "QuantConv2d", "IntLinear", "IntConv2d", "QUANT_LAYERS", "INT_LAYERS",
           "freeze_quantizer"]


class _QuantWeightMixin:
    """Shared by QuantLinear and QuantConv2d: weight fake-quant plus an input quantizer."""

    weight: nn.Parameter
    weight_quantizer: UniformQuantizer
    input_quantizer: UniformQuantizer | None

    def effective_weight(self) -> torch.Tensor:
        """The FP weight the layer really computes with (before quantization). Passes may override."""
        return self.weight

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.effective_weight())

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quantize_input(x), self.quantized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


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
        q = quant.weight_quantizer
        with torch.no_grad():
            w = quant.effective_weight()
            self.register_buffer("weight_codes", q.integer(w))
            # broadcast-ready shapes ([O, 1] for linear, [O, 1, 1, 1] for conv) so dequantization is one expression
            self.register_buffer("weight_scale", q.scale_tensor(ndim=w.ndim).detach().clone())
            self.register_buffer("weight_zero_point", q.zero_point_tensor(ndim=w.ndim).detach().clone())
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
        self.bias = None if quant.bias is None else nn.Parameter(quant.bias.detach().clone(), requires_grad=False)
        self._store_codes(quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.dequantized_weight(), self.bias)


class IntConv2d(_IntWeightMixin, nn.Module):
    def __init__(self, quant: QuantConv2d) -> None:
        super().__init__()
        self.bias = None if quant.bias is None else nn.Parameter(quant.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = quant.stride, quant.padding, quant.dilation, quant.groups
        self._store_codes(quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.quantize_input(x), self.dequantized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


QUANT_LAYERS = (QuantLinear, QuantConv2d)
INT_LAYERS = (IntLinear, IntConv2d)
