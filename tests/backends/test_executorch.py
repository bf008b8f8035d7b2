"""ExecuTorch lowering (XNNPACK): the .pte loads in executorch.runtime, runs, and computes vitqc's program.

Static per-tensor grids of any width (A8 down to A3) and per-token grids run on vitqc's own codes; the tiny ViT's
.pte agrees with vitqc's integer program up to float rounding, a linear on its own bit for bit."""
import functools

import pytest
import torch
from torch import nn

import vitqc
from tests.conftest import tiny_vit

pytest.importorskip("executorch")

from vitqc.backends.executorch import (describe_substitution, float_program, load_pte, lower_executorch,  # noqa: E402
                                       run_pte, save_pte)
from vitqc.quant.pairwise_layer_norm import pairwise_layer_norm  # noqa: E402

W4A8_HEAD8 = "canonicalize,insert_quantizers{weight_bits=4,act_bits=8,keep={head=8}},calibrate,materialize"
W4A4_TOKEN = ("canonicalize,insert_quantizers{weight_bits=4,act_bits=4,act_granularity='token',keep={head=8,patch_embed=8}},"
              "calibrate,materialize")
W8A8_TOKEN = W4A4_TOKEN.replace("weight_bits=4,act_bits=4", "weight_bits=8,act_bits=8")


def _calib():
    return list(torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)).split(16))


@functools.lru_cache(maxsize=None)
def _compiled(pipeline: str):
    """The tiny ViT compiled once per pipeline for the whole module (tests do not change it)."""
    return vitqc.compile(tiny_vit(), pipeline, _calib(), quiet=True).quantized


def _images(n=8):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(3))


def _rel(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


def _run(result, tmp_path, x, batch=2):
    return run_pte(load_pte(save_pte(result, tmp_path / "m.pte")), x, batch=batch)


@pytest.fixture(scope="module")
def w4a8():
    return _compiled(W4A8_HEAD8)


def test_float_program_plans_each_layer(w4a8):
    gm, plans, _, _ = float_program(w4a8)
    by_path = {p.path: p for p in plans}
    assert by_path["blocks.0.mlp.fc1"].device_weight == "qc4w" and by_path["head"].device_weight == "qc8w"
    # the patch embedding runs as patches x the same int8 GEMM vitqc's IntConv2d computes
    assert by_path["patch_embed.proj"].device_weight == "qc4w"
    assert {p.device_act for p in plans} == {"static-int8"}
    # PT2E gets vitqc's output scale s * w_s per channel; the float layer holds codes * that scale, so PT2E's
    # rounding gives vitqc's codes back
    fc1, layer = w4a8.get_submodule("blocks.0.mlp.fc1"), gm.get_submodule("blocks.0.mlp.fc1")
    s = fc1.input_quantizer.scale_tensor()
    assert torch.equal(by_path["blocks.0.mlp.fc1"].scale, s * fc1.weight_scale.reshape(-1))
    weight = layer.layer.weight
    assert weight.shape[1] == fc1.in_features + 2  # two anchor columns, zero weights
    assert torch.equal(torch.round(weight[:, :-2] / by_path["blocks.0.mlp.fc1"].scale[:, None]),
                       fc1.weight_codes.float()) and not weight[:, -2:].any()
    line = describe_substitution(plans)
    assert "\n" not in line and "XNNPACK W4/8A8" in line and "exact up to float rounding" in line


def test_pte_loads_runs_and_computes_vitqc_static_a8(w4a8, tmp_path):
    lines = []
    result = lower_executorch(w4a8, batch=2, announce=lines.append)
    assert len(lines) == 1 and lines[0] == result.substitution  # said once, before lowering
    assert result.exact and result.cost is None
    # LayerNorm, attention matmuls, qkv split and the quantizers rewritten into XNNPACK ops, constants folded: one
    # segment per LayerNorm (+ 1), split by its square root on the portable kernel (correctly rounded, as the
    # program's); outside them only that and copies the edge dialect makes around it
    norms = sum(n.target is pairwise_layer_norm for n in w4a8.graph.nodes)
    assert norms == 5 and result.delegates == norms + 1
    assert set(result.portable_ops) <= {"dim_order_ops._to_dim_order_copy.default", "aten.sqrt.default"}
    assert result.portable_ops["aten.sqrt.default"] == norms
    x = _images(6)
    got = _run(result, tmp_path, x)
    with torch.no_grad():
        ref = w4a8(x)
    assert got.shape == ref.shape
    # static A8 on vitqc's grid: vitqc's codes and integer GEMMs, the program's GELU and LayerNorm; only softmax's
    # exp rounds differently, and here no code moved (the A8 model of the previous backend was 10 % off)
    assert _rel(got, ref) < 1e-6 and torch.equal(got.argmax(1), ref.argmax(1))
    assert [l["device"] for l in result.layers if l["path"] == "blocks.0.mlp.fc1"] == ["qc4w+dynA8"]


@pytest.mark.parametrize("pipeline", ["minmax-w3a3", "minmax-w6a6",
                                      W4A4_TOKEN.replace("act_bits=4", "act_bits=3")])
def test_every_activation_grid_runs_exactly(pipeline, tmp_path):
    """A3 and A6 per tensor (no 255-step grid) and A3 per token: XNNPACK's int8 rows pinned to vitqc's grid."""
    q = _compiled(pipeline)
    result = lower_executorch(q, batch=2, announce=None)
    assert result.exact and "exact up to float rounding" in result.substitution
    # the quantizers run inside XNNPACK's delegates, not on portable kernels between them
    assert not {"aten.round.default", "aten.amax.default", "aten.amin.default"} & set(result.portable_ops)
    x = _images()
    got = _run(result, tmp_path, x)
    with torch.no_grad():
        ref = q(x)
    assert _rel(got, ref) < 1e-5 and torch.equal(got.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_a_static_linear_is_bit_identical_to_vitqc(weight_bits, tmp_path):
    """vitqc's int8 codes go in at scale 1, the weight scale is vitqc's s * w_s and the bias its offset, so
    XNNPACK's epilogue fma(acc, s * w_s, offset) is vitqc's addcmul (one rounding with FMA, as ATen computes it on
    this CPU): the same floats, not close ones."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 10)).eval()
    calib = [torch.randn(16, 5, 64) for _ in range(4)]
    q = vitqc.compile(mlp, f"canonicalize,insert_quantizers{{weight_bits={weight_bits},act_bits=8}},calibrate,"
                           "materialize", calib, quiet=True).quantized
    result = lower_executorch(q, batch=2, announce=None)
    x = torch.randn(8, 5, 64, generator=torch.Generator().manual_seed(4))
    got = _run(result, tmp_path, x)
    with torch.no_grad():
        ref = q(x)
    assert torch.equal(got, ref)


def test_per_token_a4_runs_exactly_as_vitqc(tmp_path):
    q = _compiled(W4A4_TOKEN)
    result = lower_executorch(q, batch=2, announce=None)
    by_path = {l["path"]: l["activation"] for l in result.layers}
    assert by_path.pop("head") == "xnnpack-grid"  # kept at A8 per token: XNNPACK's own rounding is vitqc's
    assert by_path.pop("patch_embed.proj") == "static-int8"  # the image is quantized per tensor
    assert set(by_path.values()) == {"anchored"}
    got = _run(result, tmp_path, _images())
    with torch.no_grad():
        ref = q(_images())
    assert _rel(got, ref) < 1e-5 and torch.equal(got.argmax(1), ref.argmax(1))


@pytest.mark.parametrize("ratio", [None, 0.8])
def test_per_token_a8_is_left_to_xnnpack_and_still_follows_vitqc(ratio, tmp_path):
    """Per-token A8: vitqc's rounding is not computed, XNNPACK's dynamic int8 of the (clipped) row is the same
    grid; the .pte still computes vitqc's program up to float rounding, with a learned clip ratio too."""
    q = vitqc.compile(tiny_vit(), W8A8_TOKEN, _calib(), quiet=True).quantized
    if ratio is not None:
        with torch.no_grad():
            for name, t in [*q.named_parameters(), *q.named_buffers()]:
                if name.endswith("input_quantizer.clip_ratio"):
                    t.fill_(ratio)
    gm, plans, _, _ = float_program(q)
    fc1 = gm.get_submodule("blocks.0.mlp.fc1")
    assert type(fc1).__name__ == "ClippedInput" and fc1.ratio == pytest.approx(ratio or 1.0)
    assert {p.device_act for p in plans} == {"xnnpack-grid", "static-int8"}  # the patch embedding: per tensor
    got = _run(lower_executorch(q, batch=2, announce=None), tmp_path, _images())
    with torch.no_grad():
        ref = q(_images())
    assert _rel(got, ref) < 1e-5 and torch.equal(got.argmax(1), ref.argmax(1))


def test_fp32_baseline_drops_every_activation_quantizer(tmp_path):
    """The baseline a quantized .pte is timed against: vitqc's dequantized weights, no quantizer, no rounding."""
    q = _compiled(W4A4_TOKEN)
    gm, _, _, _ = float_program(q, activations=False)
    targets = {n.target for n in gm.graph.nodes}
    assert torch.ops.aten.round.default not in targets and torch.ops.aten.matmul.default in targets
    assert not any(type(m).__name__ in ("AnchoredInput", "StaticInt8Linear", "ActBuffers", "IntMatmul")
                   for m in gm.modules())
    result = lower_executorch(q, fp32=True, batch=2, announce=None)
    assert {l["activation"] for l in result.layers} == {"fp32"}
    # the class token's expand is folded at lowering; the LayerNorms' square roots (5) split the delegate
    assert result.delegates == 6
    assert set(result.portable_ops) <= {"dim_order_ops._to_dim_order_copy.default", "aten.sqrt.default"}
    x = _images(4)
    got = _run(result, tmp_path, x)
    with torch.no_grad():
        ref, quantized = gm(x), q(x)
    assert _rel(got, ref) < 1e-4
    assert _rel(quantized, ref) > 1e-3  # the A4 rounding is really gone


def test_inexact_substitutions_are_measured_or_refused(tmp_path):
    """attention="fp32" drops vitqc's attention quantizers: said in the line with its measured cost, or refused
    with exact=True in one line before anything is lowered."""
    q = _compiled("minmax-w4a4")
    with pytest.raises(vitqc.VitqcError, match=r"no exact XNNPACK form for: attention matmuls in fp32") as info:
        lower_executorch(q, batch=2, attention="fp32", exact=True, announce=None)
    assert "\n" not in str(info.value)
    result = lower_executorch(q, batch=2, attention="fp32", check_inputs=_images(8), announce=None)
    assert not result.exact and result.cost["images"] == 8 and result.cost["inputs"] == "given inputs"
    assert 0 <= result.cost["agreement"] <= 1 and 0 < result.cost["sqnr_db"] < 100  # A4 attention: a real change
    assert "NOT exact: attention matmuls in fp32" in result.substitution and "logit SQNR" in result.substitution
    # the .pte runs the substituted program: static layers take vitqc's codes, so the float program is its twin
    got = _run(result, tmp_path, _images(4))
    gm, _, _, _ = float_program(q, attention="fp32")
    with torch.no_grad():
        ref, vitqc_out = gm(_images(4)), q(_images(4))
    assert _rel(got, ref) < 0.1 * _rel(vitqc_out, ref)
    with pytest.raises(vitqc.VitqcError, match="attention='int8'"):
        float_program(q, attention="int8")


def test_asymmetric_weights_go_centred_on_their_zero_point(tmp_path):
    """4-bit asymmetric weights: codes minus zero point fit int8 exactly (qc8w); the static input keeps its grid
    through anchors (the fused epilogue needs symmetric weights)."""
    q = vitqc.compile(tiny_vit(), "canonicalize,insert_quantizers{weight_bits=4,act_bits=8,weight_symmetric=false},"
                                  "calibrate,materialize", _calib(), quiet=True).quantized
    result = lower_executorch(q, batch=2, announce=None)
    assert result.exact
    fc1 = next(l for l in result.layers if l["path"] == "blocks.0.mlp.fc1")
    assert fc1["device"] == "qc8w+dynA8" and fc1["activation"] == "anchored"
    got = _run(result, tmp_path, _images())
    with torch.no_grad():
        ref = q(_images())
    assert _rel(got, ref) < 1e-5 and torch.equal(got.argmax(1), ref.argmax(1))


def test_four_bit_weights_are_packed_two_a_byte():
    """W4 against W8 of the same model: the .pte shrinks by half a byte per weight (qc4w packs pairs)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).eval()
    calib = [torch.randn(8, 4, 256) for _ in range(2)]
    sizes = {}
    for bits in (8, 4):
        q = vitqc.compile(mlp, f"canonicalize,insert_quantizers{{weight_bits={bits},act_bits=8}},calibrate,materialize",
                          calib, quiet=True).quantized
        result = lower_executorch(q, batch=1, announce=None)
        sizes[bits] = len(result.buffer)
        assert {l["device"] for l in result.layers} == {f"qc{bits}w+dynA8"}
    assert 0.45 < (sizes[8] - sizes[4]) / (2 * 256 * 512) < 0.55
