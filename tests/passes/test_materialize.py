import torch
import torch.nn.functional as F

import vitqc
from tests.conftest import assert_close_but_for_code_flips, int_layer_io, tiny_vit
from vitqc.passes.base import check_property
from vitqc.quant.modules import IntConv2d, IntLinear, IntMatmul, QuantLinear


def _rel(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


def test_materialize_computes_in_integers_what_the_fake_quant_graph_computes(calib):
    fake = vitqc.compile(tiny_vit(), "canonicalize,insert_quantizers{weight_bits=4,act_bits=8},calibrate", calib,
                         quiet=True).quantized
    x = torch.cat(calib)
    with torch.no_grad():
        before = fake(x)
    q = vitqc.compile(fake, "materialize", quiet=True, example=x[:1]).quantized
    with torch.no_grad():
        after = q(x)
    # same codes, exact accumulation instead of fp32 rounding of dequantized values: equal up to that rounding,
    # except where the rounding moves an activation across a code boundary (seen: 1 image in 64, 1e-2)
    assert_close_but_for_code_flips(after, before)
    assert check_property("materialized", q)
    assert q.meta["vitqc"]["record"]["materialize"]["integer_matmuls"] == 4
    matmuls = [m for m in q.modules() if isinstance(m, IntMatmul)]
    assert len(matmuls) == 4 and not any(p.requires_grad for m in matmuls for p in m.parameters())
    fc = q.get_submodule("blocks.0.mlp.fc1")
    assert isinstance(fc, IntLinear) and isinstance(q.get_submodule("patch_embed.proj"), IntConv2d)
    assert fc.weight_codes.dtype == torch.int8
    assert fc.weight_codes.min() >= -8 and fc.weight_codes.max() <= 7
    assert not any(isinstance(m, QuantLinear) for m in q.modules())
    assert not any(p.requires_grad for name, p in q.named_parameters() if "quantizer" in name)
    assert not hasattr(fc, "weight")  # FP weights are gone


def test_ternary_codes(calib):
    q = vitqc.compile(tiny_vit(), "canonicalize,insert_quantizers{weight_bits=1.58},calibrate,materialize", calib,
                      quiet=True).quantized
    codes = q.get_submodule("blocks.0.attn.qkv").weight_codes
    assert set(codes.unique().tolist()) <= {-1, 0, 1}


def test_each_integer_layer_is_the_dequantized_formula_on_its_own_input(calib):
    """Layer by layer, no propagation: the integer kernel vs Q_in(x) @ dequantized_weight^T + b in float."""
    for pipe in ("minmax-w8a8", "minmax-w4a4",
                 "canonicalize,insert_quantizers{act_granularity='token',weight_symmetric=false},calibrate,materialize"):
        q = vitqc.compile(tiny_vit(), pipe, calib, quiet=True).quantized
        seen = int_layer_io(q, torch.cat(calib)[:8])
        assert len(seen) == 10
        for name, (inp, out) in seen.items():
            layer = q.get_submodule(name)
            with torch.no_grad():
                x = layer.quantize_input(inp)
                if isinstance(layer, IntLinear):
                    ref = F.linear(x, layer.dequantized_weight(), layer.bias)
                else:
                    ref = F.conv2d(x, layer.dequantized_weight(), layer.bias, layer.stride)
            assert _rel(out, ref) <= 1e-5, (pipe, name)


def test_gelu_becomes_xnnpacks_rational_gelu_unless_aten_is_asked(calib):
    from vitqc.quant.rational_gelu import rational_gelu

    x = torch.cat(calib)[:8]
    for gelu, expected in (("xnnpack", 2), ("aten", 0)):
        q = vitqc.compile(tiny_vit(), f"canonicalize,insert_quantizers,calibrate,materialize{{gelu='{gelu}'}}", calib,
                          quiet=True).quantized
        record = q.meta["vitqc"]["record"]["materialize"]
        assert (record["gelu"], record["rational_gelus"]) == (gelu, expected)
        targets = [n.target for n in q.graph.nodes]
        assert targets.count(rational_gelu) == expected
        assert sum(isinstance(m, torch.nn.GELU) for m in q.modules()) == 2 - expected
        assert torch.isfinite(q(x)).all()


def test_tanh_gelu_is_left_as_it_is(calib):
    model = tiny_vit()
    for block in model.blocks:
        block.mlp.act = torch.nn.GELU(approximate="tanh")
    q = vitqc.compile(model, "minmax-w8a8", calib, quiet=True).quantized
    assert q.meta["vitqc"]["record"]["materialize"]["rational_gelus"] == 0


def test_layer_norm_becomes_pairwise_unless_aten_is_asked(calib):
    from vitqc.quant.pairwise_layer_norm import pairwise_layer_norm

    x = torch.cat(calib)[:8]
    outputs = {}
    for choice, expected in (("pairwise", 5), ("aten", 0)):
        q = vitqc.compile(tiny_vit(), f"canonicalize,insert_quantizers,calibrate,materialize{{layer_norm='{choice}'}}",
                          calib, quiet=True).quantized
        record = q.meta["vitqc"]["record"]["materialize"]
        assert (record["layer_norm"], record["pairwise_layer_norms"]) == (choice, expected)
        assert [n.target for n in q.graph.nodes].count(pairwise_layer_norm) == expected
        calls = [n for n in q.graph.nodes if n.op == "call_module"]
        assert sum(isinstance(q.get_submodule(n.target), torch.nn.LayerNorm) for n in calls) == 5 - expected
        outputs[choice] = q(x)
    # the same model up to float rounding (and the activation codes it moves)
    assert float((outputs["pairwise"] - outputs["aten"]).abs().max() / outputs["aten"].abs().max()) < 0.05
