"""The packed backend against the integer program it was lowered from (tiny ViT: W8A8, W4A8, W4A4).

Ternary, asymmetric weights and per-token activations, from an artifact: test_packed_artifact.py."""
import io
import zipfile

import pytest
import torch

import vitqc
from tests.conftest import int_layer_io, tiny_vit
from vitqc.backends.packed import PackedLinear, PackedPatchConv, load_packed, lower_packed, save_packed
from vitqc.errors import VitqcError

W4A8 = "canonicalize,insert_quantizers{weight_bits=4,act_bits=8},calibrate,materialize"


def calib_batches():
    g = torch.Generator().manual_seed(1)
    return list(torch.randn(64, 3, 16, 16, generator=g).split(16))


def _images(n=32):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def _rel(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def lowered():
    """Each scheme compiled once and lowered once (lowering = two torch.export traces: the slow part)."""
    out = {}
    for name, pipe in (("w8a8", "minmax-w8a8"), ("w4a8", W4A8), ("w4a4", "minmax-w4a4")):
        gm = vitqc.compile(tiny_vit(), pipe, calib_batches(), quiet=True).quantized
        out[name] = (gm, lower_packed(gm))
    return out


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8", "w4a4"])
def test_packed_is_bit_identical_to_the_integer_program(lowered, scheme):
    """Both call the same integer kernels on the same codes: not close, equal (any batch size)."""
    gm, packed = lowered[scheme]
    x = _images()
    with torch.no_grad():
        ref = gm(x)
        for unpack in ("call", "load"):
            module = packed.module(unpack)
            assert torch.equal(module(x), ref)
            assert torch.equal(module(x[:3]), ref[:3])
    s = packed.manifest["summary"]
    assert s["weight_layers"] == 10 and s["attention_matmuls"] == 4 and s["not_lowered"] == 0


def test_every_packed_layer_matches_its_integer_layer_on_the_same_input(lowered):
    """Layer by layer: the packed layer (unpacked weights) computes exactly what the integer layer does."""
    for scheme in ("w8a8", "w4a4"):
        gm, packed = lowered[scheme]
        seen = int_layer_io(gm, _images(8))
        assert len(seen) == 10
        for name, (inp, out) in seen.items():
            layer = packed.eager.get_submodule(name)
            assert isinstance(layer, (PackedLinear, PackedPatchConv))
            with torch.no_grad():
                assert torch.equal(layer(inp), out), (scheme, name)


def test_weights_are_stored_packed(lowered):
    _, w4a8 = lowered["w4a8"]
    _, w4a4 = lowered["w4a4"]
    formats = {l["path"]: l["weight_format"] for l in w4a4.manifest["layers"] if l["kind"] != "matmul"}
    assert formats["head"] == "int8" and formats["patch_embed.proj"] == "int8"  # kept at 8 bits by the pipeline
    assert formats["blocks.0.mlp.fc1"] == "bits4"
    fc1 = w4a8.eager.get_submodule("blocks.0.mlp.fc1")
    assert fc1.weight_packed.dtype == torch.uint8 and fc1.weight_packed.shape == (64, 16)  # 32 inputs, 2 a byte
    assert fc1.weight_zero_point is None  # symmetric weights store no zero point
    matmuls = [l for l in w4a8.manifest["layers"] if l["kind"] == "matmul"]  # kept as the source's IntMatmul
    assert len(matmuls) == 4 and all(l["path"].startswith("blocks.") and l["path"].endswith("_int") for l in matmuls)


def test_int_mm_takes_any_shape_on_cpu():
    """The CUDA kernel wants M > 16 and K, N multiples of 8; the CPU one (used here) takes anything."""
    for m, k, n in ((1, 7, 3), (17, 32, 96), (5, 384, 10)):
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        assert torch.equal(torch._int_mm(a, b.t()), a.int() @ b.int().t())


def test_save_load_round_trip_without_pickle(lowered, tmp_path):
    gm, packed = lowered["w4a8"]
    path = save_packed(packed, tmp_path / "m.packed")
    names = zipfile.ZipFile(path).namelist()
    assert sorted(names) == ["manifest.json", "program/program.json", "program/weights.safetensors"]
    loaded = load_packed(path)
    assert loaded.manifest == packed.manifest and loaded.eager is None
    x = _images(5)
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), packed.module()(x))
        assert torch.equal(loaded.module("load")(x), packed.module()(x))
    state = loaded.program.state_dict
    assert state["blocks.0.mlp.fc1.weight_packed"].dtype == torch.uint8


def test_errors_are_one_line():
    with pytest.raises(VitqcError, match="materialize"):
        lower_packed(vitqc.compile(tiny_vit(), "canonicalize,insert_quantizers,calibrate", calib_batches(), quiet=True).quantized)
    with pytest.raises(VitqcError, match="no integer layers"):
        lower_packed(tiny_vit())
    with pytest.raises(VitqcError, match="ternary"):
        lower_packed(tiny_vit(), ternary="base4")
    with pytest.raises(VitqcError, match="not found"):
        load_packed("/nonexistent/m.pt2")
    with pytest.raises(VitqcError, match="broken vitqc file: not a complete zip"):
        buf = io.BytesIO(b"not a zip")
        path = __import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "x.pt2"
        path.write_bytes(buf.getvalue())
        load_packed(path)


def test_compiled_module_computes_what_the_eager_one_does(lowered):
    _, packed = lowered["w4a8"]
    x = _images(4)
    with torch.no_grad():
        eager = packed.module()(x)
        compiled = packed.module(compile=True)(x)
    # inductor may reorder float ops around the integer GEMMs: equal up to float rounding, same predictions
    assert _rel(compiled, eager) <= 1e-4 and torch.equal(compiled.argmax(-1), eager.argmax(-1))
