"""vitqc.data.images: ImageFolder scanning, decoding and labelled evaluation batches."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

from tests.image_trees import IDENTITY4, LEVEL_TO_CLASS, level_of, make_tree, solid
from vitqc.calib.images import load_images
from vitqc.data import ImageFolderData, iterate_labeled, spread_indices
from vitqc.errors import VitqcError


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
    images, _ = load_images(root, IDENTITY4, size=3, seed=0, quiet=True)
    assert len(images) == 3
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
        load_images(root, IDENTITY4, size=None, seed=0, quiet=True)
    assert "skipped 3 unreadable images" in capsys.readouterr().err



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


def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path):
    """16-bit PNGs and float TIFFs used to become all-white / all-black: they are scaled by their range."""
    import numpy as np

    from vitqc.data import decode

    ramp16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    Image.fromarray(ramp16).save(tmp_path / "g16.png")
    decoded = np.asarray(decode(tmp_path / "g16.png"))
    assert decoded.min() == 0 and decoded.max() == 255 and len(set(decoded.flatten().tolist())) == 16
    ramp = (np.arange(16, dtype=np.float32).reshape(4, 4) / 15)
    Image.fromarray(ramp).save(tmp_path / "f.tif")
    assert np.array_equal(np.asarray(decode(tmp_path / "f.tif")), np.round(ramp * 255).astype(np.uint8))
    Image.fromarray(ramp * 300).save(tmp_path / "big.tif")
    with pytest.raises(ValueError, match="float images as \\[0, 1\\]"):
        decode(tmp_path / "big.tif")
