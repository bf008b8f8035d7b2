"""vitqc.artifact: the artifact round trip, its manifest schema, and files recognised by content."""
import json
import zipfile

import pytest
import torch

import vitqc
from tests.conftest import tiny_vit
from vitqc import artifact
from vitqc.artifact import export_program, identify, load_artifact, save_artifact
from vitqc.data import Preprocess

PRE = Preprocess(input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3)


def manifest(**changes):
    base = {"model": {"form": "python"}, "pipeline": {"name": "minmax-w4a8", "passes": []}, "seed": 0,
            "calibration": {}, "preprocess": PRE.to_dict(), "input_shape": [3, 16, 16], "layers": [],
            "summary": {}, "versions": {}}
    base.update(changes)
    return base


@pytest.fixture(scope="module")
def quantized():
    g = torch.Generator().manual_seed(1)
    return vitqc.compile(tiny_vit(), "minmax-w4a8", torch.randn(64, 3, 16, 16, generator=g), quiet=True).quantized


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    example = torch.zeros(1, 3, 16, 16)
    path = tmp_path_factory.mktemp("art") / "m.vitqc"
    return save_artifact(path, export_program(quantized, example), export_program(tiny_vit(), example), manifest())


def test_round_trip_gives_identical_outputs_at_any_batch_size(saved, quantized, calib):
    art = load_artifact(saved)
    assert art.manifest["format"] == artifact.FORMAT and art.manifest["pipeline"]["name"] == "minmax-w4a8"
    assert art.preprocess == PRE
    with torch.no_grad():
        for batch in (calib[0][:1], calib[1][:3], torch.cat(calib)):
            assert torch.equal(art.quantized(batch), quantized(batch))
            assert torch.equal(art.reference(batch), tiny_vit()(batch))


def test_artifact_holds_integer_weights_not_fp_and_no_pickle(saved):
    state = load_artifact(saved).quantized_program.state_dict
    codes = {k: v for k, v in state.items() if k.endswith("weight_codes")}
    assert codes and all(v.dtype == torch.int8 for v in codes.values())
    assert not any(k.endswith("qkv.weight") for k in state)
    with zipfile.ZipFile(saved) as zf:
        names = set(zf.namelist())
        assert names == {"manifest.json", "quantized/program.json", "quantized/weights.safetensors",
                         "reference/program.json", "reference/weights.safetensors"}
        assert not any(b"\x80\x04" in zf.read(n)[:2] or n.endswith((".pt", ".pkl")) for n in names)


def test_files_get_the_users_umask(saved):
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert saved.stat().st_mode & 0o777 == 0o666 & ~mask


def test_failed_write_leaves_nothing(tmp_path, quantized, monkeypatch):
    program = export_program(quantized, torch.zeros(1, 3, 16, 16))

    def full_disk(*args, **kwargs):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", full_disk)
    with pytest.raises(vitqc.VitqcError, match="the disk is full; nothing was written"):
        save_artifact(tmp_path / "m.vitqc", program, None, manifest())
    assert list(tmp_path.iterdir()) == []


def _rewrite(src, dst, **members):
    """Copy the artifact ``src`` to ``dst`` replacing (or with None: dropping) members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name in members:
                continue
            zout.writestr(name, zin.read(name))
        for name, data in members.items():
            if data is not None:
                zout.writestr(name, data)
    return dst


@pytest.mark.parametrize("change, message", [
    ({"manifest.json": b"[1, 2]"}, "manifest is a JSON list, not an object"),
    ({"manifest.json": b"{not json"}, "manifest.json is not JSON"),
    ({"manifest.json": json.dumps({k: v for k, v in manifest(format=artifact.FORMAT).items() if k != "preprocess"})},
     "lacks 'preprocess'"),
    ({"manifest.json": json.dumps(manifest(format=artifact.FORMAT, layers="all"))}, "'layers' is a str, not a list"),
    ({"manifest.json": json.dumps(manifest(format=artifact.FORMAT, input_shape=[3, 16]))}, "input shape"),
    ({"manifest.json": json.dumps(manifest(format="vitqc-artifact/1"))}, "format 'vitqc-artifact/1'.*recompile"),
    ({"manifest.json": json.dumps(manifest(format="something-else"))}, "not a file this vitqc wrote"),
    ({"manifest.json": None}, "lacks manifest.json"),
    ({"quantized/weights.safetensors": None}, "lacks quantized/weights.safetensors"),
    ({"quantized/weights.safetensors": b"\x80\x04\x95 pickled"}, "not a safetensors file"),
])
def test_broken_artifacts_are_one_line(saved, tmp_path, change, message):
    broken = _rewrite(saved, tmp_path / "b.vitqc", **change)
    with pytest.raises(vitqc.VitqcError, match=message):
        load_artifact(broken)


def test_truncated_and_missing_files(saved, tmp_path):
    cut = tmp_path / "cut.vitqc"
    cut.write_bytes(saved.read_bytes()[:5000])
    assert identify(cut) == "vitqc"  # still recognised as a vitqc file by its first member
    with pytest.raises(vitqc.VitqcError, match="broken vitqc file: not a complete zip"):
        load_artifact(cut)
    with pytest.raises(vitqc.VitqcError, match="not found"):
        load_artifact(tmp_path / "nothing.vitqc")


def test_files_are_recognised_by_content(saved, tmp_path):
    plain = tmp_path / "no_extension"
    plain.write_bytes(saved.read_bytes())
    assert identify(plain) == "artifact"
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.randn(1, 2),)), tmp_path / "l.pt2")
    assert identify(tmp_path / "l.pt2") == "pt2"
    (tmp_path / "x.pte").write_bytes(b"\x00\x00\x00\x00ET12" + bytes(16))
    assert identify(tmp_path / "x.pte") == "pte"
    (tmp_path / "t.txt").write_text("hello")
    assert identify(tmp_path / "t.txt") is None
    nameless = _rewrite(saved, tmp_path / "nameless", **{"manifest.json": None})
    assert identify(nameless) == "vitqc"
