"""Class names for the calibration sources: from ``--class-names FILE`` (one name per line, in class-index
order), or from timm's ImageNet metadata for a model whose class count is an ImageNet subset's
(``timm.data.infer_imagenet_subset``: 1000 -> ImageNet-1k, 11821 -> ImageNet-12k, 21841/21843 ->
ImageNet-22k). A model with N other classes and no file gets a one-line error asking for the file, when the
source needs names (text prompts); sources that only need class indices (noise, inversion) then name the
classes ``class_0000``, ``class_0001``, ...
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from torch import nn

from vitqc.errors import VitqcError


def read_class_names(path: str | Path) -> list[str]:
    """One class name per line (blank lines at the end are ignored; blank lines inside are an error)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise VitqcError(f"--class-names {path}: no such file; write one class name per line, in class-index order")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise VitqcError(f"--class-names {path} is not UTF-8 text: write one class name per line") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = [line.strip() for line in lines]
    if not names:
        raise VitqcError(f"--class-names {path} is empty: write one class name per line, in class-index order")
    blank = [i + 1 for i, n in enumerate(names) if not n]
    if blank:
        raise VitqcError(f"--class-names {path} has an empty line ({blank[0]}): every line must name a class")
    return names


def imagenet_names(num_classes: int, model: nn.Module | None = None) -> list[str] | None:
    """ImageNet class descriptions ("tench, Tinca tinca", ...) when ``num_classes`` is an ImageNet subset's."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model) if model is not None and getattr(model, "num_classes", None) else None
    subset = subset or infer_imagenet_subset({"num_classes": num_classes})
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    if info.num_classes() != num_classes:
        return None
    return [info.index_to_description(i) for i in range(num_classes)]


def resolve_class_names(model: nn.Module, num_classes: int, class_names_file: str | Path | None = None,
                        required: bool = True) -> list[str]:
    """Names for the ``num_classes`` outputs of ``model`` (see the module doc)."""
    if class_names_file is not None:
        names = read_class_names(class_names_file)
        if len(names) != num_classes:
            raise VitqcError(f"--class-names {class_names_file} has {len(names)} names but the model has "
                             f"{num_classes} classes: write one name per class, in class-index order")
        return names
    names = imagenet_names(num_classes, model)
    if names is not None:
        return names
    if required:
        raise VitqcError(f"the model has {num_classes} classes and no class names: pass --class-names FILE "
                         f"(one name per line, in class-index order)")
    width = max(4, len(str(num_classes - 1)))
    return [f"class_{i:0{width}d}" for i in range(num_classes)]


def prompt_name(description: str) -> str:
    """The name to put in a text prompt: the first comma-separated part, underscores as spaces."""
    return description.split(",")[0].replace("_", " ").strip() or description.strip()


def folder_names(names: Sequence[str]) -> list[str]:
    """Cache folder names ``<index>_<slug>``: unique, sorted in class-index order, safe on any filesystem."""
    width = max(3, len(str(len(names) - 1)))
    out = []
    for i, name in enumerate(names):
        slug = re.sub(r"[^A-Za-z0-9]+", "_", prompt_name(name)).strip("_").lower()[:48]
        out.append(f"{i:0{width}d}_{slug}" if slug else f"{i:0{width}d}")
    return out
