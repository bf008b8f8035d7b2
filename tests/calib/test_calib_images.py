"""vitqc.calib.images: the seeded, class-balanced draw of real calibration images (and its held-out share)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests.conftest import SHARED
from tests.image_trees import IDENTITY4, LEVEL_TO_CLASS, level_of, make_tree
from vitqc.calib.images import load_images
from vitqc.data import ImageFolderData, Preprocess
from vitqc.errors import VitqcError

CIFAR_CALIB = SHARED / "assets" / "data" / "cifar10" / "calib"


def test_calibration_balanced_and_seeded(tmp_path, capsys):
    root = make_tree(tmp_path / "d", {"a": 12, "b": 4, "c": 2})
    images, held = load_images(root, IDENTITY4, size=6, seed=3, quiet=True)
    assert images.shape == (6, 3, 4, 4) and held is None
    levels = [level_of(x) for x in images]
    assert Counter(LEVEL_TO_CLASS[v] for v in levels) == {0: 2, 1: 2, 2: 2}
    assert len(set(levels)) == 6

    again, _ = load_images(root, IDENTITY4, size=6, seed=3, quiet=True)
    assert torch.equal(images, again)
    other, _ = load_images(root, IDENTITY4, size=6, seed=4, quiet=True)
    assert [level_of(x) for x in other] != levels

    # More than available (or None) -> everything; a small class runs out, the others fill in.
    everything, _ = load_images(root, IDENTITY4, size=100, seed=0)
    assert len(everything) == 18
    assert capsys.readouterr().out == ""
    ten = [level_of(x) for x in load_images(root, IDENTITY4, size=10, seed=0, quiet=True)[0]]
    assert Counter(LEVEL_TO_CLASS[v] for v in ten) == {0: 4, 1: 4, 2: 2}


def test_held_out_images_come_after_the_calibration_ones_and_never_overlap(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 12, "b": 4, "c": 2})
    plain, _ = load_images(root, IDENTITY4, size=6, seed=3, quiet=True)
    images, held = load_images(root, IDENTITY4, size=6, seed=3, holdout=4, quiet=True)
    assert torch.equal(images, plain)  # holding images out does not change the calibration draw
    assert held.shape == (4, 3, 4, 4)
    assert not {level_of(x) for x in held} & {level_of(x) for x in images}
    # size None: everything but the held-out images; the held-out share shrinks first when the folder runs out
    rest, held = load_images(root, IDENTITY4, size=None, seed=3, holdout=5, quiet=True)
    assert len(rest) == 13 and len(held) == 5
    most, held = load_images(root, IDENTITY4, size=16, seed=3, holdout=5, quiet=True)
    assert len(most) == 16 and len(held) == 2


def test_calibration_replaces_unreadable(tmp_path, capsys):
    root = make_tree(tmp_path / "d", {"a": 3, "b": 3}, corrupt_in="a")
    data = ImageFolderData(root, require_classes=False)
    images, _ = load_images(data, IDENTITY4, size=None, seed=0, quiet=True)
    assert len(images) == 6 and data.skipped == 1
    assert "skipped 1 unreadable image" in capsys.readouterr().err


def test_calibration_bad_size(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 2})
    with pytest.raises(VitqcError, match="not positive"):
        load_images(root, IDENTITY4, size=0, seed=0, quiet=True)
    with pytest.raises(VitqcError, match="negative"):
        load_images(root, IDENTITY4, size=1, seed=0, holdout=-1, quiet=True)


@pytest.mark.slow
def test_cifar10_calibration_images():
    if not CIFAR_CALIB.is_dir():
        pytest.skip(f"{CIFAR_CALIB} is absent")
    pre = Preprocess.from_flags(32, 0.0, 1.0, "bicubic", 1.0)
    x, _ = load_images(CIFAR_CALIB, pre, size=20, seed=0, quiet=True)
    assert x.shape == (20, 3, 32, 32)
    assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.std()) > 0.05  # real pictures, not blank
    data = ImageFolderData(CIFAR_CALIB)
    assert len(data.classes) == 10 and data.classes[0] == "airplane"
