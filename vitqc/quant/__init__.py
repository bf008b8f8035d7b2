"""Quantization primitives: the fake-quantizer modules that passes insert into graphs."""
from vitqc.quant.quantizer import TERNARY_BITS, VALID_BITS, UniformQuantizer, grad_scale, round_ste

__all__ = ["UniformQuantizer", "round_ste", "grad_scale", "TERNARY_BITS", "VALID_BITS"]
