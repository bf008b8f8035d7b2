"""``vitqc export``: one-line errors (exit 2, nothing written) and a packed export that loads back."""
import pytest
import torch

import vitqc
from tests.conftest import run_cli as run
from tests.conftest import tiny_vit
from vitqc.artifact import export_program, save_artifact
from vitqc.backends.packed import load_packed


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    calib = list(torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1)).split(16))
    gm = vitqc.compile(tiny_vit(), "minmax-w4a8", calib, quiet=True)
    layers = gm.meta["vitqc"]["record"]["insert_quantizers"]["layers"]
    path = tmp_path_factory.mktemp("art") / "tiny.vitqc"
    save_artifact(path, export_program(gm, calib[0][:1]), None,
                  {"layers": layers, "input_shape": [3, 16, 16], "pipeline": gm.meta["vitqc"]["pipeline"]})
    return path, gm


@pytest.mark.parametrize("args, message", [
    (["--backend", "tflite"], "unknown backend 'tflite'"),
    (["--backend", "packed", "--ternary", "base4"], "--ternary must be 2bit or base3"),
    (["--backend", "packed", "--fp32"], "--fp32, --batch and --attention apply to --backend executorch only"),
    (["--backend", "packed", "--attention", "fp32"], "--fp32, --batch and --attention apply to --backend executorch only"),
    (["--backend", "executorch", "--attention", "int8"], "--attention must be vitqc or fp32"),
    (["--backend", "executorch", "--batch", "0"], "--batch must be at least 1"),
    (["--backend", "packed", "--out", "/nonexistent-dir/m.pt2"], "output directory '/nonexistent-dir' does not exist"),
])
def test_option_errors_are_one_line(artifact, args, message, capsys, tmp_path):
    code, out, err = run(["export", artifact[0], *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and out == ""


def test_missing_or_unreadable_artifact(tmp_path, capsys):
    code, _, err = run(["export", tmp_path / "none.vitqc", "--backend", "packed", "--out", tmp_path / "m.pt2"], capsys)
    assert code == 2 and "not found" in err
    bad = tmp_path / "bad.vitqc"
    bad.write_bytes(b"not a zip")
    code, _, err = run(["export", bad, "--backend", "packed", "--out", tmp_path / "m.pt2"], capsys)
    assert code == 2 and "not a readable vitqc artifact" in err
    assert not (tmp_path / "m.pt2").exists()


def test_packed_export_writes_a_loadable_program(artifact, tmp_path, capsys):
    path, gm = artifact
    target = tmp_path / "tiny.packed.pt2"
    code, out, _ = run(["export", path, "--backend", "packed", "--out", target], capsys)
    assert code == 0, out
    assert "lowered 10 weight layers and 4 attention matmuls (0 left as the artifact runs them)" in out
    assert "bits/weight" in out and f"wrote {target}" in out
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.packed.pt2"]  # no temporary file left behind
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref, got = gm(x), load_packed(target).module()(x)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-3


def test_executorch_export_exact_or_refused(artifact, tmp_path, capsys):
    """--exact lowers what XNNPACK computes exactly and refuses a substitution in one line, writing nothing."""
    pytest.importorskip("executorch")
    path, gm = artifact
    target = tmp_path / "tiny.pte"
    code, out, err = run(["export", path, "--backend", "executorch", "--exact", "--attention", "fp32", "--out", target],
                         capsys)
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: no exact XNNPACK form for: attention")
    assert not target.exists()
    code, out, _ = run(["export", path, "--backend", "executorch", "--exact", "--batch", "2", "--out", target], capsys)
    assert code == 0, out
    assert "(minmax-w4a8) -> XNNPACK W4/8A8" in out and "exact up to float rounding" in out
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.pte"]
    from vitqc.backends.executorch import load_pte, run_pte

    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = gm(x)
    got = run_pte(load_pte(target), x, batch=2)
    assert torch.equal(got.argmax(1), ref.argmax(1)) and float((got - ref).abs().max() / ref.abs().max()) < 1e-5
