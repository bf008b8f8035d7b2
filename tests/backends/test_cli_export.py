"""``vitqc export``: one-line errors (exit 2, nothing written) and a packed export that loads back."""
import pytest
import torch

from tests.conftest import run_cli as run
from vitqc.backends.packed import load_packed


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return tiny_artifact


@pytest.mark.parametrize("args, message", [
    (["--backend", "tflite"], "unknown backend 'tflite'"),
    (["--backend", "packed", "--ternary", "base4"], "--ternary must be 2bit or base3"),
    (["--backend", "packed", "--fp32"], "--fp32 does not apply to --backend packed (its options: --ternary)"),
    (["--backend", "packed", "--attention", "fp32"], "--attention does not apply to --backend packed"),
    (["--backend", "executorch", "--attention", "int8"], "--attention must be vitqc or fp32"),
    (["--backend", "executorch", "--batch", "0"], "--batch must be >= 1, not 0"),
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
    assert code == 2 and "broken vitqc file: not a complete zip archive" in err
    assert not (tmp_path / "m.pt2").exists()


def test_packed_export_writes_a_loadable_program(artifact, tmp_path, capsys):
    path, gm = artifact
    target = tmp_path / "tiny.packed"  # no extension: files are recognised by content
    code, out, _ = run(["export", path, "--backend", "packed", "--out", target], capsys)
    assert code == 0, out
    assert "lowered 10 weight layers and 4 attention matmuls (0 left as the artifact runs them)" in out
    assert "bits/weight" in out and f"wrote {target}" in out
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.packed"]  # no temporary file left behind
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
