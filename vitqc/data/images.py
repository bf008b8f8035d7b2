"""Folders of image files: ImageFolder-style scanning, decoding (8-bit, 16-bit and float images), and labelled
evaluation batches."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitqc.console import progress_bar, warn
from vitqc.data.preprocess import Preprocess
from vitqc.data.sampling import spread_indices
from vitqc.errors import VitqcError

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderData", "decode", "iterate_labeled", "LabeledImages", "collate_skipping",
           "warn_skipped"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_under(directory: Path) -> list[Path]:
    """Image files under ``directory``, recursively (following links, as torchvision's ImageFolder does),
    skipping hidden files and folders; sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / name for name in filenames if _is_image(Path(name)))
    return sorted(found)


class ImageFolderData:
    """An ImageFolder-style directory: ``DIR/<class>/<image>``; sorted class names give the indices.

    With ``require_classes=False`` (calibration) a flat ``DIR/<image>`` folder is accepted too; its
    samples get class index -1 and ``classes`` is empty. Images are found recursively inside each
    class folder. Files are not decoded here: unreadable ones are skipped (and counted in
    ``skipped``) when they are loaded.
    """

    def __init__(self, directory: str | Path, require_classes: bool = True, purpose: str | None = None):
        self.root = Path(directory).expanduser()
        self.require_classes = require_classes
        purpose = purpose or ("eval" if require_classes else "calibration")
        root = self.root
        if not root.exists():
            raise VitqcError(f"{root} does not exist: pass an existing folder of images for {purpose}")
        if not root.is_dir():
            raise VitqcError(f"{root} is a file, not a directory: pass the folder that holds the images")
        entries = [e for e in root.iterdir() if not e.name.startswith(".")]
        if not entries:
            raise VitqcError(f"{root} is empty: put images in {root}/<class>/<image> (ImageFolder layout)")
        class_dirs = sorted((e for e in entries if e.is_dir()), key=lambda e: e.name)
        per_class = [_images_under(d) for d in class_dirs]
        loose = sorted(e for e in entries if e.is_file() and _is_image(e))

        self.skipped = 0
        if any(per_class):
            self.classes: list[str] = [d.name for d in class_dirs]
            self.samples: list[tuple[Path, int]] = [
                (path, index) for index, paths in enumerate(per_class) for path in paths
            ]
            self.flat = False
        elif loose:
            if require_classes:
                raise VitqcError(
                    f"{root} has no class subfolders: {purpose} needs {root}/<class>/<image> (ImageFolder layout)"
                )
            self.classes = []
            self.samples = [(path, -1) for path in loose]
            self.flat = True
        else:
            raise VitqcError(
                f"{root} has no images ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}): "
                f"put images in {root}/<class>/<image> (ImageFolder layout)"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        layout = "flat" if self.flat else f"{len(self.classes)} classes"
        return f"ImageFolderData({str(self.root)!r}, {len(self.samples)} images, {layout})"


def decode(path: str | Path) -> Image.Image:
    """Open and fully decode an image file (raises on unreadable/corrupt files). High-bit-depth images are
    scaled to 8 bits by their range, not clipped: 16-bit integers by 65535, float images read as [0, 1]
    (values outside it are refused, since their scale is unknown)."""
    with Image.open(path) as image:
        image.load()
        image = image.copy()
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0 or high > 65535:
            raise ValueError(f"{image.mode} image with values {low:g}..{high:g} is not 16-bit: convert it to 8 or 16 bits")
        return Image.fromarray(np.round(values / 65535 * 255).astype(np.uint8), mode="L")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(values).all() and low >= 0 and high <= 1):
            raise ValueError(f"float image with values {low:g}..{high:g}: vitqc reads float images as [0, 1]; "
                             f"rescale it or save it as 8-bit")
        return Image.fromarray(np.round(values * 255).astype(np.uint8), mode="L")
    return image


class LabeledImages(torch.utils.data.Dataset):
    """(path, label) samples -> (tensor, label) or (None, label, error) when the file is unreadable."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable[[Image.Image], torch.Tensor]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = decode(path)
        except Exception as exc:  # noqa: BLE001
            return None, label, f"{Path(path).name}: {exc}"
        return self.transform(image), label, None


def collate_skipping(items):
    """Collate (tensor|None, label, error) items -> (x|None, y|None, n_skipped, first_error)."""
    good = [(x, y) for x, y, _ in items if x is not None]
    errors = [e for x, _, e in items if x is None]
    if not good:
        return None, None, len(errors), (errors[0] if errors else None)
    x = torch.stack([x for x, _ in good])
    y = torch.tensor([y for _, y in good], dtype=torch.long)
    return x, y, len(errors), (errors[0] if errors else None)


def iterate_labeled(
    data: ImageFolderData,
    preprocess: Preprocess,
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = True,
    description: str = "eval",
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Labelled batches (x, y) from an ImageFolder directory; ``limit`` takes every k-th sample so the
    subset spreads over all classes. Unreadable images are skipped and counted into ``data.skipped``."""
    if data.flat:
        raise VitqcError(
            f"{data.root} has no class subfolders: {description} needs {data.root}/<class>/<image> (ImageFolder layout)"
        )
    if batch_size < 1:
        raise VitqcError(f"batch size {batch_size} is not positive: pass a batch size of at least 1")
    samples = [data.samples[i] for i in spread_indices(len(data.samples), limit)]
    loader = torch.utils.data.DataLoader(
        LabeledImages(samples, preprocess.transform()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skipping,
    )
    skipped, yielded, first_error = 0, 0, None
    with progress_bar(description, len(samples), unit="images", quiet=not progress) as bar:
        for x, y, n_bad, error in loader:
            skipped += n_bad
            data.skipped += n_bad
            first_error = first_error or error
            bar.advance(n_bad + (0 if x is None else len(x)))
            if x is None:
                continue
            yielded += len(x)
            yield x, y
    warn_skipped(skipped, len(samples), data.root, first_error)
    if not yielded:
        raise VitqcError(f"none of the {len(samples)} images in {data.root} could be read: check the files")


def warn_skipped(count: int, total: int, root: Path, first_error: str | None) -> None:
    """One warning line for the unreadable images of a folder (nothing when there were none)."""
    if count:
        noun = "image" if count == 1 else "images"
        detail = f" (first: {first_error})" if first_error else ""
        warn(f"skipped {count} unreadable {noun} of {total} in {root}{detail}")
