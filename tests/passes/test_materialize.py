import torch

import vitqc
from tests.conftest import tiny_vit
from vitqc.passes.base import check_property
from vitqc.quant.modules import IntConv2d, IntLinear, QuantLinear


def test_materialize_keeps_outputs_bit_identical_and_stores_integer_codes(calib):
    fake = vitqc.compile(tiny_vit(), "canonicalize,insert_quantizers{weight_bits=4,act_bits=8},calibrate", calib,
                         quiet=True)
    x = torch.cat(calib)
    with torch.no_grad():
        before = fake(x)
    q = vitqc.compile(fake, "materialize", quiet=True, example=x[:1])
    with torch.no_grad():
        after = q(x)
    assert torch.equal(before, after)
    assert check_property("materialized", q)
    fc = q.get_submodule("blocks.0.mlp.fc1")
    assert isinstance(fc, IntLinear) and isinstance(q.get_submodule("patch_embed.proj"), IntConv2d)
    assert fc.weight_codes.dtype == torch.int8
    assert fc.weight_codes.min() >= -8 and fc.weight_codes.max() <= 7
    assert not any(isinstance(m, QuantLinear) for m in q.modules())
    assert not any(p.requires_grad for name, p in q.named_parameters() if "quantizer" in name)
    assert not hasattr(fc, "weight")  # FP weights are gone


def test_ternary_codes(calib):
    q = vitqc.compile(tiny_vit(), "canonicalize,insert_quantizers{weight_bits=1.58},calibrate,materialize", calib,
                      quiet=True)
    codes = q.get_submodule("blocks.0.attn.qkv").weight_codes
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
