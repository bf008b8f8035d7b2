"""ExecuTorch lowering (XNNPACK): the .pte loads in executorch.runtime, runs, and follows vitqc's model."""
import pytest
import torch

import vitqc
from tests.conftest import tiny_vit

pytest.importorskip("executorch")

from vitqc.backends.executorch import (describe_substitution, float_program, load_pte, lower_executorch,  # noqa: E402
                                       run_pte, save_pte)

W4A8_HEAD8 = "canonicalize,insert_quantizers{weight_bits=4,act_bits=8,keep={head=8}},calibrate,materialize"


def _calib():
    return list(torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)).split(16))


@pytest.fixture(scope="module")
def w4a8():
    return vitqc.compile(tiny_vit(), W4A8_HEAD8, _calib(), quiet=True)


def test_float_program_plans_each_layer(w4a8):
    gm, plans, example, _ = float_program(w4a8)
    by_path = {p.path: p for p in plans}
    assert by_path["blocks.0.mlp.fc1"].device_weight == "qc4w" and by_path["head"].device_weight == "qc8w"
    assert by_path["patch_embed.proj"].device_weight == "fp32"
    # vitqc's scales are handed over as they are; the float graph holds the dequantized weights
    assert torch.equal(by_path["blocks.0.mlp.fc1"].scale, w4a8.get_submodule("blocks.0.mlp.fc1").weight_scale.reshape(-1))
    # ... behind vitqc's own input quantizer, which the .pte computes in fp32
    assert torch.equal(gm.get_submodule("blocks.0.mlp.fc1.layer").weight, w4a8.get_submodule("blocks.0.mlp.fc1").dequantized_weight())
    assert by_path["blocks.0.mlp.fc1"].device_act == "re-quantized"  # static A8: XNNPACK rounds it again per row
    line = describe_substitution(plans)
    assert "\n" not in line and "XNNPACK W4/8A8" in line and "dynamic int8" in line


def test_pte_loads_runs_and_follows_vitqc(w4a8, tmp_path):
    lines = []
    result = lower_executorch(w4a8, batch=2, announce=lines.append)
    assert len(lines) == 1 and lines[0] == result.substitution  # said once, before lowering
    # LayerNorm, attention matmuls, qkv split and the quantizers rewritten into XNNPACK ops: one segment; what is
    # left outside is the class token's expand to batch 2 and copies of 0-d constants
    assert result.delegates == 1
    assert set(result.portable_ops) <= {"aten.expand_copy.default", "dim_order_ops._to_dim_order_copy.default"}
    path = save_pte(result, tmp_path / "m.pte")
    method = load_pte(path)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    got = run_pte(method, x, batch=2)
    with torch.no_grad():
        ref = w4a8(x)
    assert got.shape == ref.shape
    # dynamic A8 instead of vitqc's static A8: close, not identical
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.1
    assert [l["device"] for l in result.layers if l["path"] == "blocks.0.mlp.fc1"] == ["qc4w+dynA8"]


W4A4_TOKEN = ("canonicalize,insert_quantizers{weight_bits=4,act_bits=4,act_granularity='token',keep={head=8,patch_embed=8}},"
              "calibrate,materialize")


def test_per_token_a4_runs_exactly_as_vitqc(tmp_path):
    """XNNPACK's dynamic int8 re-quantizes vitqc's A4 per-token codes without loss (x17), so the .pte computes
    vitqc's integer program up to float rounding; the static A8 model above only comes close."""
    q = vitqc.compile(tiny_vit(), W4A4_TOKEN, _calib(), quiet=True)
    result = lower_executorch(q, batch=2, announce=None)
    by_path = {l["path"]: l["activation"] for l in result.layers}
    assert by_path.pop("head") == "xnnpack-grid"  # kept at A8: XNNPACK's own rounding is vitqc's
    assert set(by_path.values()) == {"exact"}
    assert "taken exactly" in result.substitution
    # the quantizers run inside XNNPACK's delegates, not on portable kernels between them
    assert not {"aten.round.default", "aten.amax.default", "aten.amin.default"} & set(result.portable_ops)
    method = load_pte(save_pte(result, tmp_path / "m.pte"))
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    got = run_pte(method, x, batch=2)
    with torch.no_grad():
        ref = q(x)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    assert torch.equal(got.argmax(1), ref.argmax(1))


W8A8_TOKEN = W4A4_TOKEN.replace("weight_bits=4,act_bits=4", "weight_bits=8,act_bits=8")


@pytest.mark.parametrize("ratio", [None, 0.8])
def test_per_token_a8_is_left_to_xnnpack_and_still_follows_vitqc(ratio, tmp_path):
    """Per-token A8: vitqc's rounding is not computed, XNNPACK's dynamic int8 of the (clipped) row is the same
    grid; the .pte still computes vitqc's program up to float rounding, with a learned clip ratio too."""
    q = vitqc.compile(tiny_vit(), W8A8_TOKEN, _calib(), quiet=True)
    if ratio is not None:
        with torch.no_grad():
            for name, t in [*q.named_parameters(), *q.named_buffers()]:
                if name.endswith("input_quantizer.clip_ratio"):
                    t.fill_(ratio)
    gm, plans, _, _ = float_program(q)
    fc1 = gm.get_submodule("blocks.0.mlp.fc1")
    assert type(fc1).__name__ == "ClippedInput" and fc1.ratio == pytest.approx(ratio or 1.0)
    assert {p.device_act for p in plans} == {"xnnpack-grid", "exact"}  # the patch conv keeps vitqc's codes
    result = lower_executorch(q, batch=2, announce=None)
    assert "rounded by XNNPACK's dynamic int8 itself" in result.substitution
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    got = run_pte(load_pte(save_pte(result, tmp_path / "m.pte")), x, batch=2)
    with torch.no_grad():
        ref = q(x)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_fp32_baseline_drops_every_activation_quantizer(tmp_path):
    """The baseline a quantized .pte is timed against: vitqc's dequantized weights, no quantizer, no rounding."""
    q = vitqc.compile(tiny_vit(), W4A4_TOKEN, _calib(), quiet=True)
    gm, _, _, _ = float_program(q, activations=False)
    targets = {n.target for n in gm.graph.nodes}
    assert torch.ops.aten.round.default not in targets and torch.ops.aten.matmul.default in targets
    assert not any(type(m).__name__ in ("QuantizedInput", "ActBuffers", "IntMatmul") for m in gm.modules())
    result = lower_executorch(q, fp32=True, batch=2, announce=None)
    assert {l["activation"] for l in result.layers} == {"fp32"}
    assert result.delegates == 1 and set(result.portable_ops) == {"aten.expand_copy.default"}  # class token, batch 2
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    got = run_pte(load_pte(save_pte(result, tmp_path / "fp32.pte")), x, batch=2)
    with torch.no_grad():
        ref, quantized = gm(x), q(x)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
    assert float((quantized - ref).abs().max() / ref.abs().max()) > 1e-3  # the A4 rounding is really gone


def test_float_attention_keeps_the_linears_quantized(tmp_path):
    """attention="fp32": the attention matmuls lose vitqc's quantizers (said in the substitution line), the
    linears keep theirs, and the .pte follows that float-attention program. Not to 1e-5 as with vitqc's
    attention: XNNPACK's float softmax/bmm differ from torch's in the last bits, and the next A4 quantizer turns
    some of those into whole steps (1 % here), an order of magnitude below what dropping A4 attention changes."""
    q = vitqc.compile(tiny_vit(), W4A4_TOKEN, _calib(), quiet=True)
    gm, plans, _, _ = float_program(q, attention="fp32")
    assert not any(type(m).__name__ == "IntMatmul" for m in gm.modules())
    assert type(gm.get_submodule("blocks.0.mlp.fc1")).__name__ == "QuantizedInput"
    assert {p.device_act for p in plans if p.path != "head"} == {"exact"}
    result = lower_executorch(q, batch=2, attention="fp32", announce=None)
    assert "attention matmuls in fp32 instead of vitqc's" in result.substitution
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    got = run_pte(load_pte(save_pte(result, tmp_path / "m.pte")), x, batch=2)
    with torch.no_grad():
        ref, vitqc_out = gm(x), q(x)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    assert rel(got, ref) < 0.3 * rel(vitqc_out, ref)
    with pytest.raises(vitqc.VitqcError, match="attention='int8'"):
        float_program(q, attention="int8")


@pytest.mark.parametrize("bits,granularity,symmetric,ratio,expected", [
    (8, "token", False, 1.0, "xnnpack-grid"), (8, "token", False, 0.7, "xnnpack-grid"),
    (4, "token", False, 0.9, "exact"), (2, "token", False, 1.0, "exact"),
    (3, "token", False, 1.0, "re-quantized"),  # 7 steps do not divide 255
    (4, "token", True, 1.0, "re-quantized"),  # a symmetric row need not reach both ends of the grid
    (4, "token", False, 1.2, "re-quantized"),  # a ratio above 1 leaves the ends of the grid unused
    (8, "tensor", False, None, "re-quantized"),  # a static range: rows need not reach its ends
])
def test_which_activation_grids_xnnpack_takes_exactly(bits, granularity, symmetric, ratio, expected):
    from vitqc.backends.executorch import _device_act
    from vitqc.backends.program import ActQuant

    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    if granularity == "token":
        act = ActQuant("token", qmin, qmax, clip_ratio=torch.tensor(ratio))
    else:
        act = ActQuant("tensor", qmin, qmax, scale=torch.tensor(0.1), zero_point=torch.tensor(3.0))
    assert _device_act(act) == expected
