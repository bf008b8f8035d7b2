"""vitqc.data: ImageFolder scanning, calibration/eval loading, preprocessing, --calib parsing."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitqc.data import (
    ImageFolderData,
    Preprocess,
    _timm_transform,
    _torchvision_transform,
    balanced_order,
    iterate_labeled,
    load_calibration,
    parse_calib_spec,
    spread_indices,
)
from vitqc.errors import VitqcError

SHARED = Path(os.environ.get("VITQC_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CIFAR_CALIB = SHARED / "assets" / "data" / "cifar10" / "calib"

# Identity preprocessing for 4x4 RGB images: pixel / 255.
IDENTITY4 = Preprocess(input_size=(3, 4, 4), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def solid(path: Path, colour, size=(4, 4), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def grey_level(cls: int, i: int) -> int:
    """A distinct grey level per (class, image) so a decoded tensor tells which file it came from."""
    return 10 + 40 * cls + 3 * i


def make_tree(root: Path, counts: dict[str, int], corrupt_in: str | None = None) -> Path:
    """root/<class>/<i>.png|jpg solid grey images (PNG for exact values), optional corrupt file."""
    for cls, (name, n) in enumerate(sorted(counts.items())):
        for i in range(n):
            g = grey_level(cls, i)
            solid(root / name / f"{i:02d}.png", (g, g, g))
    if corrupt_in:
        (root / corrupt_in / "zz_broken.png").write_bytes(b"this is not a png")
    return root


def level_of(x: torch.Tensor) -> int:
    return round(float(x[0, 0, 0]) * 255)


LEVEL_TO_CLASS = {grey_level(c, i): c for c in range(3) for i in range(12)}


# --------------------------------------------------------------------------------------------------
# ImageFolderData
# --------------------------------------------------------------------------------------------------


def test_class_indices_and_samples(tmp_path):
    root = make_tree(tmp_path / "d", {"dog": 2, "cat": 3, "bird": 1})
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".hidden.png").write_bytes(b"")
    solid(root / "dog" / "nested" / "x.JPEG", (1, 2, 3))  # recursive, case-insensitive extension
    data = ImageFolderData(root)
    assert data.classes == ["bird", "cat", "dog"]
    assert Counter(label for _, label in data.samples) == {0: 1, 1: 3, 2: 3}
    assert all(path.parent.name in ("bird", "cat", "dog", "nested") for path, _ in data.samples)
    assert data.skipped == 0 and len(data) == 7 and not data.flat


def test_extensions(tmp_path):
    root = tmp_path / "d"
    for ext in ("jpg", "JPEG", "png", "bmp", "webp", "gif", "TIF", "tiff"):
        solid(root / "a" / f"img.{ext}", (5, 5, 5))
    (root / "a" / "img.svg").write_text("<svg/>")
    assert len(ImageFolderData(root)) == 8


def test_error_missing(tmp_path):
    with pytest.raises(VitqcError, match=r"does not exist: pass an existing folder"):
        ImageFolderData(tmp_path / "nope")


def test_error_not_a_dir(tmp_path):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(VitqcError, match=r"is a file, not a directory"):
        ImageFolderData(f)


def test_error_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitqcError, match=r"is empty: put images in .*/<class>/<image>"):
        ImageFolderData(tmp_path / "empty")


def test_error_flat_for_eval(tmp_path):
    root = tmp_path / "flat"
    solid(root / "a.png", (1, 1, 1))
    with pytest.raises(VitqcError) as info:
        ImageFolderData(root)
    msg = str(info.value)
    assert msg == f"{root} has no class subfolders: eval needs {root}/<class>/<image> (ImageFolder layout)"
    assert "\n" not in msg


def test_flat_ok_for_calibration(tmp_path):
    root = tmp_path / "flat"
    for i in range(5):
        solid(root / f"{i}.png", (i, i, i))
    data = ImageFolderData(root, require_classes=False)
    assert data.flat and data.classes == [] and {label for _, label in data.samples} == {-1}
    batches = load_calibration(root, IDENTITY4, size=3, seed=0, batch_size=2, progress=False)
    assert [b.shape[0] for b in batches] == [2, 1]
    with pytest.raises(VitqcError, match="no class subfolders"):
        next(iterate_labeled(data, IDENTITY4, progress=False))


def test_error_no_images(tmp_path):
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    (root / "a" / "readme.txt").write_text("hi")
    with pytest.raises(VitqcError, match=r"has no images \(jpg, jpeg, png"):
        ImageFolderData(root)


def test_error_all_unreadable(tmp_path, capsys):
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        (root / "a" / f"{i}.jpg").write_bytes(b"garbage")
    data = ImageFolderData(root)
    with pytest.raises(VitqcError, match=r"none of the 3 images in .* could be read"):
        list(iterate_labeled(data, IDENTITY4, progress=False))
    assert data.skipped == 3
    with pytest.raises(VitqcError, match=r"none of the 3 images"):
        load_calibration(root, IDENTITY4, size=None, seed=0, progress=False)
    assert "skipped 3 unreadable images" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def test_iterate_labeled_skips_corrupt(tmp_path, capsys):
    root = make_tree(tmp_path / "d", {"a": 3, "b": 2}, corrupt_in="a")
    data = ImageFolderData(root)
    assert len(data) == 6
    batches = list(iterate_labeled(data, IDENTITY4, batch_size=4, progress=False))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert xs.shape == (5, 3, 4, 4) and xs.dtype == torch.float32
    assert ys.tolist() == [0, 0, 0, 1, 1]
    assert [LEVEL_TO_CLASS[level_of(x)] for x in xs] == ys.tolist()
    assert data.skipped == 1
    err = capsys.readouterr().err
    assert err.count("skipped 1 unreadable image") == 1 and "zz_broken.png" in err


def test_iterate_labeled_progress_goes_to_stderr(tmp_path, capsys):
    root = make_tree(tmp_path / "d", {"a": 2, "b": 2})
    list(iterate_labeled(ImageFolderData(root), IDENTITY4, batch_size=3, progress=True, description="val"))
    out = capsys.readouterr()
    assert out.out == "" and "val" in out.err


def test_limit_spreads_over_classes(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 10, "b": 10, "c": 10})
    data = ImageFolderData(root)
    ys = torch.cat([y for _, y in iterate_labeled(data, IDENTITY4, batch_size=4, limit=6, progress=False)])
    assert len(ys) == 6 and Counter(ys.tolist()) == {0: 2, 1: 2, 2: 2}
    assert spread_indices(30, 3) == [0, 10, 20]
    assert spread_indices(5, None) == spread_indices(5, 9) == [0, 1, 2, 3, 4]


def test_calibration_balanced_and_seeded(tmp_path, capsys):
    root = make_tree(tmp_path / "d", {"a": 12, "b": 4, "c": 2})
    batches = load_calibration(root, IDENTITY4, size=6, seed=3, batch_size=4, progress=False)
    assert [b.shape for b in batches] == [(4, 3, 4, 4), (2, 3, 4, 4)]
    levels = [level_of(x) for b in batches for x in b]
    assert Counter(LEVEL_TO_CLASS[v] for v in levels) == {0: 2, 1: 2, 2: 2}
    assert len(set(levels)) == 6

    again = load_calibration(root, IDENTITY4, size=6, seed=3, batch_size=4, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(batches, again))
    other = load_calibration(root, IDENTITY4, size=6, seed=4, batch_size=4, progress=False)
    assert [level_of(x) for b in other for x in b] != levels

    # More than available (or None) -> everything; a small class runs out, the others fill in.
    everything = load_calibration(root, IDENTITY4, size=100, seed=0, batch_size=64, progress=True)
    assert sum(len(b) for b in everything) == 18
    assert capsys.readouterr().out == ""
    ten = [level_of(x) for b in load_calibration(root, IDENTITY4, size=10, seed=0, progress=False) for x in b]
    assert Counter(LEVEL_TO_CLASS[v] for v in ten) == {0: 4, 1: 4, 2: 2}


def test_calibration_replaces_unreadable(tmp_path, capsys):
    root = make_tree(tmp_path / "d", {"a": 3, "b": 3}, corrupt_in="a")
    data = ImageFolderData(root, require_classes=False)
    batches = load_calibration(data, IDENTITY4, size=None, seed=0, progress=False)
    assert sum(len(b) for b in batches) == 6 and data.skipped == 1
    assert "skipped 1 unreadable image" in capsys.readouterr().err


def test_calibration_bad_size(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 2})
    with pytest.raises(VitqcError, match="not positive"):
        load_calibration(root, IDENTITY4, size=0, seed=0, progress=False)


def test_balanced_order():
    labels = [0] * 5 + [1] * 2 + [2] * 1
    order = balanced_order(labels, seed=1)
    assert sorted(order) == list(range(8))
    assert sorted(labels[i] for i in order[:3]) == [0, 1, 2]
    assert sorted(labels[i] for i in order[3:5]) == [0, 1]
    assert order == balanced_order(labels, seed=1)


# --------------------------------------------------------------------------------------------------
# Preprocess
# --------------------------------------------------------------------------------------------------


def test_preprocess_solid_colour_exact():
    pre = Preprocess(input_size=(3, 4, 4), mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    img = Image.new("RGB", (4, 4), (255, 0, 128))
    x = pre.transform()(img)
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    expected = torch.tensor([(1.0 - 0.5) / 0.5, (0.0 - 0.25) / 0.25, (128 / 255) / 2.0])
    assert torch.allclose(x, expected[:, None, None].expand(3, 4, 4), atol=1e-6)


def test_preprocess_resize_and_center_crop():
    # 6 wide x 4 high: shorter side is already 4, so only the center crop acts: columns 1..4 stay.
    img = Image.new("RGB", (6, 4), (0, 0, 0))
    for col, value in enumerate([10, 20, 30, 40, 50, 60]):
        for row in range(4):
            img.putpixel((col, row), (value, value, value))
    x = IDENTITY4.transform()(img)
    assert torch.allclose(x[0, 0] * 255, torch.tensor([20.0, 30.0, 40.0, 50.0]), atol=1e-4)
    # A uniform 16x16 image resized (antialiased bicubic) to 4x4 stays uniform.
    x = IDENTITY4.transform()(Image.new("RGB", (16, 16), (200, 100, 50)))
    assert torch.allclose(x, torch.tensor([200, 100, 50])[:, None, None] / 255.0 * torch.ones(3, 4, 4), atol=1e-6)


def test_preprocess_crop_pct():
    # crop_pct 0.5: resize the shorter side to 8, then keep the central 4x4 (the inner square).
    img = Image.new("L", (8, 8), 0)
    for r in range(2, 6):
        for c in range(2, 6):
            img.putpixel((c, r), 255)
    pre = Preprocess(input_size=(1, 4, 4), mean=(0.0,), std=(1.0,), crop_pct=0.5, interpolation="nearest")
    assert torch.equal(pre.transform()(img), torch.ones(1, 4, 4))


def test_preprocess_grayscale():
    pre = Preprocess(input_size=(1, 4, 4), mean=(0.5,), std=(0.5,))
    x = pre.transform()(Image.new("RGB", (4, 4), (100, 150, 200)))
    # PIL's ITU-R 601-2 luma: 100*.299 + 150*.587 + 200*.114 = 140.75 -> 141
    assert x.shape == (1, 4, 4)
    assert torch.allclose(x, torch.full((1, 4, 4), (141 / 255 - 0.5) / 0.5), atol=1e-6)
    # ... and a grey image fed to an RGB model is replicated over the channels
    x = IDENTITY4.transform()(Image.new("L", (4, 4), 51))
    assert x.shape == (3, 4, 4) and torch.allclose(x, torch.full((3, 4, 4), 0.2), atol=1e-6)


def test_transform_is_timm_eval_transform():
    pre = Preprocess(input_size=(3, 224, 224), mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1), crop_pct=0.875)
    text = repr(pre.transform())
    assert "ConvertMode('RGB')" in text and "Resize(size=256" in text and "bicubic" in text
    assert "CenterCrop(size=(224, 224))" in text


def test_torchvision_fallback_matches_timm():
    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(30, 45, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(arr, "RGB")
    for crop_pct, mode in ((1.0, "center"), (0.875, "center"), (0.9, "squash")):
        pre = Preprocess(input_size=(3, 16, 16), mean=(0.4,) * 3, std=(0.2,) * 3, crop_pct=crop_pct, crop_mode=mode)
        assert torch.allclose(_timm_transform(pre)(img), _torchvision_transform(pre)(img), atol=1e-6)


def test_preprocess_dict_round_trip():
    pre = Preprocess(input_size=(1, 8, 8), mean=(0.3,), std=(0.4,), interpolation="bilinear", crop_pct=0.9)
    d = json.loads(json.dumps(pre.to_dict()))
    assert Preprocess.from_dict(d) == pre
    with pytest.raises(VitqcError, match="lacks mean"):
        Preprocess.from_dict({"input_size": [3, 4, 4], "std": [1, 1, 1]})


def test_from_timm():
    import timm.data

    cfg = timm.data.resolve_data_config(
        pretrained_cfg={"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25,) * 3,
                        "crop_pct": 0.9, "interpolation": "bilinear"}
    )
    pre = Preprocess.from_timm(cfg)
    assert pre == Preprocess((3, 32, 32), (0.5,) * 3, (0.25,) * 3, "bilinear", 0.9, "center")
    assert Preprocess.from_timm({"input_size": (1, 8, 8), "mean": (0.2,), "std": (0.3,)}).crop_pct == 0.875
    with pytest.raises(VitqcError, match="3 values but the input has 1 channel"):
        Preprocess.from_timm({"input_size": (1, 8, 8), "mean": (0.2, 0.2, 0.2), "std": (0.3,)})


def test_from_flags():
    pre = Preprocess.from_flags(32, 0, 1, "bicubic", 1.0)
    assert pre == Preprocess((3, 32, 32), (0.0,) * 3, (1.0,) * 3)
    pre = Preprocess.from_flags((24, 16), "0.1,0.2,0.3", [0.5, 0.5, 0.5], None, None)
    assert pre.input_size == (3, 24, 16) and pre.mean == (0.1, 0.2, 0.3) and pre.crop_pct == 1.0
    assert Preprocess.from_flags(224, "imagenet", "imagenet", None, 0.875).std == (0.229, 0.224, 0.225)
    assert Preprocess.from_flags(8, 0.3, 0.4, "bilinear", None, channels=1).input_size == (1, 8, 8)
    with pytest.raises(VitqcError, match="--mean is required for 1-channel"):
        Preprocess.from_flags(8, None, None, None, None, channels=1)
    with pytest.raises(VitqcError, match="not a list of numbers"):
        Preprocess.from_flags(8, "a,b", 1, None, None)
    with pytest.raises(VitqcError, match="2 values but the input has 3"):
        Preprocess.from_flags(8, (0.1, 0.2), 1, None, None)
    with pytest.raises(VitqcError, match="interpolation 'cubic' is unknown"):
        Preprocess.from_flags(8, 0, 1, "cubic", None)
    with pytest.raises(VitqcError, match="crop_pct"):
        Preprocess.from_flags(8, 0, 1, None, 1.5)
    with pytest.raises(VitqcError, match="every std must be positive"):
        Preprocess.from_flags(8, 0, 0, None, None)


# --------------------------------------------------------------------------------------------------
# --calib
# --------------------------------------------------------------------------------------------------


def test_parse_calib_spec(tmp_path, monkeypatch):
    d = tmp_path / "imgs"
    d.mkdir()
    assert parse_calib_spec(f"images:{d}") == ("images", str(d))
    assert parse_calib_spec("images:/does/not/matter") == ("images", "/does/not/matter")
    assert parse_calib_spec(str(d)) == ("images", str(d))
    assert parse_calib_spec("demo") == ("demo", None)
    for kind in ("prompts", "learned-prompts", "inversion", "noise"):
        assert parse_calib_spec(kind) == (kind, None)
    assert parse_calib_spec("prompts:cats.txt") == ("prompts", "cats.txt")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert parse_calib_spec("demo") == ("demo", None)  # the keyword wins
    assert parse_calib_spec("./demo") == ("images", "./demo")
    for bad, pattern in (
        ("bogus", r"'bogus' is not understood: use images:DIR, an existing directory, demo, prompts"),
        ("./missing/dir", "does not exist"),
        ("images:", "needs a directory"),
        ("", "empty"),
    ):
        with pytest.raises(VitqcError, match=pattern):
            parse_calib_spec(bad)
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(VitqcError, match="is a file, not a directory"):
        parse_calib_spec("f.png")


# --------------------------------------------------------------------------------------------------
# Real images (only where ../shared exists)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cifar10_calibration_images():
    if not CIFAR_CALIB.is_dir():
        pytest.skip(f"{CIFAR_CALIB} is absent")
    pre = Preprocess.from_flags(32, 0.0, 1.0, "bicubic", 1.0)
    batches = load_calibration(CIFAR_CALIB, pre, size=20, seed=0, batch_size=8, progress=False)
    assert [b.shape for b in batches] == [(8, 3, 32, 32), (8, 3, 32, 32), (4, 3, 32, 32)]
    x = torch.cat(batches)
    assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.std()) > 0.05  # real pictures, not blank
    data = ImageFolderData(CIFAR_CALIB)
    assert len(data.classes) == 10 and data.classes[0] == "airplane"
