"""Capture an ``nn.Module`` to a ``torch.fx.GraphModule``: one graph form, whichever front end made it.

Front ends (:func:`capture` picks one and records it in ``gm.meta["vitqc"]["frontend"]``):

* ``fx``: symbolic tracing with :class:`VitqcTracer` (the default; the graph keeps the model's modules as
  ``call_module`` nodes);
* ``export``: ``torch.export`` (:mod:`vitqc.from_export`), for ``.pt2`` programs, transformers models (their
  forward branches on input shapes) and any model fx cannot trace: when fx fails, :func:`capture` says so in one
  line on stderr and exports instead. The exported ATen graph is turned into the same torch-level fx form.

transformers models are captured through :class:`vitqc.hf.HFImageModel` (``images -> logits``) whatever form
they were given in.

:class:`VitqcTracer` is ``torch.fx.Tracer`` with

* leaf modules: torch's defaults (every ``torch.nn`` module but ``nn.Sequential``), ``nn.MultiheadAttention``
  (a black box that the ``decompose_mha`` pass opens), whatever was given to :func:`register_leaf_module`, and
  timm's registered no-trace modules (``timm.layers.register_notrace_module``) *that hold no weight matrix*:
  timm keeps e.g. MobileViT's ``MobileVitBlock`` whole, which would leave its transformer in floating point, so
  such modules are traced into (and when that fails, the model is exported instead);
* autowrapped functions: timm's no-trace functions (``timm.layers.register_notrace_function``) and those given
  to :func:`register_leaf_function`;
* ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` traced through plain-Python re-implementations of
  their slow path (their fast-path checks call ``bool()`` on tensors and cannot be traced), so their
  ``self_attn`` / ``linear1`` / ``norm1`` ... appear as ordinary ``call_module`` nodes.

Node metadata after :func:`capture` (both front ends):

* ``nn_module_stack``: ``{key: (module path, module type)}``, outermost first;
* ``vitqc_owner``: the path of the module that owns the node (``"blocks.0.attn"`` for the matmul inside that
  attention; for ``call_module`` / ``get_attr`` nodes the parent path of the target; ``""`` for the root);
* ``tensor_meta`` (torch's ``ShapeProp``) when an example input was given.

The ``canonicalize`` pass then brings either graph to the canonical form the quantization passes expect (README,
"Writing a pass").
"""
from __future__ import annotations

import functools
import inspect
import operator
import traceback
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_flatten

from vitqc.coverage import opaque_weight_calls
from vitqc.errors import TraceFailure, VitqcError
from vitqc.graph import owner_of

__all__ = ["VitqcTracer", "capture", "register_leaf_module", "register_leaf_function", "set_owner_meta",
           "max_abs_diff", "FRONTENDS", "CaptureFailed"]

FRONTENDS = ("auto", "fx", "export")

_LEAF_MODULES: set[type[nn.Module]] = set()
_LEAF_FUNCTIONS: set[Callable[..., Any]] = set()


def register_leaf_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: keep modules of this type (and subclasses) as one ``call_module`` node when capturing."""
    _LEAF_MODULES.add(cls)
    return cls


def register_leaf_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: keep calls of this (module-level) function as one ``call_function`` node when capturing."""
    _LEAF_FUNCTIONS.add(fn)
    return fn


def _timm_notrace() -> tuple[list[type[nn.Module]], list[Callable[..., Any]]]:
    try:
        import timm  # noqa: F401  (importing timm registers its no-trace modules/functions)
        from timm.layers import _fx as timm_fx
    except ImportError:  # pragma: no cover - timm is a dependency
        return [], []
    mods = [m for m in timm_fx.get_notrace_modules() if isinstance(m, type)]
    fns = [f for f in timm_fx.get_notrace_functions() if callable(f)]
    return mods, fns


# ------------------------------------------------------------------ traceable nn.TransformerEncoder(Layer)
def _encoder_layer_forward(layer: nn.TransformerEncoderLayer, src: Any, src_mask: Any = None,
                           src_key_padding_mask: Any = None, is_causal: bool = False) -> Any:
    """The slow path of ``nn.TransformerEncoderLayer.forward``, without its fast-path and mask checks.

    Masks are passed unchanged to ``self_attn``: ``nn.MultiheadAttention`` canonicalises them itself.
    """

    def sa_block(x: Any) -> Any:
        kwargs: dict[str, Any] = {"need_weights": False}
        if src_mask is not None:
            kwargs["attn_mask"] = src_mask
        if src_key_padding_mask is not None:
            kwargs["key_padding_mask"] = src_key_padding_mask
        if is_causal:
            kwargs["is_causal"] = True
        x = layer.self_attn(x, x, x, **kwargs)[0]
        return layer.dropout1(x)

    def ff_block(x: Any) -> Any:
        x = layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))
        return layer.dropout2(x)

    x = src
    if layer.norm_first:
        x = x + sa_block(layer.norm1(x))
        x = x + ff_block(layer.norm2(x))
    else:
        x = layer.norm1(x + sa_block(x))
        x = layer.norm2(x + ff_block(x))
    return x


def _encoder_forward(encoder: nn.TransformerEncoder, src: Any, mask: Any = None,
                     src_key_padding_mask: Any = None, is_causal: bool | None = None) -> Any:
    """The slow path of ``nn.TransformerEncoder.forward`` (no nested tensors)."""
    output = src
    for mod in encoder.layers:
        output = mod(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
    if encoder.norm is not None:
        output = encoder.norm(output)
    return output


_TRACE_THROUGH: dict[type[nn.Module], Callable[..., Any]] = {
    nn.TransformerEncoderLayer: _encoder_layer_forward,
    nn.TransformerEncoder: _encoder_forward,
}


def _reimplementation(m: nn.Module) -> Callable[..., Any] | None:
    for cls, fn in _TRACE_THROUGH.items():
        # only when the class's forward is torch's own (a subclass with its own forward is traced as written)
        if isinstance(m, cls) and type(m).forward is cls.forward:
            return fn
    return None


def holds_weights(m: nn.Module) -> bool:
    """Whether ``m`` holds a weight matrix (a parameter of two or more dims: a linear or conv weight)."""
    return any(p.dim() >= 2 for p in m.parameters())


class VitqcTracer(fx.Tracer):
    """``torch.fx.Tracer`` that knows timm's leaf modules/functions and traces nn.TransformerEncoder(Layer).

    timm's no-trace modules that hold weights are traced into (their paths are kept in ``opened``)."""

    def __init__(self, leaf_modules: tuple[type[nn.Module], ...] = (),
                 autowrap_functions: tuple[Callable[..., Any], ...] = ()) -> None:
        timm_mods, timm_fns = _timm_notrace()
        fns = tuple(dict.fromkeys([*timm_fns, *_LEAF_FUNCTIONS, *autowrap_functions]))
        super().__init__(autowrap_functions=fns)
        self.leaf_types: tuple[type[nn.Module], ...] = tuple(
            dict.fromkeys([*_LEAF_MODULES, *leaf_modules, nn.MultiheadAttention]))
        self.timm_leaf_types: tuple[type[nn.Module], ...] = tuple(timm_mods)
        self.opened: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _reimplementation(m) is not None:
            return False
        if isinstance(m, self.leaf_types):
            return True
        if isinstance(m, self.timm_leaf_types):
            if holds_weights(m):
                if module_qualified_name not in self.opened:
                    self.opened.append(module_qualified_name)
                return False
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        impl = _reimplementation(m)
        if impl is not None:
            forward = functools.partial(impl, m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            if not hasattr(e, "_vitqc_where"):
                try:
                    path = self.path_of_module(m)
                except Exception:  # pragma: no cover
                    path = "?"
                last = next(iter(reversed(self.graph.nodes)), None)
                try:
                    e._vitqc_where = (path, type(m), last.name if last is not None else None)  # type: ignore[attr-defined]
                except Exception:  # pragma: no cover - exceptions that refuse attributes
                    pass
            raise


# ------------------------------------------------------------------------------------------- node meta
def set_owner_meta(gm: fx.GraphModule) -> None:
    """Set ``node.meta["vitqc_owner"]`` on every node that lacks it."""
    for node in gm.graph.nodes:
        if "vitqc_owner" not in node.meta:
            node.meta["vitqc_owner"] = owner_of(node)


# ---------------------------------------------------------------------------------------------- capture
class CaptureFailed(TraceFailure):
    """A front end could not capture the model; ``short`` says why in a few words (for the fallback line)."""

    def __init__(self, message: str, short: str) -> None:
        super().__init__(message)
        self.short = short


def _fx_failure(model: nn.Module, e: BaseException) -> CaptureFailed:
    """Where and why fx failed, with a hint for making it traceable (one line)."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    where = getattr(e, "_vitqc_where", None)
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/torch/" not in f.filename and not f.filename.endswith("vitqc/capture.py")]
    loc = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    short_loc = f" at {frames[-1].filename.rpartition('/')[2]}:{frames[-1].lineno}" if frames else ""
    if where is not None:
        path, cls, last = where
        place = f"in module '{path}' ({cls.__qualname__})" if path else f"in {cls.__qualname__}.forward"
        short = f"{cls.__qualname__}{f' at {path}' if path else ''}: {type(e).__name__}{short_loc}"
        node = f", after node '{last}'" if last else ""
        hint = (f"; make it a leaf with vitqc.capture.register_leaf_module({cls.__qualname__}) (it then stays in "
                f"floating point)")
    else:
        place, node, hint = f"in {type(model).__qualname__}.forward", "", ""
        short = f"{type(e).__name__}{short_loc}"
    if frames and frames[-1].name != "forward":
        hint += (f", or wrap the function {frames[-1].name}() with timm.layers.register_notrace_function "
                 f"/ vitqc.capture.register_leaf_function")
    return CaptureFailed(f"could not capture {type(model).__qualname__} to a torch.fx graph {place}{node}: "
                         f"{type(e).__name__}: {first}{loc}{hint}", short)


def _flat_tensors(value: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [v for v in leaves if isinstance(v, torch.Tensor)]


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two (nested) outputs; inf if their structure differs."""
    ta, tb = _flat_tensors(a), _flat_tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf")
    diffs = [(x.detach().float() - y.detach().float()).abs().max().item() for x, y in zip(ta, tb) if x.numel()]
    return max(diffs, default=0.0)


def _default_concrete_args(model: nn.Module, n_inputs: int | None) -> dict[str, Any]:
    """Forward parameters after the tensor inputs that have defaults (``attn_mask=None``, ``is_causal=False``):
    they are specialised to their defaults, so the graph takes only the image."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):
        return {}
    if n_inputs is None:
        n_inputs = max(1, sum(1 for p in params if p.default is p.empty))
    return {p.name: p.default for p in params[n_inputs:]
            if p.default is not p.empty and (p.default is None or type(p.default) in (bool, int, float, str))}


def _drop_specialised_inputs(graph: fx.Graph, names: list[str]) -> None:
    """Remove the placeholders of specialised arguments and the asserts fx put on them."""
    wanted = set(names)
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        target = str(node.target)
        base, _, suffix = target.rpartition("_")
        if target not in wanted and not (suffix.isdigit() and base in wanted):  # fx renames to attn_mask_1
            continue
        for user in list(node.users):
            if user.op == "call_function" and getattr(user.target, "__name__", "") == "_assert_is_none":
                graph.erase_node(user)
            elif user.op == "call_function" and user.target is operator.eq and len(user.users) == 1:
                (check,) = user.users
                if check.op == "call_function" and check.target is torch._assert:
                    graph.erase_node(check)
                    graph.erase_node(user)
        if not node.users:
            graph.erase_node(node)


def _trace_fx(model: nn.Module, args: tuple[torch.Tensor, ...] | None,
              concrete_args: dict[str, Any] | None) -> tuple[fx.GraphModule, list[str]]:
    if concrete_args is None:
        concrete_args = _default_concrete_args(model, None if args is None else len(args))
    tracer = VitqcTracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete_args or None)
        if concrete_args:
            _drop_specialised_inputs(graph, list(concrete_args))
    except Exception as e:
        raise _fx_failure(model, e) from e
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    set_owner_meta(gm)
    opaque = opaque_weight_calls(gm)
    if opaque:
        node, weights = opaque[0]
        name = getattr(node.target, "__name__", str(node.target))
        raise CaptureFailed(f"fx keeps the function {name}() whole, and it applies the weights "
                            f"{', '.join(weights[:2])}: they could not be quantized",
                            f"it keeps {name}() whole, which applies {weights[0]}")
    return gm, tracer.opened


def _check(gm: fx.GraphModule, model: nn.Module, args: tuple[torch.Tensor, ...], check: bool, atol: float,
           frontend: str) -> None:
    """Record shapes (ShapeProp) and compare the graph's output with the eager model's."""
    name = type(model).__qualname__
    with torch.no_grad():
        try:
            got = ShapeProp(gm).propagate(*args)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0]
            raise CaptureFailed(f"the {frontend} graph of {name} fails on the example input: "
                                f"{type(e).__name__}: {first}",
                                f"its graph fails on the example input: {type(e).__name__}") from e
        if check:
            want = model(*args)
            diff = max_abs_diff(got, want)
            if not diff <= atol:
                raise CaptureFailed(
                    f"the {frontend} graph of {name} disagrees with the eager model (max abs diff {diff:.3g} > "
                    f"{atol:g}); a module probably branches on its input: register it with "
                    f"vitqc.capture.register_leaf_module",
                    f"its graph disagrees with the eager model (max abs diff {diff:.3g})")


def _say(message: str) -> None:
    from vitqc.console import err

    err.print(message, markup=False, highlight=False, soft_wrap=True)


def capture(model: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
            check: bool = True, atol: float = 1e-5, concrete_args: dict[str, Any] | None = None,
            frontend: str = "auto", quiet: bool = False) -> fx.GraphModule:
    """Capture ``model`` (put in eval mode) into a GraphModule in eval mode (see the module docstring).

    ``frontend``: ``"fx"``, ``"export"`` or ``"auto"``: ``.pt2`` programs and transformers models are exported,
    everything else is traced with fx, and exported when fx fails (one line on stderr unless ``quiet``). Export
    needs ``example``. fx specialises forward parameters after the inputs that have constant defaults (timm's
    ``attn_mask=None``, ``is_causal=False``) unless ``concrete_args`` says otherwise. With ``example``, shapes are
    recorded in ``node.meta["tensor_meta"]`` and, if ``check``, the graph's output is compared with the eager
    model's (max abs diff <= ``atol``). ``gm.meta["vitqc"]`` says which front end made the graph and why.
    Raises :class:`TraceFailure` (one line).
    """
    from vitqc.from_export import export_model, graph_from_exported, is_exported_module
    from vitqc.hf import HFImageModel, is_hf_model

    if frontend not in FRONTENDS:
        raise VitqcError(f"unknown capture front end {frontend!r}: use one of {', '.join(FRONTENDS)}")
    if is_hf_model(model):
        model = HFImageModel(model)
    try:
        model.eval()
    except NotImplementedError:  # torch.export'ed modules refuse .eval(); they are exported in eval mode
        pass
    args = None if example is None else (example if isinstance(example, tuple) else (example,))
    name = "ExportedProgram" if is_exported_module(model) else type(model).__qualname__
    opened: list[str] = []
    reason = None
    if is_exported_module(model):
        if frontend == "fx":
            raise TraceFailure("a torch.export program is captured from its own graph: use frontend='export' or 'auto'")
        used, reason = "export", "a torch.export program"
        gm = graph_from_exported(model, "the torch.export program")
    elif frontend == "export" or (frontend == "auto" and isinstance(model, HFImageModel)):
        if args is None:
            raise TraceFailure(f"capturing {name} with torch.export needs an example input")
        used = "export"
        reason = "asked for" if frontend == "export" else "transformers models branch on input shapes"
        gm = graph_from_exported(export_model(model, args[0]), name)
    else:
        used = "fx"
        try:
            gm, opened = _trace_fx(model, args, concrete_args)
            if args is not None:
                _check(gm, model, args, check, atol, "fx")
        except CaptureFailed as e:
            if frontend == "fx" or args is None:
                raise
            reason = f"fx could not trace it: {e.short}"
            try:
                gm = graph_from_exported(export_model(model, args[0]), name)
            except TraceFailure as export_failure:
                raise TraceFailure(f"{e}; {export_failure}") from export_failure
            used, opened = "export", []
    if used == "export" and args is not None:
        _check(gm, model, args, check, atol, "torch.export")
    if used == "export" and not quiet:
        _say(f"capture: {name}: {reason}; captured with torch.export instead" if reason.startswith("fx could not")
             else f"capture: {name} with torch.export ({reason})")
    gm.eval()
    gm.meta["vitqc"] = {"captured_from": name, "frontend": used, "frontend_reason": reason,
                        "opened_leaves": opened}
    return gm
