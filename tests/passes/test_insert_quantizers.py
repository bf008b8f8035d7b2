import operator

import pytest
import torch
from torch import fx

from tests.conftest import tiny_vit
from vitqc.capture import capture
from vitqc.errors import PassCheckFailed, VitqcError
from vitqc.passes.base import CompileContext, get_pass
from vitqc.passes.insert_quantizers import quantizers
from vitqc.quant.modules import QuantConv2d, QuantLinear
from vitqc.quant.quantizer import UniformQuantizer


def canonical_vit(**kwargs):
    model = tiny_vit(**kwargs)
    gm = capture(model, torch.randn(1, 3, 16, 16))
    return get_pass("canonicalize")()(gm).graph_module


def run(gm, **options):
    ctx = CompileContext(quiet=True)
    return get_pass("insert_quantizers")(options)(gm, ctx).graph_module, ctx


def test_rules_by_op_kind_on_a_vit():
    gm, ctx = run(canonical_vit())  # depth 2
    mods = dict(gm.named_modules())
    linears = [n for n, m in mods.items() if isinstance(m, QuantLinear)]
    # per block: qkv, proj, fc1, fc2; plus the head
    assert len(linears) == 2 * 4 + 1
    assert isinstance(mods["patch_embed.proj"], QuantConv2d)
    assert all(m.input_quantizer is not None for m in mods.values() if isinstance(m, (QuantLinear, QuantConv2d)))
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.matmul, torch.matmul)]
    assert len(matmuls) == 4
    for mm in matmuls:  # both inputs of both attention matmuls are quantizer outputs
        for arg in mm.args[:2]:
            assert arg.op == "call_module" and isinstance(gm.get_submodule(arg.target), UniformQuantizer)
    softmax_q = [n for n in gm.graph.nodes if n.op == "call_module" and "softmax" in n.target]
    assert len(softmax_q) == 2
    # the softmax quantizer feeds attn @ v directly: it is not quantized twice
    assert all(any(u.target in (operator.matmul, torch.matmul) for u in n.users) for n in softmax_q)
    kinds = [layer["kind"] for layer in ctx.record["insert_quantizers"]["layers"]]
    assert kinds.count("QuantLinear") == 9 and kinds.count("softmax") == 2 and kinds.count("matmul") == 4


def test_keep_and_skip_and_bits():
    gm, _ = run(canonical_vit(), weight_bits=4, act_bits=4, keep={"head": 8, "blocks.1.mlp": 6},
                skip=["patch_embed"])
    mods = dict(gm.named_modules())
    assert mods["head"].weight_quantizer.bits == 8 and mods["head"].input_quantizer.bits == 8
    assert mods["blocks.1.mlp.fc1"].weight_quantizer.bits == 6
    assert mods["blocks.0.mlp.fc1"].weight_quantizer.bits == 4
    assert type(mods["patch_embed.proj"]) is torch.nn.Conv2d
    assert mods["blocks.0.attn.qkv"].weight_quantizer.granularity == "channel"


@pytest.mark.parametrize("options, message", [
    ({"weight_bits": 5.5}, r"^insert_quantizers.weight_bits must be one of 1.58, 2, 3, .* not 5.5$"),
    ({"keep": {"head": 9}}, r"^insert_quantizers.keep.head must be one of"),
    ({"act_bits": 1.58}, r"ternary .* activations are symmetric only: set insert_quantizers.act_symmetric=true$"),
])
def test_bit_widths_it_cannot_quantize_to_are_refused_in_one_line(options, message):
    with pytest.raises(VitqcError, match=message):
        get_pass("insert_quantizers")(options)
    get_pass("insert_quantizers")(act_bits=1.58, act_symmetric=True)  # symmetric ternary activations are fine


def test_requires_canonical_graph():
    model = tiny_vit()
    gm = fx.symbolic_trace(model)  # fused attention still present
    with pytest.raises(PassCheckFailed, match="requires 'canonical'.*canonicalize"):
        run(gm)


def test_quantizers_are_uncalibrated_until_calibrate():
    gm, _ = run(canonical_vit())
    with pytest.raises(RuntimeError, match="before calibration"):
        gm(torch.randn(1, 3, 16, 16))
    assert len(quantizers(gm)) > 0
