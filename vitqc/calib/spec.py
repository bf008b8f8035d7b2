"""``--calib``: one grammar, one registry of sources, one :class:`Calibration` the passes share.

    images:DIR | DIR             real images (class subfolders balance the draw)      vitqc.calib.images
    demo                         the demo model's train split                          vitqc.demo
    KIND[:VALUE]                 a data-free source: noise, inversion, prompts, learned-prompts

VALUE of a data-free source is a comma-separated list: ``key=value`` items set source options (values are TOML
literals, e.g. ``inversion:steps=100,lr=0.05``; lists use ``/``, e.g. ``noise:mean=0.5/0.5/0.5``); for
``learned-prompts`` a bare item is the embeddings file to reuse or write (``learned-prompts:emb.safetensors``).
A keyword wins over a same-named directory (write ``images:demo`` or ``./demo``).

A source is a class registered with :func:`register_source` (or through the ``vitqc.calib_sources`` entry
point group) with a ``name``, a one-line ``summary`` and a ``draw(value, *, model, preprocess, size, holdout,
seed, ...)`` classmethod returning a :class:`Calibration`. ``vitqc sources`` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from vitqc.errors import VitqcError
from vitqc.options import parse_literal
from vitqc.registry import Registry

__all__ = ["Calibration", "SOURCES", "register_source", "parse", "parse_options", "draw", "generate",
           "make_cli_source", "default_holdout"]

SOURCES: Registry[Any] = Registry(
    "calibration source", "vitqc.calib_sources", list_command="vitqc sources",
    builtins=("vitqc.calib.images", "vitqc.demo", "vitqc.calib.noise", "vitqc.calib.inversion",
              "vitqc.calib.prompts", "vitqc.calib.learned_prompts"))


def register_source(cls: Any) -> Any:
    """Class decorator: make a calibration source available to ``--calib`` under ``cls.name``."""
    return SOURCES.register(cls)


@dataclass
class Calibration:
    """What a ``--calib`` draw gives the compiler: preprocessed (normalised) images for the passes, images
    held out from them for honest measurements, and a JSON record of what was done."""

    images: torch.Tensor  # [N, C, H, W]
    holdout: torch.Tensor | None = None  # never seen by a pass
    record: dict[str, Any] = field(default_factory=dict)
    source: Any = None  # the data-free Source that made the images, if one did (it can make more: data-free rounds)

    def __post_init__(self) -> None:
        if not len(self.images):
            raise VitqcError("the calibration draw holds no image")
        self.record = {**self.record, "images": len(self.images),
                       "held_out": 0 if self.holdout is None else len(self.holdout)}


def default_holdout(size: int) -> int:
    """Images held out for measurements when the user does not say: a tenth of the calibration images, at
    least 8 and at most 256 (none for fewer than 16)."""
    return 0 if size < 16 else max(8, min(256, round(size / 10)))


_FORMS = "images:DIR, an existing directory, or a source (`vitqc sources` lists them)"


def parse(text: str) -> tuple[str, str | None]:
    """``--calib TEXT`` -> (source name, value or None); see the module docstring."""
    spec = str(text).strip()
    if not spec:
        raise VitqcError(f"--calib is empty: use {_FORMS}")
    kind, sep, value = spec.partition(":")
    if kind == "images" and sep:
        if not value:
            raise VitqcError("--calib images: needs a directory: use images:DIR")
        return "images", value
    if kind != "images" and kind in SOURCES:
        if kind == "demo" and sep:
            raise VitqcError(f"--calib {spec!r}: demo takes no value: use --calib demo")
        return kind, (value if sep and value else None)
    if Path(spec).expanduser().is_dir():
        return "images", spec
    if Path(spec).expanduser().exists():
        raise VitqcError(f"--calib {spec!r} is a file, not a directory: use {_FORMS}")
    if "/" in spec or "\\" in spec or spec.startswith("."):
        raise VitqcError(f"--calib directory {spec} does not exist: pass an existing folder of images")
    raise VitqcError(f"--calib {spec!r} is not understood: use {_FORMS} ({', '.join(SOURCES.names())})")


def _literal(text: str) -> Any:
    text = text.strip()
    if "/" in text and not text.startswith(("'", '"')):
        parts = [_literal(part) for part in text.split("/") if part]
        if parts and all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in parts):
            return parts  # a list of numbers, e.g. mean=0.5/0.5/0.5
        return text  # a path
    return parse_literal(text)


def parse_options(kind: str, value: str | None, extra: Sequence[str] = ()) -> dict[str, Any]:
    """Source options from the ``--calib`` value and ``--opt KEY=VALUE`` items."""
    options: dict[str, Any] = {}
    items = [v for v in (value or "").split(",") if v.strip()] + list(extra)
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            if kind == "learned-prompts" and "embeddings" not in options:
                options["embeddings"] = item.strip()
                continue
            raise VitqcError(f"--calib {kind}: {item!r} is not KEY=VALUE (e.g. {kind}:batch_size=16)")
        if not key:
            raise VitqcError(f"--calib {kind}: {item!r} has no option name before '='")
        options[key] = _literal(text)
    return options


def make_cli_source(kind: str, value: str | None, module: nn.Module, preprocess, *, class_names: str | Path | None,
                    diffusion: str | None, seed: int, extra: Sequence[str] = (), device=None, quiet: bool = False):
    """A data-free :class:`~vitqc.calib.Source` for ``--calib KIND[:VALUE]`` with the model's class names."""
    from vitqc.calib import Source
    from vitqc.calib.classes import resolve_class_names
    from vitqc.calib.diffusion import DiffusionSource  # (diffusers itself is imported only when loading)
    from vitqc.calib.features import num_classes

    cls = SOURCES.get(kind)
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise VitqcError(f"--calib {kind} reads existing images; `vitqc generate` makes data-free ones "
                         f"({', '.join(k for k, c in SOURCES.items().items() if isinstance(c, type) and issubclass(c, Source))})")
    options = parse_options(kind, value, extra)
    n = num_classes(module, preprocess)
    names = resolve_class_names(module, n, class_names, required=cls.needs_class_names)
    kwargs: dict[str, Any] = {}
    if issubclass(cls, DiffusionSource):
        kwargs["diffusion"] = diffusion
    elif diffusion is not None:
        raise VitqcError(f"--diffusion is for --calib prompts / learned-prompts, not {kind}")
    return cls(module, preprocess, names, seed=seed, device=device, quiet=quiet, **options, **kwargs)


def draw(spec: str, *, model: nn.Module, preprocess, size: int | None = None, holdout: int | None = None,
         seed: int = 0, class_names: str | Path | None = None, diffusion: str | None = None, device=None,
         quiet: bool = False) -> Calibration:
    """Draw the calibration images ``--calib spec`` names (``size`` of them, the source's default when None) and
    ``holdout`` more for measurements (:func:`default_holdout` of the size when None)."""
    kind, value = parse(spec)
    if size is not None and size < 1:
        raise VitqcError(f"calibration size {size} is not positive: pass --calib-size of at least 1 (or leave it out)")
    if holdout is not None and holdout < 0:
        raise VitqcError(f"--holdout {holdout} is negative: pass 0 (measure on the calibration images) or more")
    return SOURCES.get(kind).draw(value, model=model, preprocess=preprocess, size=size, holdout=holdout, seed=seed,
                                  class_names=class_names, diffusion=diffusion, device=device, quiet=quiet)


def generate(model: Any, spec: str, out_dir: str | Path, per_class: int, *, preprocess=None, shard_size: int | None = None,
             options: Sequence[str] = (), class_names: str | Path | None = None, diffusion: str | None = None,
             seed: int = 0, device=None, model_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``per_class`` images of each class from the data-free source ``spec`` to a resumable ImageFolder
    cache ``out_dir`` (``vitqc compile --calib DIR`` reads it); under ``torchrun`` the classes are split across
    ranks. ``model``: a spec string or an nn.Module (with ``preprocess``). Returns this rank's statistics."""
    from vitqc.calib import distributed as dist
    from vitqc.calib.cache import write_cache
    from vitqc.models import load_model_and_preprocess

    kind, value = parse(spec)
    if kind in ("images", "demo"):
        raise VitqcError("vitqc generate makes data-free calibration images: use --calib inversion, noise, prompts "
                         "or learned-prompts (images:DIR is read directly by vitqc compile)")
    dist.init_from_env()
    if device is None and dist.world_size() > 1:
        device = str(dist.local_device())
    if isinstance(model, str):
        loaded, own = load_model_and_preprocess(model, **(model_options or {}))
        module, preprocess = loaded.module, preprocess or own
    else:
        module = model
    if preprocess is None:
        raise VitqcError("the model does not say how images become its inputs: give --img-size (and --mean/--std)")
    extra = list(options)
    if kind == "learned-prompts" and "embeddings" not in parse_options(kind, value, extra):
        extra.append(f"embeddings='{(Path(out_dir) / 'learned_prompts.safetensors').as_posix()}'")  # reused on resume
    source = make_cli_source(kind, value, module, preprocess, class_names=class_names, diffusion=diffusion,
                             seed=seed, extra=extra, device=device)
    return write_cache(source, out_dir, per_class, shard_size=shard_size,
                       extra={"model": model if isinstance(model, str) else type(model).__qualname__})
