"""insert_quantizers: put fake-quantizers on every op that will run in low precision.

Rules by op kind (each can be switched off):
* ``nn.Linear`` -> ``QuantLinear``: per-channel weight quantizer + quantizer on its input;
* ``nn.Conv2d`` (the patch embedding) -> ``QuantConv2d``: same, its input is the image;
* the two attention matmuls (``q @ k^T`` and ``attn @ v``, any ``matmul`` between two activations): a
  quantizer on each input that is not already quantized;
* softmax output: its own quantizer (``softmax_bits``), which also serves as the ``attn @ v`` input.

``keep`` gives other bit widths to named parts (``{"head" = 8, "patch_embed" = 8}``: a module path or glob,
matching the path itself or anything under it); ``skip`` leaves named parts in floating point. A pattern that
matches no module of the graph but names a role applies to that role's layers, so the built-in pipelines keep
the classifier and the patch embedding of any architecture at their width (a transformers ``classifier``,
``embeddings.patch_embeddings.projection``): ``head`` = the weight layers whose output reaches the model's
output through no other weight layer or norm, ``patch_embed`` = those that the input image reaches through no
other weight layer. Only ``nn.Linear`` / ``nn.Conv2d`` calls whose forward is torch's own are wrapped (a
subclass with its own forward would compute something else once wrapped).

Every weight layer or matmul a rule leaves in floating point is recorded with the rule
(``record["insert_quantizers"]["float"]``); anything the graph holds that is not recognised at all is reported
by :func:`vitqc.coverage.check`: one warning line, an error under ``strict``.
Quantizers start uninitialised: ``calibrate`` (or a later pass) sets their ranges.
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal

from torch import fx, nn

from vitqc.coverage import RULES_KEY, check as check_coverage
from vitqc.errors import VitqcError
from vitqc.layers import Layer, LayerTable
from vitqc.graph import insert_after, insert_before_use, is_quantizer_node, owner_of, reads_shape_only, replace_submodule
from vitqc.passes.base import CompileContext, PassResult, VitqcPass, graph_property, register_pass
from vitqc.passes.properties import MATMUL_FUNCTIONS, SOFTMAX_FUNCTIONS
from vitqc.quant.modules import INT_LAYERS, QUANT_LAYERS, QuantConv2d, QuantLinear
from vitqc.quant.quantizer import TERNARY_BITS, VALID_BITS, UniformQuantizer


def quantizers(gm: nn.Module) -> dict[str, UniformQuantizer]:
    return {name: m for name, m in gm.named_modules() if isinstance(m, UniformQuantizer)}


@contextlib.contextmanager
def bypassed(qs: Iterable[UniformQuantizer]) -> Iterator[None]:
    """Let ``qs`` pass their input through (FP) inside the block; each gets its own setting back after."""
    qs = list(qs)
    saved = [q.enabled for q in qs]
    for q in qs:
        q.enabled = False
    try:
        yield
    finally:
        for q, enabled in zip(qs, saved):
            q.enabled = enabled


@graph_property("quantized")
def is_quantized(gm: fx.GraphModule) -> bool:
    """Fake-quantizers have been inserted (at least one quantized layer)."""
    return any(isinstance(m, QUANT_LAYERS + INT_LAYERS) for m in gm.modules())


def is_softmax(node: fx.Node) -> bool:
    """Softmax in any form (canonicalize with normalize_ops=false leaves F.softmax/torch.softmax as they are)."""
    return ((node.op == "call_method" and node.target == "softmax")
            or (node.op == "call_function" and node.target in SOFTMAX_FUNCTIONS))


def is_activation_matmul(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in MATMUL_FUNCTIONS


def _owner(node: fx.Node) -> str:
    """Module path that owns ``node`` (``blocks.0.attn`` for its matmuls), '' for the top level."""
    return node.meta.get("vitqc_owner", owner_of(node))


def _matches(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern) or path.startswith(pattern + ".") or fnmatch.fnmatchcase(
        path, pattern + ".*")


def _exact_layer(mod: nn.Module, cls: type[nn.Module]) -> bool:
    """``mod`` is a ``cls`` whose forward is ``cls``'s own (what the quantized layer reimplements)."""
    return isinstance(mod, cls) and type(mod).forward is cls.forward


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)
ROLES = ("head", "patch_embed")


def role_layers(gm: fx.GraphModule) -> dict[str, set[str]]:
    """``head``: weight layers whose output reaches the graph output through no other weight layer or norm;
    ``patch_embed``: weight layers the input reaches through no other weight layer (see the module doc)."""
    def module(node: fx.Node) -> nn.Module | None:
        return gm.get_submodule(node.target) if node.op == "call_module" else None

    def is_weight(node: fx.Node) -> bool:
        return isinstance(module(node), (nn.Linear, nn.Conv2d))

    def reach(starts: list[fx.Node], barrier: Callable[[fx.Node], bool]) -> set[fx.Node]:
        """Nodes reached from ``starts`` along data uses, not past a node where ``barrier`` holds."""
        seen, frontier = set(starts), list(starts)
        while frontier:
            for user in frontier.pop().users:
                if user not in seen and not reads_shape_only(user):
                    seen.add(user)
                    if not barrier(user):
                        frontier.append(user)
        return seen

    def layer_or_norm(node: fx.Node) -> bool:
        return is_weight(node) or isinstance(module(node), _NORMS)

    weights = [n for n in gm.graph.nodes if is_weight(n)]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {"head": {str(n.target) for n in weights if any(u.op == "output" for u in reach([n], layer_or_norm))},
            "patch_embed": {str(n.target) for n in reach(placeholders, is_weight) if is_weight(n)}}


@dataclass
class InsertQuantizersOptions:
    weight_bits: float = 8
    act_bits: float = 8
    softmax_bits: float | None = None  # None: same as act_bits
    weight_granularity: Literal["channel", "tensor"] = "channel"
    weight_symmetric: bool = True
    act_granularity: Literal["tensor", "token"] = "tensor"
    act_symmetric: bool = False
    linear: bool = True
    conv: bool = True
    attention_matmuls: bool = True
    softmax: bool = True
    keep: dict[str, float] = field(default_factory=dict)  # path/glob -> bits for weights and activations
    skip: list[str] = field(default_factory=list)  # path/glob left in floating point

    def __post_init__(self) -> None:
        named = {"weight_bits": self.weight_bits, "act_bits": self.act_bits, "softmax_bits": self.softmax_bits,
                 **{f"keep.{k}": v for k, v in self.keep.items()}}
        for key, bits in named.items():
            if bits is not None and float(bits) not in VALID_BITS:
                raise VitqcError(f"insert_quantizers.{key} must be one of {', '.join(map(str, VALID_BITS))} "
                                 f"(1.58 = ternary), not {bits}")
        if not self.act_symmetric and TERNARY_BITS in (self.act_bits, self.softmax_bits, *self.keep.values()):
            raise VitqcError("insert_quantizers: ternary (1.58-bit) activations are symmetric only: "
                             "set insert_quantizers.act_symmetric=true")


@register_pass
class InsertQuantizers(VitqcPass):
    name = "insert_quantizers"
    summary = "fake-quantize linear/conv weights and inputs, attention matmul inputs and softmax output"
    Options = InsertQuantizersOptions
    requires = ("canonical",)
    ensures = ("quantized",)
    _role_patterns: dict[str, set[str]] = {}  # set per call by _resolve_roles

    def _pattern_hits(self, path: str, pattern: str) -> bool:
        if pattern in self._role_patterns:
            return path in self._role_patterns[pattern]
        return _matches(path, pattern)

    def _rule(self, path: str) -> tuple[str, float | None] | None:
        """The rule that decides ``path``: (``skip 'p'``, None) or (``keep 'p'``, bits); None if none does."""
        for pattern in self.options.skip:
            if self._pattern_hits(path, pattern):
                return f"insert_quantizers.skip {pattern!r}", None
        for pattern, bits in self.options.keep.items():
            if self._pattern_hits(path, pattern):
                return f"insert_quantizers.keep {pattern!r}", bits
        return None

    def _bits_for(self, path: str, default: float) -> float | None:
        rule = self._rule(path)
        return default if rule is None else rule[1]

    def _resolve_roles(self, gm: fx.GraphModule) -> dict[str, list[str]]:
        """Patterns that match no module path of ``gm`` but name a role: the role's layers."""
        o = self.options
        paths = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"} | \
            {_owner(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
        wanted = [p for p in (*o.skip, *o.keep) if p in ROLES and not any(_matches(q, p) for q in paths if q)]
        self._role_patterns: dict[str, set[str]] = {}
        if wanted:
            roles = role_layers(gm)
            self._role_patterns = {p: roles[p] for p in wanted}
        return {p: sorted(v) for p, v in self._role_patterns.items()}

    def _act_quantizer(self, bits: float, granularity: str | None = None, symmetric: bool | None = None) -> UniformQuantizer:
        o = self.options
        return UniformQuantizer(bits=bits, symmetric=o.act_symmetric if symmetric is None else symmetric,
                                granularity=granularity or o.act_granularity)

    def call(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        o = self.options
        layers: list[Layer] = []
        left_float: list[dict] = []  # what the rules leave in floating point, and which rule
        roles = self._resolve_roles(gm)
        modified = False
        for node in list(gm.graph.nodes):
            if node.op == "call_module":
                mod = gm.get_submodule(node.target)
                path = str(node.target)
                kind = "linear" if _exact_layer(mod, nn.Linear) else "conv" if _exact_layer(mod, nn.Conv2d) else None
                if kind is None:
                    continue
                if not (o.linear if kind == "linear" else o.conv):
                    left_float.append({"path": path, "kind": kind, "reason": f"insert_quantizers.{kind} = false"})
                    continue
                wrapped_cls = QuantLinear if kind == "linear" else QuantConv2d
                rule = self._rule(path)
                bits = o.weight_bits if rule is None else rule[1]
                act_bits = o.act_bits if rule is None else rule[1]
                if bits is None:
                    left_float.append({"path": path, "kind": kind, "reason": rule[0]})
                    continue
                # The patch-embedding conv sees the image: its input gets a per-tensor quantizer.
                granularity = "tensor" if wrapped_cls is QuantConv2d else None
                wq = UniformQuantizer(bits=bits, symmetric=o.weight_symmetric, granularity=o.weight_granularity,
                                      ch_axis=0)
                iq = None if act_bits is None else self._act_quantizer(act_bits, granularity)
                replace_submodule(gm, path, wrapped_cls(mod, wq, iq))
                layers.append(Layer(path, wrapped_cls.__name__, bits, act_bits, mod.weight.numel()))
                modified = True
        for node in list(gm.graph.nodes):
            if is_softmax(node) and o.softmax:
                owner = _owner(node)
                bits = self._bits_for(owner or "softmax", o.softmax_bits or o.act_bits)
                if bits is None:
                    continue
                # Softmax outputs lie in [0, 1]: an unsigned (asymmetric) per-tensor grid fits them.
                q = self._act_quantizer(bits, granularity="tensor" if o.act_granularity == "tensor" else "token",
                                        symmetric=False)
                insert_after(gm, node, q, f"{owner + '.' if owner else ''}{node.name}_quantizer")
                layers.append(Layer(f"{owner}.{node.name}".strip("."), "softmax", act_bits=bits))
                modified = True
        for node in list(gm.graph.nodes):
            if is_activation_matmul(node):
                owner = _owner(node)
                where = f"{owner}.{node.name}".strip(".")
                rule = self._rule(owner or node.name)
                bits = o.act_bits if rule is None else rule[1]
                if not o.attention_matmuls or bits is None:
                    reason = rule[0] if o.attention_matmuls else "insert_quantizers.attention_matmuls = false"
                    left_float.append({"path": where, "kind": "matmul", "reason": reason})
                    continue
                for side, arg in zip(("lhs", "rhs"), node.args[:2]):
                    if not isinstance(arg, fx.Node) or is_quantizer_node(gm, arg):
                        continue
                    q = self._act_quantizer(bits)
                    insert_before_use(gm, node, arg, q, f"{owner + '.' if owner else ''}{node.name}_{side}_quantizer")
                layers.append(Layer(where, "matmul", act_bits=bits))
                modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        ctx.layers = LayerTable(layers)  # the table the artifact stores (later passes may change widths in it)
        ctx.record[self.name] = {"layers": len(layers), "quantizers": len(quantizers(gm)), RULES_KEY: left_float}
        if roles:
            ctx.record[self.name]["roles"] = roles
        check_coverage(gm, ctx.record, strict=ctx.strict, quiet=ctx.quiet)
        return PassResult(gm, modified)
