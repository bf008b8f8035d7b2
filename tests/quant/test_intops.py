"""The integer kernels that define a materialized model (vitqc.quant.intops)."""
import pytest
import torch

from vitqc.quant import UniformQuantizer
from vitqc.quant.intops import float64_matmul, int8_matmul, integer_linear, integer_matmul, padded_int_mm, shift_for


def _ints(*shape, seed=0):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("m, k, n", [(1, 7, 3), (17, 1536, 96), (130, 384, 10)])
def test_int8_matmul_is_exact_on_both_paths(m, k, n):
    a, b = _ints(m, k), _ints(k, n, seed=1)
    exact = (a.long() @ b.long()).float()  # one rounding of the exact sum, as both paths promise
    assert torch.equal(int8_matmul(a, b), exact)
    assert torch.equal(float64_matmul(a, b), exact)
    # the CUDA path's zero padding (to M > 16, K and N multiples of 8) changes no sum; checked here with the
    # CPU kernel, which takes any shape, on a column-major b as the linears pass it (weight.t())
    padded = padded_int_mm(a, b.t().contiguous().t())
    assert padded.shape == (m, n) and torch.equal(padded.float(), exact)


def _quantizer(bits, symmetric, granularity, x):
    q = UniformQuantizer(bits=bits, symmetric=symmetric, granularity=granularity, init="percentile", percentile=99.0)
    q.observe(True)
    q(x)
    q.observe(False)
    return q.init_from_observed().requires_grad_(False)


@pytest.mark.parametrize("bits, symmetric, granularity", [(8, False, "tensor"), (8, True, "tensor"), (4, False, "tensor"),
                                                          (8, False, "token"), (4, True, "token"), (3, False, "token")])
def test_codes_are_the_fake_quantizers_codes(bits, symmetric, granularity):
    """(codes - z) * s is bit-identical to the fake-quantizer's output, shifted codes fit int8."""
    x = torch.randn(6, 9, 40, generator=torch.Generator().manual_seed(2)) * 3
    q = _quantizer(bits, symmetric, granularity, x)
    shift = shift_for(q.qmax)
    codes, s, z = q.codes(x, shift)
    with torch.no_grad():
        assert torch.equal((codes + shift - z) * s, q(x))
    assert codes.min() >= -128 and codes.max() <= 127 and torch.equal(codes, codes.round())


@pytest.mark.parametrize("granularity", ["tensor", "token"])
@pytest.mark.parametrize("weight_zero_point", [False, True])
def test_integer_linear_is_the_dequantized_product(granularity, weight_zero_point):
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(3))
    act = _quantizer(8, False, granularity, x)
    w = _ints(12, 64, seed=4)
    zp = torch.arange(12, dtype=torch.int32) - 6 if weight_zero_point else None
    zw = zp if zp is not None else torch.zeros(12, dtype=torch.int32)
    scale = torch.rand(12, generator=torch.Generator().manual_seed(5)) * 0.01 + 1e-3
    bias = torch.randn(12)
    got = integer_linear(x, act, w, scale, zp, w.int().sum(1) - 64 * zw, bias)
    with torch.no_grad():
        ref = (act(x).double() @ ((w.double() - zw.double()[:, None]) * scale.double()[:, None]).t() + bias.double())
    assert torch.allclose(got.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))


def test_integer_matmul_is_the_dequantized_product():
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(2, 3, 17, 16, generator=g), torch.randn(2, 3, 16, 17, generator=g)
    for rhs_granularity in ("tensor", "token"):
        lhs, rhs = _quantizer(8, True, "tensor", a), _quantizer(8, False, rhs_granularity, b)
        with torch.no_grad():
            ref = lhs(a).double() @ rhs(b).double()
        got = integer_matmul(a, b, lhs, rhs)
        assert torch.allclose(got.double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
