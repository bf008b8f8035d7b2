"""``--calib KIND[:VALUE]`` for the generated sources, and the glue ``vitqc compile``/``generate`` share.

VALUE is a comma-separated list: ``key=value`` items set source options (values are TOML literals, e.g.
``inversion:steps=100,lr=0.05``; lists use ``/``, e.g. ``noise:mean=0.5/0.5/0.5``); for ``learned-prompts`` a
bare item is the embeddings file to reuse or write (``learned-prompts:emb.safetensors,steps=50``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from vitqc.errors import VitqcError
from vitqc.options import parse_literal


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
    """A :class:`~vitqc.calib.Source` for ``--calib KIND[:VALUE]`` with the model's class names."""
    from vitqc.calib import get_source
    from vitqc.calib.classes import resolve_class_names
    from vitqc.calib.features import num_classes

    cls = get_source(kind)
    options = parse_options(kind, value, extra)
    n = num_classes(module, preprocess)
    names = resolve_class_names(module, n, class_names, required=cls.needs_class_names)
    kwargs: dict[str, Any] = {}
    from vitqc.calib.diffusion import DiffusionSource  # (diffusers itself is imported only when loading)

    if issubclass(cls, DiffusionSource):
        kwargs["diffusion"] = diffusion
    elif diffusion is not None:
        raise VitqcError(f"--diffusion is for --calib prompts / learned-prompts, not {kind}")
    return cls(module, preprocess, names, seed=seed, device=device, quiet=quiet, **options, **kwargs)


def synthesize(kind: str, value: str | None, module: nn.Module, preprocess, size: int | None, seed: int, *,
               class_names: str | Path | None = None, diffusion: str | None = None, default_size: int = 256,
               batch_size: int = 32):
    """(normalised calibration batches, JSON record, the source) for ``vitqc compile --calib KIND``
    (``default_size`` images when ``size`` is None); the source can make more (data-free rounds)."""
    from vitqc.calib import calibration_batches

    source = make_cli_source(kind, value, module, preprocess, class_names=class_names, diffusion=diffusion, seed=seed)
    return (*calibration_batches(source, module, preprocess, source.class_names,
                                 default_size if size is None else size, batch_size=batch_size), source)
