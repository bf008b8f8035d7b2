"""``--calib images:DIR``: real images from a folder (a ``vitqc generate`` cache too), a seeded draw balanced
across its class subfolders."""
from __future__ import annotations

from pathlib import Path

import torch

from vitqc.calib.spec import Calibration, default_holdout, register_source
from vitqc.console import progress_bar
from vitqc.data import ImageFolderData, Preprocess, balanced_order, decode, warn_skipped
from vitqc.errors import VitqcError

__all__ = ["ImageFolderSource", "load_images"]


def load_images(directory: str | Path | ImageFolderData, preprocess: Preprocess, size: int | None, seed: int,
                holdout: int = 0, quiet: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``size`` images (all but ``holdout`` when None) and ``holdout`` more after them, in a seeded order
    balanced across class folders, decoded and preprocessed: ``(images, held_out or None)``. The first
    ``size`` are the same whatever ``holdout`` is. Unreadable images are skipped (one warning line) and replaced
    by the next in the order; the held-out share shrinks first when the folder runs out."""
    data = directory if isinstance(directory, ImageFolderData) else ImageFolderData(directory, require_classes=False)
    if size is not None and size < 1:
        raise VitqcError(f"calibration size {size} is not positive: pass --calib-size of at least 1 (or leave it out)")
    if holdout < 0:
        raise VitqcError(f"held-out count {holdout} is negative: pass --holdout 0 or more")
    order = balanced_order([label for _, label in data.samples], seed)
    if size is None:
        size = max(len(order) - holdout, 1)
    wanted = min(size + holdout, len(order))
    transform = preprocess.transform()
    images: list[torch.Tensor] = []
    skipped, first_error = 0, None
    with progress_bar("calibration images", wanted, unit="images", quiet=quiet) as bar:
        for index in order:
            if len(images) == wanted:
                break
            path = data.samples[index][0]
            try:
                image = decode(path)
            except Exception as exc:  # noqa: BLE001 - any decode failure means "unreadable"
                skipped += 1
                first_error = first_error or f"{path.name}: {exc}"
                continue
            images.append(transform(image))
            bar.advance(1)
    data.skipped += skipped
    warn_skipped(skipped, skipped + len(images), data.root, first_error)
    if not images:
        raise VitqcError(f"none of the {len(order)} images in {data.root} could be read: check the files")
    stacked = torch.stack(images)
    return stacked[:size], (stacked[size:] if len(stacked) > size else None)


@register_source
class ImageFolderSource:
    name = "images"
    summary = "real images from a folder (images:DIR, or a bare existing directory); class subfolders balance the draw"
    default_size = None  # every image of the folder

    @classmethod
    def draw(cls, value: str | None, *, preprocess: Preprocess, size: int | None, holdout: int | None, seed: int,
             quiet: bool = False, **_: object) -> Calibration:
        from vitqc.calib.cache import describe_cache

        if not value:
            raise VitqcError("--calib images: needs a directory: use images:DIR")
        data = ImageFolderData(value, require_classes=False)
        if holdout is None:
            holdout = default_holdout(size if size is not None else len(data.samples))
        images, held_out = load_images(data, preprocess, size, seed, holdout, quiet=quiet)
        record = {"source": "images", "dir": str(value), **(describe_cache(value) or {})}
        return Calibration(images, held_out, record)
