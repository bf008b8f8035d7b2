"""The command line end to end on the embedded demo model (no downloads), and its one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitqc.artifact import load_artifact
from tests.conftest import run_cli as run


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """The demo's test digits as an ImageFolder of 8x8 PNGs (pixel values as the model was trained on)."""
    from sklearn.datasets import load_digits

    from vitqc.demo import split_indices

    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    _, test_idx = split_indices(digits.target)
    for i in test_idx[:200]:
        folder = root / str(digits.target[i])
        folder.mkdir(exist_ok=True)
        Image.fromarray((digits.images[i] / 16 * 255).round().astype(np.uint8), mode="L").save(folder / f"{i}.png")
    return root


def test_pipelines_and_passes_list_one_line_each(capsys):
    code, out, _ = run(["pipelines"], capsys)
    assert code == 0
    from vitqc.pipeline import builtin_pipelines

    listed = [line.split()[0] for line in out.strip().splitlines()]
    assert listed == list(builtin_pipelines())
    assert {"minmax-w8a8", "minmax-w4a4", "joint-w4a4", "joint-w3a3", "joint-w1.58a8"} <= set(listed)
    code, out, _ = run(["passes"], capsys)
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert code == 0 and {"canonicalize", "insert_quantizers", "calibrate", "materialize"} <= set(names)


def test_sources_and_backends_list_the_registries(capsys):
    code, out, _ = run(["sources"], capsys)
    assert code == 0
    assert [line.split()[0] for line in out.strip().splitlines()] == ["demo", "images", "inversion", "learned-prompts",
                                                                      "noise", "prompts"]
    code, out, _ = run(["backends"], capsys)
    assert code == 0 and "executorch" in out and "packed" in out and "--ternary" in out and "--batch" in out


def test_passes_name_describes_one_pass(capsys):
    code, out, _ = run(["passes", "joint_optimize"], capsys)
    assert code == 0
    assert "vitqc/passes/joint_optimize.py" in out and "requires: calibrated; ensures: optimized" in out
    row = next(line for line in out.splitlines() if "batch_size" in line)
    assert "int" in row and "32" in row and ">= 1" in row
    code, _, err = run(["passes", "joint_optimise"], capsys)
    assert code == 2 and "unknown pass 'joint_optimise'" in err


def test_compile_demo_then_eval_the_artifact(tmp_path, capsys, digits_folder):
    out_path = tmp_path / "demo.vitqc"
    code, out, err = run(["compile", "demo", "--pipeline", "minmax-w8a8", "--out", out_path,
                          "--set", "calibrate.method=percentile", "--dump-graphs", tmp_path / "graphs"], capsys)
    assert code == 0, err
    assert "top-1 on demo test split" in out and "minmax-w8a8" in out
    art = load_artifact(out_path)
    m = art.manifest
    assert m["model"]["form"] == "demo" and m["overrides"] == ["calibrate.method=percentile"]
    cal = next(p for p in m["pipeline"]["passes"] if p["name"] == "calibrate")
    assert cal["options"]["method"] == "percentile"
    assert {"torch", "timm", "vitqc"} <= set(m["versions"])
    ev = m["summary"]["measurement"]
    assert ev["on"] == "eval" and ev["data"] == "demo test split"
    assert ev["labeled"] == 500 and ev["quantized_top1"] > 0.9 and ev["agreement"] > 0.95
    assert sorted(p.name for p in (tmp_path / "graphs").iterdir())[0] == "00_captured.txt"

    code, out, err = run(["eval", out_path, "--data", digits_folder, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["images"] == 200 and result["agreement"] > 0.95 and result["quantized_top1"] > 0.9
    assert set(result["sqnr_db"]) == set(art.layer_paths) and all(v > 15 for v in result["sqnr_db"].values())


def test_eval_a_plain_model_file(tmp_path, capsys, digits_folder):
    from vitqc.demo import load_demo_model

    path = tmp_path / "model.pt"
    torch.save(load_demo_model(), path)
    code, out, err = run(["eval", path, "--data", digits_folder, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["top1"] > 0.9


@pytest.mark.parametrize("args, message", [
    (["compile", "missing.pt", "--pipeline", "minmax-w8a8", "--calib", "images:."], "does not exist; check the path"),
    (["compile", "demo", "--pipeline", "nope"], "unknown pipeline 'nope'"),
    (["compile", "demo", "--pipeline", "minmax-w8a8", "--set", "calibrate.methd=mse"], "unknown option 'methd'"),
    (["compile", "demo", "--pipeline", "minmax-w8a8", "--set", "nopass.x=1"], "no pass 'nopass'"),
    (["compile", "demo", "--pipeline", "minmax-w8a8", "--out", "/nonexistent-dir/x.vitqc"], "does not exist"),
    (["compile", "demo", "--pipeline", "minmax-w8a8", "--calib", "images:{empty}"], "empty"),
    (["compile", "timm:vit_tiny_patch16_224", "--pipeline", "minmax-w8a8"], "calibration images are required"),
    (["eval", "{empty}", "--data", "{empty}"], "empty"),
    (["compile", "{corrupt}", "--pipeline", "minmax-w8a8", "--calib", "images:."], "corrupt.pt"),
])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path, capsys, args, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.format(empty=tmp_path / "empty", corrupt=tmp_path / "corrupt.pt") for a in args]
    code, out, err = run(args, capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in " ".join(lines), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_console_script_runs_as_installed(tmp_path):
    exe = Path(sys.executable).with_name("vitqc")
    result = subprocess.run([str(exe), "pipelines"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0 and "minmax-w8a8" in result.stdout
    bad = subprocess.run([str(exe), "compile", "demo", "--pipeline", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_interrupted_compile_resumes_from_its_work_dir(tmp_path, capsys, monkeypatch):
    from vitqc.passes import joint_optimize as jo

    args = ["compile", "demo", "--pipeline", "joint-w4a8", "--out", tmp_path / "j.vitqc", "--calib-size", "64",
            "--set", "joint_optimize.iterations=6", "--set", "joint_optimize.checkpoint_every=2",
            "--set", "joint_optimize.batch_size=8", "--device", "cpu"]
    real_save = jo._RunState.save

    def crash(self, path, gm, o):
        real_save(self, path, gm, o)
        if self.step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(jo._RunState, "save", crash)
    assert run(args, capsys)[0] == 130
    assert not (tmp_path / "j.vitqc").exists() and (tmp_path / "j.vitqc.work" / jo.CHECKPOINT_NAME).exists()
    monkeypatch.setattr(jo._RunState, "save", real_save)
    code, out, err = run(args + ["--resume"], capsys)
    assert code == 0, err
    record = load_artifact(tmp_path / "j.vitqc").manifest["record"]["joint_optimize"]
    assert record["resumed_from"] == 4 and record["iterations"] == 6
    assert not (tmp_path / "j.vitqc.work").exists()  # checkpoints are removed once the artifact is written
    code, _, err = run(["compile", "demo", "--pipeline", "joint-w4a8", "--out", tmp_path / "k.vitqc", "--resume"], capsys)
    assert code == 2 and "no work directory" in err
