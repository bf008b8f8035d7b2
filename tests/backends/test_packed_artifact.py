"""The packed backend lowered from artifacts: ternary weights in both packings, asymmetric weights with
dynamic per-token activations (every zero-point correction of the integer GEMM)."""
import torch

import vitqc
from tests.conftest import TINY_PREPROCESS, int_layer_io, tiny_vit
from vitqc.artifact import load_artifact
from vitqc.data import Preprocess
from vitqc.backends.packed import lower_packed

TERNARY_A8 = "canonicalize,insert_quantizers{weight_bits=1.58,act_bits=8},calibrate,materialize"
ASYM_TOKEN = ("canonicalize,insert_quantizers{weight_bits=4,act_bits=4,weight_symmetric=false,"
              "act_granularity='token'},calibrate,materialize")


def calib_batches():
    return list(torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)).split(16))


def _images(n=32):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def _rel(got, ref):
    return float((got - ref).abs().max() / ref.abs().max())


def _artifact(tmp_path, pipeline):
    result = vitqc.compile(tiny_vit(), pipeline, calib_batches(), preprocess=Preprocess(**TINY_PREPROCESS),
                           out=tmp_path / "m.vitqc", quiet=True)
    return result.quantized, result.path


def test_ternary_from_an_artifact_in_both_packings(tmp_path):
    _, art_path = _artifact(tmp_path, TERNARY_A8)
    art = load_artifact(art_path)
    x = _images()
    with torch.no_grad():
        ref = art.quantized(x)
    sizes = {}
    for ternary in ("2bit", "base3"):
        packed = lower_packed(art_path if ternary == "2bit" else art, ternary=ternary)
        with torch.no_grad():
            got = packed.module()(x)
        assert _rel(got, ref) <= 1e-3 and bool((got.argmax(-1) == ref.argmax(-1)).all())
        fc1 = next(l for l in packed.manifest["layers"] if l["path"] == "blocks.0.mlp.fc1")
        assert fc1["weight_format"] == ("bits2" if ternary == "2bit" else "trit5") and fc1["weight_bits"] == 1.58
        sizes[ternary] = fc1["packed_bytes"]
    assert sizes == {"2bit": 64 * 32 // 4, "base3": 64 * -(-32 // 5)}



def test_asymmetric_weights_and_per_token_activations(tmp_path):
    gm, art_path = _artifact(tmp_path, ASYM_TOKEN)
    packed = lower_packed(art_path)
    x = _images()
    with torch.no_grad():
        ref, got = gm(x), packed.module()(x)
    assert _rel(got, ref) <= 1e-3 and bool((got.argmax(-1) == ref.argmax(-1)).all())
    acts = {l["act"]["granularity"] for l in packed.manifest["layers"] if l["kind"] == "linear"}
    assert acts == {"token"}
    seen = int_layer_io(gm, _images(8))
    for name, (inp, out) in seen.items():
        layer = packed.eager.get_submodule(name)
        if name != "patch_embed.proj":
            assert layer.weight_zero_point is not None  # asymmetric weights: zero points kept and folded
        with torch.no_grad():
            assert _rel(layer(inp), out) <= 1e-5, name
