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
    kinds = [layer["kind"] for layer in ctx.layers.to_list()]
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


# ------------------------------------------------------------------------------ roles, rules record (issue 21)
class _HFStyle(torch.nn.Module):
    """transformers-style names: neither `head` nor `patch_embed` is a module path."""

    def __init__(self):
        super().__init__()
        self.projection = torch.nn.Conv2d(3, 16, 4, 4)
        self.layer = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 16), torch.nn.GELU(),
                                         torch.nn.Linear(16, 16))
        self.classifier = torch.nn.Linear(16, 3)

    def forward(self, x):
        x = self.projection(x).flatten(2).transpose(1, 2)
        x = x + self.layer(x)
        return self.classifier(x.mean(1))


def test_head_and_patch_embed_name_roles_when_no_path_matches():
    gm = capture(_HFStyle(), torch.randn(2, 3, 16, 16))
    gm = get_pass("canonicalize")()(gm).graph_module
    gm, ctx = run(gm, weight_bits=4, act_bits=4, keep={"head": 8, "patch_embed": 8})
    bits = {n: m.weight_quantizer.bits for n, m in gm.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    assert bits == {"projection": 8, "layer.1": 4, "layer.3": 4, "classifier": 8}
    assert ctx.record["insert_quantizers"]["roles"] == {"head": ["classifier"], "patch_embed": ["projection"]}


def test_a_path_that_exists_wins_over_the_role():
    gm, ctx = run(canonical_vit(), weight_bits=4, keep={"head": 8})
    assert "roles" not in ctx.record["insert_quantizers"]
    assert gm.get_submodule("head").weight_quantizer.bits == 8


class _OwnForward(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_a_linear_subclass_is_traced_into_and_its_weight_quantized():
    model = torch.nn.Sequential(_OwnForward(4, 4), torch.nn.Linear(4, 2))
    gm = get_pass("canonicalize")()(capture(model, torch.randn(2, 4))).graph_module
    gm, _ = run(gm)
    assert isinstance(gm.get_submodule("0"), QuantLinear)  # F.linear of its forward, lifted; the `* 2` stays


class _OwnForwardLeaf(_OwnForward):
    pass


def test_a_linear_with_its_own_forward_kept_whole_is_not_wrapped_and_is_reported(capsys):
    from vitqc.capture import register_leaf_module

    register_leaf_module(_OwnForwardLeaf)
    model = torch.nn.Sequential(_OwnForwardLeaf(4, 4), torch.nn.Linear(4, 2))
    gm = get_pass("canonicalize")()(capture(model, torch.randn(2, 4))).graph_module
    ctx = CompileContext()
    gm = get_pass("insert_quantizers")()(gm, ctx).graph_module
    assert isinstance(gm.get_submodule("1"), QuantLinear) and type(gm.get_submodule("0")) is _OwnForwardLeaf
    assert "0 (not recognised: _OwnForwardLeaf call (a Linear with its own forward, kept whole))" in capsys.readouterr().err
    with pytest.raises(VitqcError, match="--strict"):
        get_pass("insert_quantizers")()(get_pass("canonicalize")()(capture(model, torch.randn(2, 4))).graph_module,
                                        CompileContext(strict=True))
