"""How vitqc's activation grids reach XNNPACK's dynamic int8 (pure torch: no ExecuTorch needed)."""
import math

import pytest
import torch

from vitqc.backends.program import ActQuant
from vitqc.backends.xnnpack_act import device_act, static_anchors, xnnpack_row_qparams


@pytest.mark.parametrize("bits,granularity,symmetric,ratio,weights_symmetric,expected", [
    (8, "token", False, 1.0, True, "xnnpack-grid"), (8, "token", False, 0.7, True, "xnnpack-grid"),
    (4, "token", False, 0.9, True, "anchored"), (3, "token", False, 1.0, True, "anchored"),
    (8, "token", True, 1.0, True, "anchored"),  # a symmetric row need not reach both ends of the grid
    (8, "token", False, 1.2, True, "anchored"),  # a ratio above 1 leaves the ends of the grid unused
    (8, "tensor", False, None, True, "static-int8"), (3, "tensor", False, None, True, "static-int8"),
    (8, "tensor", False, None, False, "anchored"),  # asymmetric weights: no fused epilogue
])
def test_which_path_each_activation_grid_takes(bits, granularity, symmetric, ratio, weights_symmetric, expected):
    qmin, qmax = (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    if granularity == "token":
        act = ActQuant("token", qmin, qmax, clip_ratio=torch.tensor(ratio))
    else:
        act = ActQuant("tensor", qmin, qmax, scale=torch.tensor(0.1), zero_point=torch.tensor(3.0))
    assert device_act(act, weights_symmetric) == expected
    assert device_act(None) == "fp32"


def test_xnnpack_row_qparams_on_the_int8_range_itself():
    """Anchors at -128 and 127 (what StaticInt8Linear appends to vitqc's codes): scale 1, zero point 0."""
    scale, multiplier, zero_point = xnnpack_row_qparams(-128.0, 127.0)
    assert float(scale) == 1.0 and float(multiplier) == 1.0 and zero_point == 0


@pytest.mark.parametrize("qmin,qmax", [(0, 255), (0, 63), (0, 15), (0, 7), (-127, 127), (-1, 1)])
def test_static_anchors_pin_xnnpack_to_vitqc_scale_and_zero_point(qmin, qmax):
    """For many scales and zero points, the anchors give XNNPACK vitqc's zero point shifted into int8 and its
    scale up to float rounding, and they bound the grid's range."""
    g = torch.Generator().manual_seed(qmax)
    scales = torch.exp(torch.empty(200).uniform_(-12, 3, generator=g))
    for s in scales.tolist():
        s = float(torch.tensor(s, dtype=torch.float32))
        z = 0 if qmin < 0 else int(torch.randint(qmin, qmax + 1, (1,), generator=g))
        lo, hi = static_anchors(s, z, qmin, qmax)
        got_scale, _, got_zp = xnnpack_row_qparams(lo, hi)
        assert abs(float(got_scale) / s - 1) < 1e-6 and got_zp == -128 - qmin + z
        assert math.isclose(lo, (qmin - z) * s, rel_tol=1e-6, abs_tol=1e-30)
        assert hi - lo >= (qmax - qmin) * s * (1 - 1e-6)


def test_grids_wider_than_int8_are_refused():
    with pytest.raises(ValueError, match="does not fit int8"):
        static_anchors(0.1, 0, 0, 511)
