"""Backends lower a materialized quantized model (an artifact, or what ``vitqc.compile`` returns) to code that
runs its integers. Each registers with :func:`register_backend` (or the ``vitqc.backends`` entry point group);
``vitqc backends`` lists them and ``vitqc export ARTIFACT --backend NAME`` (or :func:`export`) runs one.

* :mod:`vitqc.backends.packing`: dense bit packing (2..8-bit fields, ternary at 2 bits or 5 trits a byte).
* :mod:`vitqc.backends.packed` (``packed``): integer kernels over packed weights (``torch._int_mm`` int8 GEMM,
  zero points folded, static or per-token activation scales), saved as a vitqc archive (JSON + safetensors).
* :mod:`vitqc.backends.executorch` (``executorch``): PT2E + XNNPACK ``.pte`` on vitqc's weight codes and activation
  grids (:mod:`vitqc.backends.xnnpack_act`: how each grid reaches XNNPACK's int8 linears;
  :mod:`vitqc.backends.xnnpack_rewrite`: graph rewrites that keep the model inside XNNPACK's delegates).

Both start from the quantized ``torch.export`` program (the artifact's, or an export of the graph) and find each
layer by its stored tensors and module path (:mod:`vitqc.backends.program`). Modules are imported on use
(ExecuTorch is heavy).

A backend is a class with a ``name``, a one-line ``summary``, the file ``suffix`` it writes, an ``Options``
dataclass, and ``export(artifact, path, options, say) -> Path`` which lowers, writes ``path`` and calls
``say(line)`` with what the user should read.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from vitqc.errors import VitqcError
from vitqc.options import make_options
from vitqc.registry import Registry

__all__ = ["BACKENDS", "register_backend", "export", "backend_options"]


def _check_backend(name: str, cls: Any) -> None:
    for attr in ("summary", "suffix", "Options", "export"):
        if not hasattr(cls, attr):
            raise TypeError(f"backend {name!r} ({cls!r}) lacks `{attr}`")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"backend {name!r}: Options must be a dataclass")


BACKENDS: Registry[Any] = Registry("backend", "vitqc.backends", list_command="vitqc backends", check=_check_backend,
                                   builtins=("vitqc.backends.packed", "vitqc.backends.executorch"))


def register_backend(cls: Any) -> Any:
    """Class decorator: make a backend available to ``vitqc export --backend NAME`` under ``cls.name``."""
    return BACKENDS.register(cls)


def backend_options(backend: str, values: dict[str, Any]) -> Any:
    """The backend's Options from loosely typed values; an option it does not take is one line."""
    cls = BACKENDS.get(backend)
    valid = [f.name for f in dataclasses.fields(cls.Options)]
    return make_options(cls.Options, values, lambda k: f"--{k.replace('_', '-')}", lambda name, _: (
        f"--{name.replace('_', '-')} does not apply to --backend {backend} (its options: "
        f"{', '.join('--' + v.replace('_', '-') for v in valid) or 'none'})"))


def export(artifact: Any, backend: str, out: str | Path | None = None, *, say: Callable[[str], Any] | None = None,
           **options: Any) -> Path:
    """Lower ``artifact`` (an :class:`~vitqc.artifact.Artifact` or its path) with ``backend`` and write the result
    to ``out`` (default: the artifact's name with the backend's suffix). ``say`` receives the lines worth
    reading (what was substituted, what was lowered); returns the written path."""
    from vitqc.archive import check_output_path
    from vitqc.artifact import Artifact, load_artifact

    cls = BACKENDS.get(backend)
    opts = backend_options(backend, options)
    if out is None:
        if isinstance(artifact, Artifact):
            name = artifact.path.name
        elif isinstance(artifact, (str, Path)):
            name = Path(artifact).name
        else:
            raise VitqcError("give `out` when exporting something other than an artifact file")
        out = Path(name.removesuffix(".vitqc") + cls.suffix)
    check_output_path(out, f"{backend} output")
    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
    return cls().export(art, Path(out), opts, say or (lambda line: None))
