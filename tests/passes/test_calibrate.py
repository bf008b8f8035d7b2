import pytest
import torch

from tests.conftest import tiny_vit
from vitqc.passes.base import check_property
from vitqc.pipeline import Pipeline
from vitqc.quant.modules import QuantLinear

import vitqc


def test_calibrate_sets_every_range_and_w8a8_tracks_fp(calib):
    model = tiny_vit()
    q = vitqc.compile(model, Pipeline.from_list(["canonicalize", "insert_quantizers", "calibrate"]), calib, quiet=True).quantized
    assert check_property("calibrated", q)
    x = torch.cat(calib)
    with torch.no_grad():
        ref, out = model(x), q(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, rel  # 8-bit everything on random weights: a few percent at most
    # weight ranges come from the weights themselves (min-max: amax per output channel / qmax)
    fc = q.get_submodule("blocks.0.mlp.fc1")
    assert isinstance(fc, QuantLinear)
    expected = fc.weight.detach().abs().amax(dim=1) / 127
    assert torch.allclose(fc.weight_quantizer.scale_tensor().flatten(), expected)


def test_activation_ranges_come_from_the_calibration_images(calib):
    model = tiny_vit()
    q = vitqc.compile(model, "canonicalize,insert_quantizers,calibrate", calib, quiet=True).quantized
    iq = q.get_submodule("patch_embed.proj").input_quantizer  # sees the raw images
    x = torch.cat(calib)
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    assert iq.scale_tensor().item() == pytest.approx((hi - lo) / 255, rel=1e-6)


def test_lower_bits_mean_larger_error(calib):
    x = torch.cat(calib)
    model = tiny_vit()
    with torch.no_grad():
        ref = model(x)
        errs = []
        for bits in (8, 6, 4):
            q = vitqc.compile(tiny_vit(), f"canonicalize,insert_quantizers{{weight_bits={bits},act_bits={bits}}},calibrate",
                              calib, quiet=True).quantized
            errs.append(((q(x) - ref).norm() / ref.norm()).item())
    assert errs[0] < errs[1] < errs[2]


def test_mse_method_lowers_weight_error_at_4_bits(calib):
    def weight_err(method):
        q = vitqc.compile(tiny_vit(), "canonicalize,insert_quantizers{weight_bits=4},calibrate", calib, quiet=True,
                          calibrate__weight_method=method).quantized
        fc = q.get_submodule("blocks.0.mlp.fc1")
        w = fc.weight.detach()
        return ((fc.weight_quantizer(w) - w) ** 2).mean().item()

    assert weight_err("mse") < weight_err("minmax")


def test_calibrate_without_images_says_how_to_give_them():
    with pytest.raises(vitqc.VitqcError, match="--calib"):
        vitqc.compile(tiny_vit(), "canonicalize,insert_quantizers,calibrate", None, quiet=True,
                      example=torch.randn(1, 3, 16, 16)).quantized
