"""The pass API: what a pass is, how it is registered, and the graph properties it can require/ensure.

A pass is a class in its own file under ``vitqc/passes/`` (or in the user's own module), decorated with
:func:`register_pass`. It declares

* ``name``: the name pipelines use (``insert_quantizers``),
* ``summary``: one line for ``vitqc passes``,
* ``Options``: a dataclass of typed options with defaults (serialised to JSON in the artifact),
* ``requires`` / ``ensures``: names of :func:`graph_property` predicates checked before and after it runs,

and implements ``call(graph_module, ctx) -> PassResult``. ``PassResult`` and ``PassBase`` are torch.fx's own
(``torch.fx.passes.infra.pass_base``), so a vitqc pass is also a torch.fx pass.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from vitqc.errors import PassCheckFailed, VitqcError
from vitqc.options import make_options

__all__ = [
    "PassResult", "VitqcPass", "CompileContext", "register_pass", "get_pass", "registered_passes",
    "graph_property", "check_property", "registered_properties", "NoOptions",
]


@dataclass
class NoOptions:
    """Options of a pass that takes none."""


@dataclass
class CompileContext:
    """What passes may read besides the graph: calibration data, the FP reference, a place to record results.

    ``calib`` is a list of input batches (float tensors, already preprocessed). ``reference`` is the FP
    graph as captured (teacher for distillation, source of truth for agreement). Passes write what they
    measured into ``record[pass_name]``; it ends up in the artifact's manifest.
    """

    calib: list[torch.Tensor] = field(default_factory=list)
    reference: torch.nn.Module | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    record: dict[str, Any] = field(default_factory=dict)
    work_dir: str | None = None  # where long passes keep checkpoints
    resume: bool = False  # continue from the checkpoints in work_dir instead of starting over
    quiet: bool = False
    calib_source: Any = None  # the data-free vitqc.calib.Source that made calib, if one did (it can make more)

    def calib_batches(self, batch_size: int | None = None) -> list[torch.Tensor]:
        """The calibration images re-batched to ``batch_size`` (all in one batch list if None)."""
        if not self.calib:
            raise VitqcError("this pipeline needs calibration data: pass --calib images:DIR (or another source)")
        if batch_size is None:
            return self.calib
        flat = torch.cat(self.calib)
        return list(flat.split(batch_size))


class VitqcPass(PassBase):
    """Base class of every vitqc pass. Subclass, set the class attributes, implement ``call``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[tuple[str, ...]] = ()  # type: ignore[assignment]
    ensures: ClassVar[tuple[str, ...]] = ()  # type: ignore[assignment]

    def __init__(self, options: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.options = build_options(self.Options, {**(options or {}), **kwargs}, self.name)

    def call(self, graph_module: fx.GraphModule, ctx: CompileContext) -> PassResult:  # type: ignore[override]
        raise NotImplementedError(f"pass {self.name!r} does not implement call()")

    def __call__(self, graph_module: fx.GraphModule, ctx: CompileContext | None = None) -> PassResult:  # type: ignore[override]
        ctx = ctx if ctx is not None else CompileContext()
        self.check_requires(graph_module)
        result = self.call(graph_module, ctx)
        if result is None:
            raise TypeError(f"pass {self.name!r} returned None; return PassResult(graph_module, modified)")
        self.check_ensures(result.graph_module)
        return result

    def check_requires(self, gm: fx.GraphModule) -> None:
        for prop in self.requires:
            if not check_property(prop, gm):
                fix = _PROPERTY_PROVIDERS.get(prop)
                hint = f"; run {' or '.join(sorted(fix))} before it" if fix else ""
                raise PassCheckFailed(f"pass {self.name!r} requires '{prop}', which does not hold{hint}")

    def check_ensures(self, gm: fx.GraphModule) -> None:
        for prop in self.ensures:
            if not check_property(prop, gm):
                raise PassCheckFailed(f"pass {self.name!r} should ensure '{prop}' but it does not hold afterwards "
                                      f"(a bug in the pass, or a graph it does not support)")

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)

    def __repr__(self) -> str:
        return f"{self.name}({json.dumps(self.options_dict())})"


# ---------------------------------------------------------------------------------------------- registry
_PASSES: dict[str, type[VitqcPass]] = {}
_PROPERTIES: dict[str, Callable[[fx.GraphModule], bool]] = {}
_PROPERTY_DOCS: dict[str, str] = {}
_PROPERTY_PROVIDERS: dict[str, set[str]] = {}


def register_pass(cls: type[VitqcPass]) -> type[VitqcPass]:
    """Class decorator: make a pass available to pipelines under ``cls.name``."""
    if not cls.name or not cls.name.isidentifier():
        raise TypeError(f"{cls.__qualname__}: a pass needs a `name` that is a Python identifier")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__qualname__}.Options must be a dataclass")
    known = _PASSES.get(cls.name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"pass name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}")
    _PASSES[cls.name] = cls
    for prop in cls.ensures:
        _PROPERTY_PROVIDERS.setdefault(prop, set()).add(cls.name)
    return cls


def _load_builtin_passes() -> None:
    import vitqc.passes  # noqa: F401  (imports every module in the package, which registers its passes)


def get_pass(name: str) -> type[VitqcPass]:
    _load_builtin_passes()
    try:
        return _PASSES[name]
    except KeyError:
        raise VitqcError(f"unknown pass {name!r}; `vitqc passes` lists them ({', '.join(sorted(_PASSES))})") from None


def registered_passes() -> dict[str, type[VitqcPass]]:
    _load_builtin_passes()
    return dict(sorted(_PASSES.items()))


def graph_property(name: str) -> Callable[[Callable[[fx.GraphModule], bool]], Callable[[fx.GraphModule], bool]]:
    """Decorator: register a predicate on a GraphModule that passes can name in ``requires``/``ensures``."""

    def deco(fn: Callable[[fx.GraphModule], bool]) -> Callable[[fx.GraphModule], bool]:
        _PROPERTIES[name] = fn
        _PROPERTY_DOCS[name] = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        return fn

    return deco


def check_property(name: str, gm: fx.GraphModule) -> bool:
    _load_builtin_passes()
    try:
        fn = _PROPERTIES[name]
    except KeyError:
        raise VitqcError(f"unknown graph property {name!r} (known: {', '.join(sorted(_PROPERTIES))})") from None
    return bool(fn(gm))


def registered_properties() -> dict[str, str]:
    _load_builtin_passes()
    return dict(sorted(_PROPERTY_DOCS.items()))


# ---------------------------------------------------------------------------------------------- options
def build_options(options_cls: type, values: dict[str, Any], pass_name: str) -> Any:
    """Instantiate a pass's Options dataclass from loosely typed values (TOML, JSON, ``--set`` strings)."""
    return make_options(options_cls, values, lambda k: f"{pass_name}.{k}", lambda name, valid: (
        f"unknown option {name!r} for pass {pass_name!r} (valid options: {', '.join(valid) or 'none'})"))


