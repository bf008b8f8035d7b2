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
from vitqc.layers import LayerTable
from vitqc.options import make_options
from vitqc.registry import Registry

__all__ = [
    "PassResult", "VitqcPass", "CompileContext", "register_pass", "get_pass", "registered_passes",
    "graph_property", "check_property", "registered_properties", "NoOptions", "PASSES", "applied", "APPLIED",
]


@dataclass
class NoOptions:
    """Options of a pass that takes none."""


@dataclass
class CompileContext:
    """What passes may read besides the graph: calibration images, the FP reference, the layer table, and a
    place to record what they measured.

    ``calib`` holds the preprocessed calibration images as one tensor ``[N, C, H, W]`` (a list of batches is
    joined once); passes take views of it with :meth:`calib_batches`. ``reference`` is the FP graph as captured
    (teacher for distillation, source of truth for agreement). ``layers`` is the typed layer table
    (``insert_quantizers`` fills it; it becomes the artifact's ``layers``). ``pipeline`` is the resolved
    pipeline being run, so a pass that runs another pass inside (mixed precision's finalists run
    ``joint_optimize``) uses the options the user gave that pass. Passes write what they measured into
    ``record[pass_name]``; it ends up in the artifact's manifest.
    """

    calib: torch.Tensor | None = None
    reference: torch.nn.Module | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    record: dict[str, Any] = field(default_factory=dict)
    layers: LayerTable = field(default_factory=LayerTable)
    pipeline: Any = None  # vitqc.pipeline.Pipeline (not imported here: pipeline imports this module)
    work_dir: str | None = None  # where long passes keep checkpoints
    resume: bool = False  # continue from the checkpoints in work_dir instead of starting over
    quiet: bool = False
    strict: bool = False  # a weight or attention matmul that is not recognised is an error, not a warning
    calib_source: Any = None  # the data-free vitqc.calib.Source that made calib, if one did (it can make more)

    def __post_init__(self) -> None:
        if isinstance(self.calib, (list, tuple)):
            self.calib = torch.cat(list(self.calib)) if self.calib else None

    def calib_images(self) -> torch.Tensor:
        """Every calibration image, ``[N, C, H, W]``."""
        if self.calib is None or not len(self.calib):
            raise VitqcError("this pipeline needs calibration data: pass --calib images:DIR (or another source)")
        return self.calib

    def calib_batches(self, batch_size: int | None = None) -> list[torch.Tensor]:
        """The calibration images as batches of ``batch_size`` (32 if None): views, nothing is copied."""
        return list(self.calib_images().split(batch_size or 32))

    def step_options(self, pass_name: str) -> dict[str, Any]:
        """The options the pipeline gives its first ``pass_name`` step (empty when it has none)."""
        steps = getattr(self.pipeline, "steps", None) or []
        return next((dict(step.options) for step in steps if step.name == pass_name), {})


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
        result.graph_module.meta.setdefault(APPLIED, []).append(self.name)
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


# ---------------------------------------------------------------------------------------------- history
APPLIED = "vitqc_applied"  # gm.meta key: names of the passes run on the graph, in order


def applied(gm: fx.GraphModule, pass_name: str) -> bool:
    """Whether ``pass_name`` has run on ``gm`` (for properties that are about what was done to a graph, such as
    'optimized', rather than about its structure)."""
    return pass_name in gm.meta.get(APPLIED, [])


# ---------------------------------------------------------------------------------------------- registry
def _check_pass(name: str, cls: type[VitqcPass]) -> None:
    if not isinstance(cls, type) or not issubclass(cls, VitqcPass):
        raise TypeError(f"{cls!r} registered as a pass is not a VitqcPass subclass")
    if not name.isidentifier():
        raise TypeError(f"{cls.__qualname__}: a pass needs a `name` that is a Python identifier")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"{cls.__qualname__}.Options must be a dataclass")


PASSES: Registry[type[VitqcPass]] = Registry("pass", "vitqc.passes", builtins=("vitqc.passes",),
                                             check=_check_pass, list_command="vitqc passes")
_PROPERTIES: dict[str, Callable[[fx.GraphModule], bool]] = {}
_PROPERTY_DOCS: dict[str, str] = {}
_PROPERTY_PROVIDERS: dict[str, set[str]] = {}


def register_pass(cls: type[VitqcPass]) -> type[VitqcPass]:
    """Class decorator: make a pass available to pipelines under ``cls.name``."""
    PASSES.register(cls)
    for prop in cls.ensures:
        _PROPERTY_PROVIDERS.setdefault(prop, set()).add(cls.name)
    return cls


def _load_builtin_passes() -> None:
    PASSES.names()  # imports every module of vitqc.passes (which registers its passes) and the plugins


def get_pass(name: str) -> type[VitqcPass]:
    return PASSES.get(name)


def registered_passes() -> dict[str, type[VitqcPass]]:
    return PASSES.items()


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


