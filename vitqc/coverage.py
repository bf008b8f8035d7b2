"""Coverage: which weights and attention matmuls run quantized, and why every other one does not.

:func:`measure` reads a graph after ``insert_quantizers`` (fake-quant) or after ``materialize`` (integer) and
counts, for linear weights, convolution weights and attention matmuls (a matmul of two activations):

* ``present``: every one in the graph, in any form: ``nn.Linear`` / ``nn.Conv*`` calls, functional ones on a
  parameter (``F.linear(x, W)``, ``x @ W``) or on a weight computed from parameters, those inside modules
  kept whole as leaves, matmuls in any spelling (``einsum``, ``bmm``);
* ``asked``: those the pipeline's rules asked to quantize (all but ``skip`` patterns and switched-off kinds);
* ``quantized``: those that run on quantized values (fake-quant or integer);
* ``integer``: those of them that run in integer arithmetic (materialized ``IntLinear`` / ``IntMatmul`` with a
  static or per-token input grid, a patchify ``IntConv2d``).

Every weight or matmul left in floating point is listed with its reason: the rule that asked for it
(``skip 'head'``, ``insert_quantizers.linear = false``) or ``not recognised`` with the op and the module path.
Linears and matmuls are what vitqc promises to quantize; convolutions other than patch embeddings run as float
convolutions of their dequantized integer weights (quantized, not integer).

:func:`check` (run by ``insert_quantizers``) prints one warning line when anything asked for is not recognised,
or raises :class:`~vitqc.errors.VitqcError` under ``strict``; :func:`report` (run by ``vitqc.compile`` after the
pipeline) stores the final figures in ``ctx.record["coverage"]`` and prints one summary line.
"""
from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from vitqc.errors import VitqcError
from vitqc.graph import get_attr_value, is_quantizer_node, owner_of

__all__ = ["Counts", "FloatLayer", "Coverage", "measure", "check", "report", "RULES_KEY", "opaque_weight_calls"]

RULES_KEY = "float"  # ctx.record["insert_quantizers"][RULES_KEY]: what the rules left in floating point

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class Counts:
    """Layers (or matmuls) and their weight elements: present, asked for, quantized, integer."""

    present: int = 0
    asked: int = 0
    quantized: int = 0
    integer: int = 0
    params: int = 0
    asked_params: int = 0
    quantized_params: int = 0

    def add(self, params: int, asked: bool, quantized: bool, integer: bool) -> None:
        self.present += 1
        self.params += params
        if asked:
            self.asked += 1
            self.asked_params += params
        if quantized:
            self.quantized += 1
            self.quantized_params += params
            self.integer += int(integer)

    @property
    def fraction(self) -> float:
        """Quantized share of the weight elements (of the matmuls, for matmuls); 1.0 when there are none."""
        if self.params:
            return self.quantized_params / self.params
        return self.quantized / self.present if self.present else 1.0


@dataclass
class FloatLayer:
    path: str
    kind: str  # "linear", "conv" or "matmul"
    params: int
    reason: str
    recognised: bool  # False: vitqc did not see it as something to quantize (not a rule's choice)


@dataclass
class Coverage:
    linear: Counts = field(default_factory=Counts)
    conv: Counts = field(default_factory=Counts)
    matmul: Counts = field(default_factory=Counts)
    float_layers: list[FloatLayer] = field(default_factory=list)

    @property
    def unrecognised(self) -> list[FloatLayer]:
        return [f for f in self.float_layers if not f.recognised]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["linear_fraction"] = self.linear.fraction
        out["unrecognised"] = len(self.unrecognised)
        return out

    def summary(self) -> str:
        """One line: linear and conv weights and attention matmuls, quantized of asked of present."""
        def part(name: str, c: Counts, weights: bool) -> str:
            if not c.present:
                return f"no {name}"
            share = f" ({c.quantized_params / c.params:.1%} of weights)" if weights and c.params else ""
            integer = f", {c.integer} integer" if c.integer != c.quantized else ""
            return f"{name} {c.quantized}/{c.present} quantized{share}{integer}" + (
                f" ({c.asked} asked)" if c.asked != c.present else "")

        text = "; ".join([part("linear layers", self.linear, True), part("convolutions", self.conv, True),
                          part("attention matmuls", self.matmul, False)])
        left = len(self.float_layers)
        return f"{text}; {left} left in floating point" + (f", {len(self.unrecognised)} not recognised"
                                                           if self.unrecognised else "")

    def unrecognised_line(self) -> str:
        """One line naming what was not recognised (the first few)."""
        items = self.unrecognised
        shown = "; ".join(f"{f.path} ({f.reason})" for f in items[:3])
        more = f"; +{len(items) - 3} more" if len(items) > 3 else ""
        params = sum(f.params for f in items if f.kind == "linear")
        share = f", {params / self.linear.params:.1%} of the linear weights" if params and self.linear.params else ""
        return f"{len(items)} layers/matmuls are not recognised and stay in floating point{share}: {shown}{more}"


# ---------------------------------------------------------------------------------------------- measuring
def _tensor(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            value = get_attr_value(gm, str(node.target))
        except AttributeError:
            return None
        return value if isinstance(value, torch.Tensor) else None
    return None


def _weight_sources(gm: fx.GraphModule, value: Any) -> list[str]:
    """get_attr paths of the weight matrices (>= 2 dims) that ``value`` is computed from, when it is computed
    from parameters and constants only (``W * mask``); [] for anything that depends on the input."""
    found, stack, seen = [], [value], set()
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            return []
        t = _tensor(gm, node)
        if t is not None:
            if t.dim() >= 2:
                found.append(str(node.target))
            continue
        stack.extend(node.all_input_nodes)
    return found


def _numel(gm: fx.GraphModule, sources: list[str]) -> int:
    """Weight elements of the parameters a weight is computed from."""
    return sum(int(get_attr_value(gm, s).numel()) for s in dict.fromkeys(sources))


def _is_activation(gm: fx.GraphModule, value: Any) -> bool:
    return isinstance(value, fx.Node) and _tensor(gm, value) is None


_LINEAR_FUNCTIONS = (torch.nn.functional.linear, torch._C._nn.linear)
_CONV_FUNCTIONS = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d,
                   torch.conv1d, torch.conv2d, torch.conv3d)
_MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm, torch.mm, torch.Tensor.matmul, torch.baddbmm,
                     torch.einsum)
_MATMUL_METHODS = ("matmul", "bmm", "mm", "baddbmm")


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}()"
    target = node.target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


_KNOWN_MODULES = ("torch", "_operator", "operator", "builtins", "math", "vitqc")


def opaque_weight_calls(gm: fx.GraphModule) -> list[tuple[fx.Node, list[str]]]:
    """Calls of functions fx kept whole (``torch.fx.wrap``, timm's no-trace functions) that are given a weight
    (a parameter named ``weight`` / ``*_weight`` of two or more dims): (node, weight paths). What such a function
    computes with them is invisible."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not callable(node.target):
            continue
        module = getattr(node.target, "__module__", None) or ""
        if module.split(".")[0] in _KNOWN_MODULES:
            continue
        weights = [str(a.target) for a in node.all_input_nodes
                   if a.op == "get_attr" and str(a.target).rpartition(".")[2].endswith("weight")
                   and (t := _tensor(gm, a)) is not None and t.dim() >= 2]
        if weights:
            found.append((node, weights))
    return found


def _rules(record: dict[str, Any] | None) -> dict[tuple[str, str], str]:
    """(path, kind) -> the rule that left it in floating point, from insert_quantizers' record."""
    rows = ((record or {}).get("insert_quantizers") or {}).get(RULES_KEY) or []
    return {(r["path"], r["kind"]): r["reason"] for r in rows}


def measure(gm: fx.GraphModule, record: dict[str, Any] | None = None) -> Coverage:
    """Coverage of ``gm`` (see the module docstring); ``record`` is the compile record (``ctx.record``) whose
    ``insert_quantizers`` entry says which layers the rules left in floating point."""
    from vitqc.quant.modules import IntConv2d, IntLinear, IntMatmul, QuantConv2d, QuantLinear
    from vitqc.quant.quantizer import UniformQuantizer

    rules = _rules(record)
    cov = Coverage()

    def left(path: str, kind: str, params: int, what: str) -> None:
        rule = rules.get((path, kind))
        counts = {"linear": cov.linear, "conv": cov.conv, "matmul": cov.matmul}[kind]
        counts.add(params, asked=rule is None, quantized=False, integer=False)
        cov.float_layers.append(FloatLayer(path, kind, params, rule or f"not recognised: {what}", rule is not None))

    opaque = {node: weights for node, weights in opaque_weight_calls(gm)}
    for node in gm.graph.nodes:
        if node in opaque:
            for weight in opaque[node]:
                value = get_attr_value(gm, weight)
                left(weight.rpartition(".")[0], "linear" if value.dim() == 2 else "conv", int(value.numel()),
                     f"its weight is passed to {_op_name(node)}(), which fx keeps whole")
            continue
        if node.op == "call_module":
            path = str(node.target)
            mod = gm.get_submodule(path)
            if isinstance(mod, (QuantLinear, IntLinear)):
                n = (mod.weight if isinstance(mod, QuantLinear) else mod.weight_codes).numel()
                cov.linear.add(n, True, True, isinstance(mod, IntLinear) and mod.integer_input)
            elif isinstance(mod, (QuantConv2d, IntConv2d)):
                n = (mod.weight if isinstance(mod, QuantConv2d) else mod.weight_codes).numel()
                cov.conv.add(n, True, True, isinstance(mod, IntConv2d) and mod.patchify)
            elif isinstance(mod, IntMatmul):
                sources = [w for a in node.args for w in _weight_sources(gm, a)]
                if sources:  # a weight in an activation matmul: quantized per tensor, not as a linear layer
                    left(path, "linear", _numel(gm, sources),
                         f"weight {sources[0]} applied as a matmul of activations (per-tensor grid)")
                else:
                    cov.matmul.add(0, True, True, True)
            elif isinstance(mod, nn.Linear):
                own = type(mod).forward is not nn.Linear.forward
                left(path, "linear", mod.weight.numel(),
                     f"{type(mod).__name__} call" + (" (a Linear with its own forward, kept whole)" if own else ""))
            elif isinstance(mod, _CONV_TYPES):
                left(path, "conv", mod.weight.numel(), f"{type(mod).__name__} has no quantized form")
            elif not isinstance(mod, UniformQuantizer):
                for sub_path, sub in mod.named_modules():
                    if isinstance(sub, (nn.Linear, *_CONV_TYPES)) and sub is not mod:
                        kind = "linear" if isinstance(sub, nn.Linear) else "conv"
                        left(f"{path}.{sub_path}", kind, sub.weight.numel(),
                             f"inside {type(mod).__name__} at {path}, kept whole as a leaf module")
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        owner = node.meta.get("vitqc_owner", owner_of(node))
        where = f"{owner}.{node.name}".strip(".")
        is_linear = node.op == "call_function" and node.target in _LINEAR_FUNCTIONS
        is_conv = node.op == "call_function" and node.target in _CONV_FUNCTIONS
        is_matmul = (node.op == "call_function" and node.target in _MATMUL_FUNCTIONS) or \
            (node.op == "call_method" and node.target in _MATMUL_METHODS)
        if is_linear or is_conv:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            sources = _weight_sources(gm, weight)
            if sources:
                kind = "linear" if is_linear else "conv"
                left(where, kind, _numel(gm, sources),
                     f"{_op_name(node)} with a weight from {', '.join(sources[:2])}")
            continue
        if not is_matmul:
            continue
        operands = [a for a in node.args if isinstance(a, fx.Node)]
        if node.target is torch.baddbmm or node.target == "baddbmm":
            operands = operands[1:]
        sources = [s for a in operands for s in _weight_sources(gm, a)]
        if sources:  # a parameter enters the product: a linear layer in disguise
            left(where, "linear", _numel(gm, sources), f"{_op_name(node)} with weight {sources[0]}")
            continue
        if not all(_is_activation(gm, a) for a in operands) or len(operands) < 2:
            continue
        both = node.target is operator.matmul and len(node.args) == 2 and \
            all(isinstance(a, fx.Node) and is_quantizer_node(gm, a) and gm.get_submodule(a.target).enabled
                for a in node.args)
        if both:
            cov.matmul.add(0, True, True, False)
        else:
            spelling = "" if node.target is operator.matmul else f"{_op_name(node)}: "
            left(where, "matmul", 0, f"{spelling}a matmul of two activations without quantized inputs")
    return cov


# ---------------------------------------------------------------------------------------------- reporting
def check(gm: fx.GraphModule, record: dict[str, Any], strict: bool, quiet: bool = False) -> Coverage:
    """What ``insert_quantizers`` left unrecognised: one warning line, or with ``strict`` a VitqcError."""
    cov = measure(gm, record)
    if cov.unrecognised:
        line = cov.unrecognised_line()
        if strict:
            raise VitqcError(f"--strict: {line}; quantize them by making the model use nn.Linear / matmul, or "
                             f"leave them out on purpose with insert_quantizers.skip")
        if not quiet:
            from vitqc.console import warn

            warn(f"{line} (--strict makes this an error)")
    return cov


def report(gm: fx.GraphModule, record: dict[str, Any], quiet: bool = False) -> Coverage:
    """The final coverage of a compiled graph, stored in ``record["coverage"]`` and printed in one line."""
    cov = measure(gm, record)
    record["coverage"] = cov.to_dict()
    if not quiet:
        from vitqc.console import err

        err.print(f"coverage: {cov.summary()}", markup=False, highlight=False, soft_wrap=True)
    return cov
