"""The ImageFolder cache writer: layout, manifest, atomic shards, resumption."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_vit
from vitqc.calib.cache import plan_shards, read_manifest, write_cache
from vitqc.calib.noise import NoiseSource
from vitqc.calib.images import load_images
from vitqc.data import ImageFolderData, Preprocess
from vitqc.errors import VitqcError

PRE = Preprocess(input_size=(3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
NAMES = ["cat", "dog", "great white shark, white shark", "egg", "ship"]


class Crashing(NoiseSource):
    """Noise that dies (like a killed process) on its ``crash_at``-th batch."""

    def __init__(self, *args, crash_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.crash_at, self.calls = crash_at, 0

    def generate_batch(self, labels, indices):
        self.calls += 1
        if self.calls == self.crash_at:
            raise KeyboardInterrupt
        return super().generate_batch(labels, indices)


def noise(seed=0, **kwargs):
    return Crashing(tiny_vit(), PRE, NAMES, seed=seed, device="cpu", quiet=True, batch_size=2, **kwargs)


def pngs(root):
    return sorted(p.relative_to(root).as_posix() for p in root.glob("*/*.png"))


def test_plan():
    plan = plan_shards([0, 3], per_class=5, shard_size=2)
    assert [(s.label, s.start, s.stop) for s in plan] == [(0, 0, 2), (0, 2, 4), (0, 4, 5), (3, 0, 2), (3, 2, 4), (3, 4, 5)]
    with pytest.raises(VitqcError, match="--per-class 0"):
        plan_shards([0], 0, 2)


def test_layout_manifest_and_pixels(tmp_path):
    src = noise(seed=3)
    stats = write_cache(src, tmp_path / "c", per_class=4, shard_size=2)
    root = tmp_path / "c"
    assert stats["generated"] == 20 and stats["shards_written"] == 10 and stats["images_per_second"] > 0
    m = read_manifest(root)
    assert m["status"] == "complete" and m["progress"] == {"shards": 10, "done": 10}
    assert m["source"] == "noise" and m["seed"] == 3 and m["per_class"] == 4 and m["class_names"] == NAMES
    assert m["folders"] == ["000_cat", "001_dog", "002_great_white_shark", "003_egg", "004_ship"]
    assert len(pngs(root)) == 20 and (root / "002_great_white_shark" / "000003.png").exists()
    # the PNG is the source's image, quantized to 8 bits
    png = np.asarray(Image.open(root / "003_egg" / "000002.png"), dtype=np.float32) / 255
    ref = src.generate_batch(torch.tensor([3]), torch.tensor([2]))[0].permute(1, 2, 0).numpy()
    assert np.abs(png - ref).max() <= 0.5 / 255 + 1e-6
    # an ordinary ImageFolder for calibration: classes in index order, manifest and markers ignored
    data = ImageFolderData(root, require_classes=False)
    assert data.classes == m["folders"] and len(data) == 20
    assert len(load_images(root, PRE, size=None, seed=0, quiet=True)[0]) == 20


def test_killed_run_resumes_with_only_the_missing_shards(tmp_path):
    root = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        write_cache(noise(crash_at=2), root, per_class=4, shard_size=2)  # dies after one shard
    m = read_manifest(root)
    assert m["status"] == "running" and m["progress"]["done"] == 1
    first = pngs(root)
    assert first == ["000_cat/000000.png", "000_cat/000001.png"]
    stamp = (root / first[0]).stat().st_mtime_ns
    again = noise()
    stats = write_cache(again, root, per_class=4, shard_size=2)
    assert stats["shards_skipped"] == 1 and stats["shards_written"] == 9 and stats["generated"] == 18
    assert again.calls == 9  # one 2-image batch per missing shard, nothing regenerated
    assert (root / first[0]).stat().st_mtime_ns == stamp
    assert len(pngs(root)) == 20 and read_manifest(root)["status"] == "complete"
    # a shard whose marker is missing (killed between moving files and writing it) is made again
    (root / ".shards" / "00004-0001.json").unlink()
    last = noise()
    assert write_cache(last, root, per_class=4, shard_size=2)["shards_written"] == 1 and last.calls == 1
    # nothing left: a third run only checks
    assert write_cache(noise(), root, per_class=4, shard_size=2)["generated"] == 0


def test_resume_refuses_other_settings_and_foreign_folders(tmp_path):
    root = tmp_path / "c"
    write_cache(noise(), root, per_class=2, shard_size=2)
    with pytest.raises(VitqcError, match=r"other settings \(seed differ\)"):
        write_cache(noise(seed=1), root, per_class=2, shard_size=2)
    with pytest.raises(VitqcError, match="per_class"):
        write_cache(noise(), root, per_class=3, shard_size=2)
    # batch size is a runtime option: it may change between runs
    write_cache(Crashing(tiny_vit(), PRE, NAMES, seed=0, quiet=True, batch_size=8), root, per_class=2, shard_size=2)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.txt").write_text("x")
    with pytest.raises(VitqcError, match="not a vitqc calibration cache"):
        write_cache(noise(), foreign, per_class=2)
    assert json.loads((root / "manifest.json").read_text())["options"]["batch_size"] == 8
