"""Folders of small solid-colour test images whose decoded values say which file they came from."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from vitqc.data import Preprocess

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


def random_image_folder(root: Path, classes: int = 2, per_class: int = 12, size: int = 16) -> Path:
    """root/c<k>/<i>.png: seeded random RGB images, ``per_class`` in each of ``classes`` class folders."""
    import numpy as np

    g = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(g.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root
