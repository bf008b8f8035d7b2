"""Calibration data without real images: pluggable sources selected with ``--calib``.

=====================  ==========================================================================================
``noise``              Gaussian images (:mod:`vitqc.calib.noise`): the floor every other source must beat
``inversion``          images optimized from noise against the FP ViT (:mod:`vitqc.calib.inversion`): class
                       targets + patch-level contrastive loss + augmentation; the default data-free source
``prompts``            SD-Turbo images of "a <adjective> photo of <adjective> <class>" (:mod:`vitqc.calib.prompts`)
``learned-prompts``    SD-Turbo images from K learned prompt embeddings per class (:mod:`vitqc.calib.learned_prompts`)
=====================  ==========================================================================================

Every source is a :class:`Source`: built from the FP model, its :class:`~vitqc.data.Preprocess`, the class
names, a seed and a device; ``prepare(classes)`` does any per-class learning, and
``generate_batch(labels, indices)`` returns float images in [0, 1] at the model's input size (before the
mean/std normalisation), one per (class, index-within-class) item. Item ``(c, i)`` is a pure function of
the seed and ``(c, i)`` for noise and the diffusion sources, so shards can be generated in any order, on any
rank, and resumed. :func:`generate` iterates a whole class-balanced plan; :func:`calibration_batches`
returns normalised batches for ``vitqc.compile``; :mod:`vitqc.calib.cache` writes an ImageFolder cache.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from vitqc.data import Preprocess
from vitqc.errors import VitqcError
from vitqc.options import make_options

__all__ = ["Source", "get_source", "make_source", "plan_items", "generate", "calibration_batches",
           "item_seed", "default_device"]



def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def item_seed(seed: int, label: int, index: int) -> int:
    """A 63-bit seed for item (label, index) of a run seeded with ``seed``."""
    h = (int(seed) * 0x9E3779B97F4A7C15 + int(label) * 0xBF58476D1CE4E5B9 + int(index) * 0x94D049BB133111EB)
    h ^= h >> 31
    return h & ((1 << 63) - 1)


class Source:
    """A calibration data source. Subclasses set ``name``, ``Options`` (a dataclass) and implement
    :meth:`generate_batch`; :meth:`prepare` is for per-class work done before generating."""

    name = ""
    Options: type = type("Options", (), {})
    needs_class_names = False  # text-guided sources need real names; others can use class indices
    default_batch_size = 32

    def __init__(self, model: nn.Module, preprocess: Preprocess, class_names: Sequence[str], *, seed: int = 0,
                 device: str | torch.device | None = None, quiet: bool = False, **options: Any):
        self.model = model
        self.preprocess = preprocess
        self.class_names = list(class_names)
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else default_device()
        self.quiet = quiet
        self.options = self.parse_options(options)
        self.stats: dict[str, Any] = {}

    @classmethod
    def parse_options(cls, options: dict[str, Any]):
        if not dataclasses.is_dataclass(cls.Options):
            if options:
                raise VitqcError(f"--calib {cls.name} takes no options (got {', '.join(sorted(options))})")
            return cls.Options()
        # built as pass options (``--set``) are, so both read and fail alike
        return make_options(cls.Options, options, lambda k: f"--calib {cls.name} option {k}", lambda name, valid: (
            f"--calib {cls.name} has no option {name!r}: its options are {', '.join(sorted(valid))}"))

    @property
    def batch_size(self) -> int:
        return int(getattr(self.options, "batch_size", self.default_batch_size))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> dict[str, Any]:
        opts = dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else {}
        return {"source": self.name, "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()}}

    def prepare(self, classes: Sequence[int]) -> None:
        """Per-class work before :meth:`generate_batch` is called for ``classes`` (default: nothing)."""

    def generate_batch(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W], float32 on the CPU in [0, 1], at the model's input size."""
        raise NotImplementedError

    default_size = 256  # images drawn for ``--calib KIND`` without --calib-size

    @classmethod
    def draw(cls, value: str | None, *, model: nn.Module, preprocess: Preprocess, size: int | None,
             holdout: int | None, seed: int, class_names=None, diffusion=None, device=None, quiet: bool = False):
        """``--calib KIND[:VALUE]``: ``size`` generated images for the passes and ``holdout`` more after them
        in the same class-balanced plan for measurements (a :class:`~vitqc.calib.spec.Calibration`)."""
        from vitqc.calib.spec import Calibration, default_holdout, make_cli_source

        size = cls.default_size if size is None else size
        holdout = default_holdout(size) if holdout is None else holdout
        source = make_cli_source(cls.name, value, model, preprocess, class_names=class_names, diffusion=diffusion,
                                 seed=seed, device=device, quiet=quiet)
        batches, info = calibration_batches(source, model, preprocess, source.class_names, size + holdout,
                                            quiet=quiet)
        images = torch.cat(batches)
        return Calibration(images[:size], images[size:] if holdout else None, info, source=source)

    # helpers for subclasses
    def item_generator(self, label: int, index: int, device: torch.device | None = None) -> torch.Generator:
        g = torch.Generator(device=device or "cpu")
        g.manual_seed(item_seed(self.seed, label, index))
        return g

    def to_model_channels(self, images: torch.Tensor) -> torch.Tensor:
        """RGB [B, 3, H, W] -> the model's channel count (luma for 1-channel models)."""
        channels = self.preprocess.channels
        if images.shape[1] == channels:
            return images
        if channels == 1 and images.shape[1] == 3:
            w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
            return (images * w).sum(1, keepdim=True)
        if channels == 3 and images.shape[1] == 1:
            return images.expand(-1, 3, -1, -1)
        raise VitqcError(f"cannot turn {images.shape[1]}-channel images into the model's {channels} channels")


def get_source(kind: str) -> type[Source]:
    """The data-free :class:`Source` class registered for ``kind`` (noise, inversion, prompts, learned-prompts)."""
    from vitqc.calib.spec import SOURCES

    cls = SOURCES.get(kind)
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise VitqcError(f"calibration source {kind!r} reads existing images; it generates none")
    return cls


def make_source(kind: str, model: nn.Module, preprocess: Preprocess, class_names: Sequence[str], **kwargs) -> Source:
    return get_source(kind)(model, preprocess, class_names, **kwargs)


def plan_items(classes: Sequence[int], per_class: int, seed: int | None = None,
               limit: int | None = None) -> list[tuple[int, int]]:
    """(class, index) items, round-robin over ``classes`` so every prefix is class-balanced; with ``seed``
    the class order is shuffled first (so a ``limit`` smaller than the class count picks random classes)."""
    order = list(classes)
    if seed is not None:
        random.Random(seed).shuffle(order)
    items = [(c, i) for i in range(per_class) for c in order]
    return items[:limit] if limit is not None else items


def _run(source: Source, items: Sequence[tuple[int, int]], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        labels = torch.tensor([c for c, _ in chunk], dtype=torch.long)
        indices = torch.tensor([i for _, i in chunk], dtype=torch.long)
        yield source.generate_batch(labels, indices), labels


def generate(kind: str | Source, model: nn.Module, preprocess: Preprocess, class_names: Sequence[str],
             per_class: int, seed: int = 0, device: str | torch.device | None = None,
             classes: Sequence[int] | None = None, batch_size: int | None = None, quiet: bool = True,
             **options: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate (images in [0, 1] before normalisation, labels) over ``per_class`` images of each class."""
    source = kind if isinstance(kind, Source) else make_source(kind, model, preprocess, class_names, seed=seed,
                                                               device=device, quiet=quiet, **options)
    classes = list(range(len(class_names))) if classes is None else list(classes)
    source.prepare(classes)
    yield from _run(source, plan_items(classes, per_class), batch_size or source.batch_size)


def calibration_batches(kind: str | Source, model: nn.Module, preprocess: Preprocess, class_names: Sequence[str],
                        size: int, seed: int = 0, device: str | torch.device | None = None, batch_size: int = 32,
                        quiet: bool = False, **options: Any) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """``size`` normalised calibration images from source ``kind`` (a name or a built :class:`Source`),
    class-balanced with the classes in a seeded order, as batches of ``batch_size`` for ``vitqc.compile``;
    and a JSON record of what was done (source, options, timings, source statistics)."""
    from vitqc.calib.features import normalise
    from vitqc.console import progress_bar

    if size < 1:
        raise VitqcError(f"calibration size {size} is not positive: pass --calib-size of at least 1")
    source = kind if isinstance(kind, Source) else make_source(kind, model, preprocess, class_names, seed=seed,
                                                               device=device, quiet=quiet, **options)
    n = source.num_classes
    items = plan_items(range(n), math.ceil(size / n), seed=source.seed, limit=size)
    started = time.perf_counter()
    source.prepare(sorted({c for c, _ in items}))
    prepared = time.perf_counter()
    images: list[torch.Tensor] = []
    with progress_bar(f"generate {source.name}", len(items), unit="images", quiet=quiet) as bar:
        for x, _ in _run(source, items, source.batch_size):
            images.append(normalise(x, preprocess))
            bar.advance(len(x))
    done = time.perf_counter()
    info = {**source.describe(), "classes": n, "seconds_prepare": round(prepared - started, 2),
            "seconds_generate": round(done - prepared, 2),
            "images_per_second": round(len(items) / max(done - prepared, 1e-9), 2), **source.stats}
    return list(torch.cat(images).split(batch_size)), info
