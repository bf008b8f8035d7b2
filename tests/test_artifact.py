import json
import zipfile

import pytest
import torch

import vitqc
from tests.conftest import tiny_vit
from vitqc import artifact
from vitqc.artifact import export_program, load_artifact, save_artifact


@pytest.fixture
def quantized(calib):
    return vitqc.compile(tiny_vit(), "minmax-w4a8", calib, quiet=True)


def test_round_trip_gives_identical_outputs_at_any_batch_size(tmp_path, quantized, calib):
    example = calib[0][:1]
    path = save_artifact(tmp_path / "m.vitqc", export_program(quantized, example),
                         export_program(tiny_vit(), example), {"pipeline": {"name": "minmax-w4a8"}})
    art = load_artifact(path)
    assert art.manifest["format"] == artifact.FORMAT and art.manifest["pipeline"]["name"] == "minmax-w4a8"
    with torch.no_grad():
        for batch in (calib[0][:1], calib[1][:3], torch.cat(calib)):
            assert torch.equal(art.quantized(batch), quantized(batch))
            assert torch.equal(art.reference(batch), tiny_vit()(batch))


def test_artifact_holds_integer_weights_not_fp(tmp_path, quantized, calib):
    path = save_artifact(tmp_path / "m.vitqc", export_program(quantized, calib[0][:1]), None, {})
    state = load_artifact(path).quantized_program.state_dict
    codes = {k: v for k, v in state.items() if k.endswith("weight_codes")}
    assert codes and all(v.dtype == torch.int8 for v in codes.values())
    assert not any(k.endswith("qkv.weight") for k in state)


def test_failed_write_leaves_nothing(tmp_path, quantized, calib, monkeypatch):
    program = export_program(quantized, calib[0][:1])

    def broken(_):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "_program_bytes", broken)
    with pytest.raises(OSError):
        save_artifact(tmp_path / "m.vitqc", program, None, {})
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_and_corrupt_files(tmp_path):
    with pytest.raises(vitqc.VitqcError, match="does not exist"):
        artifact.check_writable(tmp_path / "missing" / "m.vitqc")
    with pytest.raises(vitqc.VitqcError, match="is a directory"):
        artifact.check_writable(tmp_path)
    with pytest.raises(vitqc.VitqcError, match="not found"):
        load_artifact(tmp_path / "nothing.vitqc")
    bad = tmp_path / "bad.vitqc"
    bad.write_bytes(b"not a zip")
    with pytest.raises(vitqc.VitqcError, match="not a readable vitqc artifact"):
        load_artifact(bad)
    other = tmp_path / "other.vitqc"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("manifest.json", json.dumps({"format": "something-else"}))
        zf.writestr("quantized.pt2", b"")
    with pytest.raises(vitqc.VitqcError):
        load_artifact(other)
