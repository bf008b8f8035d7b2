"""vitqc.compile as a library call: the CompileResult, its measurements on held-out images, and its save()
writing what the command line writes."""
import zipfile

import pytest
import torch

import vitqc
from tests.conftest import TINY_PREPROCESS, run_cli, tiny_vit
from tests.image_trees import random_image_folder
from vitqc.data import Preprocess

FACTORY = '''
from tests.conftest import tiny_vit

def build():
    model = tiny_vit()
    model.pretrained_cfg = dict(input_size=(3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bicubic",
                                crop_pct=1.0)
    return model
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    random_image_folder(root / "images", classes=3, per_class=10)
    (root / "models.py").write_text(FACTORY)
    return root


def test_compile_a_spec_measures_on_held_out_images_and_saves_what_the_cli_writes(folder, tmp_path, capsys,
                                                                                  monkeypatch):
    monkeypatch.syspath_prepend(str(folder))
    spec, calib = f"{folder}/models.py:build", f"images:{folder}/images"
    result = vitqc.compile(spec, "minmax-w8a8", calib, quiet=True)
    assert isinstance(result, vitqc.CompileResult)
    assert result.calibration["images"] == 22 and result.calibration["held_out"] == 8  # 30 images: 8 held out
    m = result.measurement
    assert m["on"] == "held-out" and m["images"] == 8 and set(m["sqnr_db"]) == {l.path for l in result.layers.weight_layers}
    assert [l.path for l in result.layers.weight_layers][:2] == ["patch_embed.proj", "blocks.0.attn.qkv"]
    library = result.save(tmp_path / "lib.vitqc")
    code, _, err = run_cli(["compile", spec, "--pipeline", "minmax-w8a8", "--calib", calib, "--out",
                            tmp_path / "cli.vitqc"], capsys)
    assert code == 0, err
    a, b = vitqc.load(library), vitqc.load(tmp_path / "cli.vitqc")
    skip = {"created", "compile_seconds", "record", "passes"}
    assert {k: v for k, v in a.manifest.items() if k not in skip} == {k: v for k, v in b.manifest.items() if k not in skip}
    x = torch.randn(5, 3, 16, 16)
    assert torch.equal(a.quantized(x), b.quantized(x)) and torch.equal(a.reference(x), b.reference(x))
    names = set(zipfile.ZipFile(library).namelist())
    assert "calibration/preview.png" in names and a.manifest["calibration"]["preview_images"] == 16


def test_holding_images_out_leaves_the_calibration_draw_as_it_was(folder, monkeypatch):
    monkeypatch.syspath_prepend(str(folder))
    spec, calib = f"{folder}/models.py:build", f"images:{folder}/images"
    without = vitqc.compile(spec, "minmax-w8a8", calib, calib_size=12, holdout=0, quiet=True)
    held = vitqc.compile(spec, "minmax-w8a8", calib, calib_size=12, holdout=6, quiet=True)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(without.quantized(x), held.quantized(x))  # same 12 images set the ranges
    assert without.measurement is None and held.measurement["images"] == 6


def test_tensor_calibration_measures_only_when_asked(capsys):
    images = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pre = Preprocess(**TINY_PREPROCESS)
    plain = vitqc.compile(tiny_vit(), "minmax-w8a8", images, preprocess=pre, quiet=True)
    assert plain.measurement is None and plain.calibration == {"source": "tensor", "images": 40, "held_out": 0}
    forced = vitqc.compile(tiny_vit(), "minmax-w8a8", images, preprocess=pre, measure=True, quiet=True)
    assert forced.measurement["on"] == "calibration"
    assert "measuring on the calibration images themselves" in capsys.readouterr().err
    split = vitqc.compile(tiny_vit(), "minmax-w8a8", images, preprocess=pre, holdout=10, quiet=True)
    assert split.calibration["images"] == 30 and split.measurement["on"] == "held-out"
    with pytest.raises(vitqc.VitqcError, match="records how images become inputs"):
        vitqc.compile(tiny_vit(), "minmax-w8a8", images, quiet=True).save("never.vitqc")


def test_early_refusals_come_before_any_work(tmp_path):
    with pytest.raises(vitqc.VitqcError, match="no work directory"):
        vitqc.compile("timm:does_not_matter", "minmax-w8a8", "images:.", resume=True, work_dir=tmp_path / "none")
    with pytest.raises(vitqc.VitqcError, match="calibration images are required"):
        vitqc.compile("timm:does_not_matter", "minmax-w8a8")
    model = tiny_vit()
    with torch.no_grad():
        model.head.bias[0] = float("inf")
    with pytest.raises(vitqc.VitqcError, match="parameter 'head.bias' holds 1 non-finite"):
        vitqc.compile(model, "minmax-w8a8", torch.randn(4, 3, 16, 16))


def test_run_pipeline_is_the_compiler_proper(calib):
    from vitqc.capture import capture

    x = torch.cat(calib)
    gm, ctx, stats = vitqc.run_pipeline(capture(tiny_vit(), x[:1]), "minmax-w8a8", x, quiet=True)
    assert [s["name"] for s in stats] == ["canonicalize", "insert_quantizers", "calibrate", "materialize"]
    assert gm.meta["vitqc"]["pipeline"]["name"] == "minmax-w8a8" and "calibrate" in ctx.record
    assert ctx.calib_batches(16)[0].data_ptr() == x.data_ptr()  # batches are views of one tensor
