"""Every broken or hostile input the command line meets: one line on stderr (no traceback), a non-zero exit, and
nothing left behind. One table, one row per input (models, images, pipelines, options, outputs, artifacts,
hostile artifacts, signals, resume)."""
from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli, tiny_vit
from tests.image_trees import random_image_folder
from tests.program_json import first_symbolic_size

CFG = dict(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bicubic",
           crop_pct=1.0)
FACTORIES = f'''
import torch
from tests.conftest import tiny_vit
CFG = {CFG!r}

def build():
    model = tiny_vit()
    model.pretrained_cfg = dict(CFG)
    return model

def nan():
    model = build()
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[0, 0] = float("nan")
    return model

def nocfg():
    return tiny_vit()

def boom():
    raise RuntimeError("factory exploded")

def three():
    return 3
'''


def _rewrite(src: Path, dst: Path, **members) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name not in members:
                zout.writestr(name, zin.read(name))
        for name, data in members.items():
            if data is not None:
                zout.writestr(name, data if isinstance(data, bytes) else json.dumps(data))
    return dst


def _program(art: Path) -> dict:
    return json.loads(zipfile.ZipFile(art).read("quantized/program.json"))


MARKER = "hostile-code-ran"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_artifact):
    """Inputs of every kind, good and bad, in one folder."""
    w = tmp_path_factory.mktemp("world")
    random_image_folder(w / "calib")
    random_image_folder(w / "evaldir", per_class=4)
    (w / "flat").mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i, i, i)).save(w / "flat" / f"{i}.png")
    (w / "empty").mkdir()
    (w / "noimg" / "a").mkdir(parents=True)
    (w / "noimg" / "a" / "notes.txt").write_text("no images here")
    (w / "unreadable" / "a").mkdir(parents=True)
    for i in range(3):
        (w / "unreadable" / "a" / f"{i}.png").write_bytes(b"not a png")
    (w / "floaty" / "a").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((16, 16), 300.0, dtype=np.float32)).save(w / "floaty" / "a" / f"{i}.tif")
    (w / "models.py").write_text(FACTORIES)
    model = tiny_vit()
    model.pretrained_cfg = dict(CFG)
    torch.save(model, w / "model.pt")
    torch.save(model.state_dict(), w / "state.pt")
    (w / "garbage.pt").write_bytes(b"\x00 not a torch file")
    (w / "garbage.pt2").write_bytes(b"not a zip")
    (w / "weights.safetensors").write_bytes(b"")
    (w / "bad.toml").write_text("name = [unclosed")
    (w / "opts5.toml").write_text('name = "x"\n[[passes]]\nname = "calibrate"\noptions = 5\n')
    (w / "nopasses.toml").write_text('name = "x"\n')
    (w / "synerr.toml").write_text('name = "x"\nimports = ["vitqc_synerr_mod"]\n[[passes]]\nname = "canonicalize"\n')
    (w / "vitqc_synerr_mod.py").write_text("def broken(:\n    pass\n")
    (w / "missing_import.toml").write_text('name = "x"\nimports = ["no_such_module_xyz"]\n[[passes]]\nname = "canonicalize"\n')
    art = w / "good.vitqc"
    shutil.copy(tiny_artifact[0], art)
    manifest = json.loads(zipfile.ZipFile(art).read("manifest.json"))
    (w / "truncated.vitqc").write_bytes(art.read_bytes()[:4000])
    _rewrite(art, w / "nomanifest.vitqc", **{"manifest.json": None})
    _rewrite(art, w / "listmanifest.vitqc", **{"manifest.json": [1, 2]})
    _rewrite(art, w / "nokeys.vitqc", **{"manifest.json": {k: v for k, v in manifest.items() if k != "preprocess"}})
    _rewrite(art, w / "badtype.vitqc", **{"manifest.json": {**manifest, "layers": "all"}})
    _rewrite(art, w / "oldformat.vitqc", **{"manifest.json": {**manifest, "format": "vitqc-artifact/1"}})
    code = f"__import__('pathlib').Path({str(w / MARKER)!r}).write_text('ran')"
    program = _program(art)
    node = next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"].endswith("addcmul.default"))
    node["target"] = "torch.serialization.os.system"
    _rewrite(art, w / "hostile_target.vitqc", **{"quantized/program.json": program})
    program = _program(art)
    program["guards_code"] = [f"({code}) is None"]
    _rewrite(art, w / "hostile_guard.vitqc", **{"quantized/program.json": program})
    program = _program(art)
    first_symbolic_size(program)["expr_str"] = code
    _rewrite(art, w / "hostile_sympy.vitqc", **{"quantized/program.json": program})
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {w / MARKER}",))

    _rewrite(art, w / "hostile_pickle.vitqc", **{"quantized/weights.safetensors": pickle.dumps(Payload())})
    _rewrite(art, w / "hostile_pt2.vitqc", **{"quantized.pt2": pickle.dumps(Payload()),
                                              "manifest.json": {**manifest, "format": "vitqc-artifact/1"}})
    return w


M = "{w}/models.py:build"
C = ["--calib", "images:{w}/calib"]
COMPILE = ["compile", M, "--pipeline", "minmax-w8a8", *C]
CASES = [
    # ---- models
    ("model file missing", ["compile", "{w}/missing.pt", "--pipeline", "minmax-w8a8", *C], "does not exist"),
    ("model form unknown", ["compile", "whatisthis", "--pipeline", "minmax-w8a8", *C], "cannot tell what model"),
    ("timm name unknown", ["compile", "timm:vit_nope_patch99", "--pipeline", "minmax-w8a8", *C], "unknown timm model"),
    ("pickle not a torch file", ["compile", "{w}/garbage.pt", "--pipeline", "minmax-w8a8", *C], "could not read"),
    ("pickle holds a state dict", ["compile", "{w}/state.pt", "--pipeline", "minmax-w8a8", *C], "holds a state dict"),
    (".pt2 not a program", ["compile", "{w}/garbage.pt2", "--pipeline", "minmax-w8a8", *C], "not a torch.export program"),
    ("weights given as the model", ["compile", "{w}/weights.safetensors", "--pipeline", "minmax-w8a8", *C],
     "holds only weights"),
    ("factory missing", ["compile", "{w}/models.py:nope", "--pipeline", "minmax-w8a8", *C], "has no 'nope'"),
    ("factory raises", ["compile", "{w}/models.py:boom", "--pipeline", "minmax-w8a8", *C], "factory exploded"),
    ("factory returns no module", ["compile", "{w}/models.py:three", "--pipeline", "minmax-w8a8", *C],
     "not an nn.Module"),
    ("model kwargs not JSON", [*COMPILE, "--model-kwargs", "{{x"], "not valid JSON"),
    ("model kwargs not an object", [*COMPILE, "--model-kwargs", "[1]"], "must be a JSON object"),
    ("model kwargs on a pickle", ["compile", "{w}/model.pt", "--pipeline", "minmax-w8a8", *C, "--model-kwargs",
                                  '{{"depth": 1}}'], "only apply to timm:NAME and FILE.py:factory"),
    ("NaN weight", ["compile", "{w}/models.py:nan", "--pipeline", "minmax-w8a8", *C],
     "parameter 'blocks.1.mlp.fc2.weight' holds 1 non-finite value"),
    ("no data config", ["compile", "{w}/models.py:nocfg", "--pipeline", "minmax-w8a8", *C], "give --img-size"),
    ("checkpoint missing", [*COMPILE, "--checkpoint", "{w}/none.safetensors"], "does not exist"),
    ("checkpoint of another model", ["compile", "timm:vit_tiny_patch16_224", "--pipeline", "minmax-w8a8", *C,
                                     "--checkpoint", "{w}/state.pt"], "does not fit"),
    ("mean without img size", [*COMPILE, "--mean", "0.5,0.5,0.5"], "--mean/--std need --img-size"),
    ("std not numbers", [*COMPILE, "--img-size", "16", "--std", "a,b,c"], "not a comma-separated list"),
    # ---- images
    ("calib missing", ["compile", M, "--pipeline", "minmax-w8a8", "--calib", "images:{w}/nowhere"], "does not exist"),
    ("calib is a file", ["compile", M, "--pipeline", "minmax-w8a8", "--calib", "{w}/bad.toml"], "is a file"),
    ("calib empty", ["compile", M, "--pipeline", "minmax-w8a8", "--calib", "images:{w}/empty"], "is empty"),
    ("calib without images", ["compile", M, "--pipeline", "minmax-w8a8", "--calib", "images:{w}/noimg"],
     "has no images"),
    ("calib unreadable", ["compile", M, "--pipeline", "minmax-w8a8", "--calib", "images:{w}/unreadable"],
     "none of the 3 images"),
    ("float images out of range", ["compile", M, "--pipeline", "minmax-w8a8", "--calib", "images:{w}/floaty"],
     "none of the 2 images"),
    ("calib size 0", [*COMPILE, "--calib-size", "0"], "not positive"),
    ("holdout negative", [*COMPILE, "--holdout", "-1"], "negative"),
    ("calib keyword unknown", ["compile", M, "--pipeline", "minmax-w8a8", "--calib", "blah"], "is not understood"),
    ("calib images: empty", ["compile", M, "--pipeline", "minmax-w8a8", "--calib", "images:"], "needs a directory"),
    ("demo takes no value", ["compile", "demo", "--pipeline", "minmax-w8a8", "--calib", "demo:x"], "takes no value"),
    ("source option malformed", ["compile", M, "--pipeline", "minmax-w8a8", "--calib", "inversion:fast"],
     "is not KEY=VALUE"),
    ("source option unknown", ["compile", M, "--pipeline", "minmax-w8a8", "--calib", "noise:bogus=1"],
     "has no option 'bogus'"),
    ("no calibration", ["compile", M, "--pipeline", "minmax-w8a8"], "calibration images are required"),
    ("eval data flat", [*COMPILE, "--eval-data", "{w}/flat"], "no class subfolders"),
    ("eval data missing", ["eval", "{w}/good.vitqc", "--data", "{w}/nowhere"], "does not exist"),
    ("eval limit 0", ["eval", "{w}/good.vitqc", "--data", "{w}/evaldir", "--limit", "0"], "not positive"),
    # ---- pipelines and options
    ("pipeline unknown", ["compile", M, "--pipeline", "nope", *C], "unknown pipeline 'nope'"),
    ("pipeline file missing", ["compile", M, "--pipeline", "{w}/none.toml", *C], "not found"),
    ("pipeline not TOML", ["compile", M, "--pipeline", "{w}/bad.toml", *C], "not valid TOML"),
    ("pipeline options = 5", ["compile", M, "--pipeline", "{w}/opts5.toml", *C], "must be a table"),
    ("pipeline without passes", ["compile", M, "--pipeline", "{w}/nopasses.toml", *C], "has no [[passes]]"),
    ("pipeline import with a syntax error", ["compile", M, "--pipeline", "{w}/synerr.toml", *C],
     "imports 'vitqc_synerr_mod', which failed: SyntaxError"),
    ("pipeline import missing", ["compile", M, "--pipeline", "{w}/missing_import.toml", *C],
     "imports 'no_such_module_xyz', which failed"),
    ("pass unknown in text", ["compile", M, "--pipeline", "canonicalize,nope", *C], "unknown pass 'nope'"),
    ("--set without a dot", [*COMPILE, "--set", "calibrate=mse"], "use PASS.OPTION=VALUE"),
    ("--set unknown pass", [*COMPILE, "--set", "nopass.x=1"], "has no pass 'nopass'"),
    ("--set unknown option", [*COMPILE, "--set", "calibrate.methd=mse"], "unknown option 'methd'"),
    ("--set out of range", [*COMPILE, "--set", "calibrate.batch_size=0"], "must be >= 1, not 0"),
    ("--set bit width impossible", [*COMPILE, "--set", "insert_quantizers.weight_bits=5.5"], "must be one of"),
    ("--set bad choice", [*COMPILE, "--set", "calibrate.method=best"], "calibrate.method"),
    ("device cuda without one", [*COMPILE, "--device", "cuda"], "no CUDA device"),
    # ---- outputs
    ("out is a device", [*COMPILE, "--out", "/dev/full"], "not a regular file"),
    ("out is a FIFO", [*COMPILE, "--out", "{case}/fifo"], "not a regular file"),
    ("out is a directory", [*COMPILE, "--out", "{case}"], "is a directory"),
    ("out directory missing", [*COMPILE, "--out", "{case}/no/x.vitqc"], "does not exist"),
    ("out not writable", [*COMPILE, "--out", "/proc/self/x.vitqc"], "not writable"),
    ("resume without work dir", [*COMPILE, "--resume", "--out", "{case}/x.vitqc"], "no work directory"),
    ("export out is a device", ["export", "{w}/good.vitqc", "--backend", "packed", "--out", "/dev/full"],
     "not a regular file"),
    ("report out is a file", ["report", "{w}/good.vitqc", "--out", "{w}/bad.toml"], "is not a folder"),
    # ---- artifacts
    ("artifact truncated", ["eval", "{w}/truncated.vitqc", "--data", "{w}/evaldir"], "broken vitqc file"),
    ("artifact without manifest", ["eval", "{w}/nomanifest.vitqc", "--data", "{w}/evaldir"], "lacks manifest.json"),
    ("manifest a list", ["eval", "{w}/listmanifest.vitqc", "--data", "{w}/evaldir"], "not an object"),
    ("manifest lacks a key", ["export", "{w}/nokeys.vitqc", "--backend", "packed", "--out", "{case}/p"],
     "lacks 'preprocess'"),
    ("manifest key of the wrong type", ["eval", "{w}/badtype.vitqc", "--data", "{w}/evaldir"], "is a str, not a list"),
    ("artifact of format 1", ["eval", "{w}/oldformat.vitqc", "--data", "{w}/evaldir"], "recompile it"),
    ("artifact missing", ["eval", "{w}/none.vitqc", "--data", "{w}/evaldir"], "not found"),
    ("export backend unknown", ["export", "{w}/good.vitqc", "--backend", "tflite"], "unknown backend 'tflite'"),
    ("export option of another backend", ["export", "{w}/good.vitqc", "--backend", "packed", "--batch", "4"],
     "--batch does not apply to --backend packed"),
    ("report of a broken artifact", ["report", "{w}/truncated.vitqc", "--out", "{case}/r"], "broken vitqc file"),
    # ---- hostile artifacts: refused, and their code never runs
    ("hostile: node calls os.system (eval)", ["eval", "{w}/hostile_target.vitqc", "--data", "{w}/evaldir"],
     "torch.serialization.os.system"),
    ("hostile: node calls os.system (export)", ["export", "{w}/hostile_target.vitqc", "--backend", "packed",
                                                "--out", "{case}/p"], "torch.serialization.os.system"),
    ("hostile: guard code (eval)", ["eval", "{w}/hostile_guard.vitqc", "--data", "{w}/evaldir"], "guard code"),
    ("hostile: guard code (export)", ["export", "{w}/hostile_guard.vitqc", "--backend", "executorch",
                                      "--out", "{case}/p.pte"], "guard code"),
    ("hostile: code as a symbolic size", ["eval", "{w}/hostile_sympy.vitqc", "--data", "{w}/evaldir"],
     "symbolic size"),
    ("hostile: pickle as weights", ["eval", "{w}/hostile_pickle.vitqc", "--data", "{w}/evaldir"],
     "not a safetensors file"),
    ("hostile: format-1 archive with a pickle", ["eval", "{w}/hostile_pt2.vitqc", "--data", "{w}/evaldir"],
     "recompile it"),
    ("hostile: report", ["report", "{w}/hostile_guard.vitqc", "--out", "{case}/r"], "guard code"),
]


@pytest.mark.parametrize("argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_nonzero_and_leaves_nothing(argv, world, tmp_path, capsys, monkeypatch):
    message = next(c[2] for c in CASES if c[1] is argv)
    case = tmp_path / "case"
    case.mkdir()
    os.mkfifo(case / "fifo")
    monkeypatch.chdir(case)
    monkeypatch.syspath_prepend(str(world))
    before = sorted(p.name for p in world.iterdir()), sorted(p.name for p in case.iterdir())
    code, out, err = run_cli([a.format(w=world, case=case) for a in argv], capsys)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len([l for l in lines if l.startswith("error:")]) == 1, err
    assert lines[-1].startswith("error:") and message in lines[-1], err
    assert (sorted(p.name for p in world.iterdir()), sorted(p.name for p in case.iterdir())) == before
    assert not (world / MARKER).exists()


def test_hostile_artifacts_run_no_code_through_the_library(world):
    import vitqc

    for name in ("hostile_target", "hostile_guard", "hostile_sympy", "hostile_pickle", "hostile_pt2"):
        with pytest.raises(vitqc.VitqcError):
            vitqc.load(world / f"{name}.vitqc")
    assert not (world / MARKER).exists()


def test_ctrl_c_during_a_compile_exits_130_and_writes_nothing(world, tmp_path, capsys, monkeypatch):
    from vitqc.passes.calibrate import Calibrate

    def interrupted(self, gm, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(Calibrate, "call", interrupted)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["compile", f"{world}/models.py:build", "--pipeline", "minmax-w8a8", "--calib",
                              f"images:{world}/calib", "--out", tmp_path / "x.vitqc"], capsys)
    assert code == 130 and "interrupted; nothing was written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_nan_loss_says_no_checkpoint_was_written_when_none_was(world, tmp_path, capsys, monkeypatch):
    from vitqc.passes import joint_optimize as jo

    real = jo.JointOptimize._loss

    def poisoned(self, *args, **kwargs):
        loss, parts = real(self, *args, **kwargs)
        return loss * float("nan"), {k: v * float("nan") for k, v in parts.items()}

    monkeypatch.setattr(jo.JointOptimize, "_loss", poisoned)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["compile", f"{world}/models.py:build", "--pipeline", "joint-w8a8", "--calib",
                            f"images:{world}/calib", "--set", "joint_optimize.iterations=2",
                            "--set", "joint_optimize.batch_size=4", "--out", tmp_path / "x.vitqc"], capsys)
    assert code == 2 and "the loss became nan at step 0; no checkpoint had been written yet" in err
    assert not (tmp_path / "x.vitqc").exists()
