"""What every backend reads from a quantized ``torch.export`` program: its integer layers and their graph regions.

A backend starts from an artifact's ``quantized.pt2`` (or ``export_program`` of a materialized graph), finds
each integer layer by its state (``<path>.weight_codes`` ...) and the nodes whose ``nn_module_stack`` carries
``<path>`` (a :class:`Region`), replaces regions by its own modules, then calls :func:`finish` to drop what
they left dead. The packed and ExecuTorch backends both work this way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, fx, nn

from vitqc.errors import VitqcError
from vitqc.graph import get_attr_value
from vitqc.quant.intops import EPS as _EPS, act_codes, shift_for

__all__ = ["quantized_program", "integer_layers", "Region", "stack_paths", "is_tensor_node", "finish",
           "modules_by_type", "fold_constants", "CodesMatmul", "codes_matmul", "ActQuant", "ActBuffers", "act_quant", "Unsupported", "CLAMP", "ASSERTS"]

CLAMP = (torch.ops.aten.clamp.default,)
ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


def quantized_program(source: Any, example: Tensor | None = None) -> tuple[torch.export.ExportedProgram, dict[str, float], Tensor, dict[str, Any]]:
    """``(program, weight bits by layer path, example input, manifest)`` for an Artifact, a path to one, a
    materialized GraphModule (exported here) or an ExportedProgram of one."""
    from vitqc.artifact import Artifact, export_program, load_artifact
    from vitqc.quant.modules import INT_LAYERS, QUANT_LAYERS

    if isinstance(source, (str, Path)):
        source = load_artifact(source)
    if isinstance(source, Artifact):
        manifest = source.manifest
        bits = {l["path"]: l["weight_bits"] for l in manifest.get("layers", []) if l.get("weight_bits") is not None}
        shape = manifest.get("input_shape")
        if example is None:
            if not shape:
                raise VitqcError(f"{source.path}: the manifest has no input_shape; pass an example input")
            example = torch.zeros(1, *shape)
        return source.quantized_program, bits, example, manifest
    if isinstance(source, torch.export.ExportedProgram):
        if example is None:
            example = _example_from_program(source)
        return source, {}, example, {}
    if isinstance(source, nn.Module):
        if any(isinstance(m, QUANT_LAYERS) for m in source.modules()):
            raise VitqcError("the graph still has fake-quant layers with FP weights: run the 'materialize' pass "
                             "(end the pipeline with materialize) before lowering")
        if not any(isinstance(m, INT_LAYERS) for m in source.modules()):
            raise VitqcError("the model has no integer layers (IntLinear/IntConv2d): compile it with a quantizing "
                             "pipeline such as minmax-w8a8 first")
        bits = {name: m.weight_bits for name, m in source.named_modules() if isinstance(m, INT_LAYERS)}
        if example is None:
            example = _example_from_graph(source)
        return export_program(source, example), bits, example, dict(getattr(source, "meta", {}).get("vitqc", {}))
    raise VitqcError(f"cannot lower a {type(source).__name__}: give an artifact, a materialized GraphModule or "
                     "an ExportedProgram")


def _example_from_graph(gm: nn.Module) -> Tensor:
    if isinstance(gm, fx.GraphModule):
        for node in gm.graph.nodes:
            if node.op == "placeholder" and "tensor_meta" in node.meta:
                return torch.zeros(1, *node.meta["tensor_meta"].shape[1:])
    raise VitqcError("pass an example input (the graph records no input shape)")


def _example_from_program(ep: torch.export.ExportedProgram) -> Tensor:
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name not in ep.graph_signature.inputs_to_parameters \
                and node.name not in ep.graph_signature.inputs_to_buffers \
                and node.name not in ep.graph_signature.inputs_to_lifted_tensor_constants:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                return torch.zeros(1, *[int(d) for d in val.shape[1:]], dtype=val.dtype)
    raise VitqcError("pass an example input (the program records no input shape)")


def stack_paths(node: fx.Node) -> set[str]:
    return {v[0] for v in node.meta.get("nn_module_stack", {}).values() if isinstance(v, tuple)}


def is_tensor_node(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


@dataclass
class Region:
    path: str
    nodes: list[fx.Node]
    node_set: set[fx.Node] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.node_set = set(self.nodes)

    def tensor_inputs(self) -> list[fx.Node]:
        seen: list[fx.Node] = []
        for n in self.nodes:
            for m in n.all_input_nodes:
                if m not in self.node_set and m.op != "get_attr" and is_tensor_node(m) and m not in seen:
                    seen.append(m)
        return seen

    def tensor_outputs(self) -> list[fx.Node]:
        return [n for n in self.nodes if is_tensor_node(n) and any(u not in self.node_set for u in n.users)]

    def clamp_bounds(self, start: fx.Node | None = None) -> set[tuple[int, int]]:
        """The integer bounds of the region's clamps (those downstream of ``start`` when given: one operand's)."""
        out = set()
        for n in (self.nodes if start is None else self.downstream(start)):
            if n.op == "call_function" and n.target in CLAMP and len(n.args) >= 3 \
                    and isinstance(n.args[1], int) and isinstance(n.args[2], int):
                out.add((n.args[1], n.args[2]))
        return out

    def downstream(self, start: fx.Node) -> list[fx.Node]:
        """The region's nodes that depend on ``start``."""
        seen: set[fx.Node] = set()
        todo = [u for u in start.users if u in self.node_set]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(u for u in n.users if u in self.node_set)
        return [n for n in self.nodes if n in seen]

    def find(self, target: Any) -> list[fx.Node]:
        return [n for n in self.nodes if n.op == "call_function" and n.target == target]


def integer_layers(source: Any, example: Tensor | None = None):
    """The quantized program of ``source`` with what every backend reads from it: its state (parameters and
    constants), the unlifted graph module, the paths of the integer weight layers, and the graph region of
    each weight layer and activation quantizer."""
    program, bits_hint, example, manifest = quantized_program(source, example)
    state: dict[str, Tensor] = {**program.state_dict, **program.constants}
    gm = program.module()
    weight_paths = sorted(k[: -len(".weight_codes")] for k in state if k.endswith(".weight_codes"))
    quant_paths = sorted(k[: -len(".initialized")] for k in state if k.endswith(".initialized"))
    if not weight_paths:
        raise VitqcError("the program has no integer weight codes (<layer>.weight_codes): not a materialized model")
    return (program, bits_hint, example, manifest, state, gm, weight_paths, quant_paths,
            regions_of(gm, weight_paths + quant_paths))


def regions_of(gm: fx.GraphModule, paths: list[str]) -> dict[str, Region]:
    wanted = set(paths)
    found: dict[str, list[fx.Node]] = {p: [] for p in paths}
    for node in gm.graph.nodes:
        for p in stack_paths(node) & wanted:
            found[p].append(node)
    return {p: Region(p, nodes) for p, nodes in found.items() if nodes}


def finish(gm: fx.GraphModule) -> None:
    """Remove what the replaced regions left dead, then put the packed modules at their paths.

    The unlifted program holds a layer's tensors on a plain module at the layer's path; the packed module
    takes its place, so the region's ``get_attr`` nodes must be gone first (fx's own dead-code pass lints the
    graph, which would fail on them: hence this loop).
    """
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.op in ("placeholder", "output") or node.users:
                continue
            subject = node.args[0] if node.args else None
            dead_assert = node.op == "call_function" and node.target in ASSERTS and isinstance(subject, fx.Node) \
                and all(u.target in ASSERTS for u in subject.users)
            if dead_assert or (node.op != "call_module" and not node.is_impure()):
                gm.graph.erase_node(node)
                changed = True
    for target, module in gm.meta.pop("vitqc_pending", []):
        gm.add_submodule(target, module)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def fold_constants(gm: fx.GraphModule, where: Callable[[fx.Node], bool] = lambda node: True) -> fx.GraphModule:
    """Evaluate, once, every pure node (``where`` it holds) whose inputs are all stored tensors or folded nodes,
    and store each result that a non-folded node reads as a buffer (``_folded_<name>``, not saved in a state
    dict). ``gm.meta["vitqc_folded"]``: how many buffers."""
    const: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            const[node] = get_attr_value(gm, str(node.target))
        elif node.op == "call_function" and node.target not in ASSERTS and not node.is_impure() and where(node) \
                and node.all_input_nodes and all(m in const for m in node.all_input_nodes) and is_tensor_node(node):
            args = fx.node.map_arg(node.args, lambda m: const[m])
            kwargs = fx.node.map_arg(node.kwargs, lambda m: const[m])
            const[node] = node.target(*args, **kwargs)
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node not in const:
            continue
        if all(u in const for u in node.users):
            continue  # an inner node of a constant subgraph: its users are folded instead
        name = f"_folded_{node.name}"
        value = const[node]
        # a broadcast (zero-stride) result is stored dense; other views (a weight's transpose) are kept as they are
        gm.register_buffer(name, value.contiguous() if 0 in value.stride() else value, persistent=False)
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        folded += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.meta["vitqc_folded"] = folded
    return gm


def modules_by_type(gm: fx.GraphModule, type_names: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(path, qualified type)`` of every module of one of ``type_names`` that graph nodes were traced in."""
    out = set()
    for node in gm.graph.nodes:
        for v in node.meta.get("nn_module_stack", {}).values():
            if isinstance(v, tuple) and isinstance(v[1], str) and v[1].rsplit(".", 1)[-1] in type_names:
                out.add((v[0], v[1]))
    return sorted(out)


# ----------------------------------------------------------------------------------------------- activation quantizers

@dataclass
class ActQuant:
    """An activation quantizer as the program computes it: static per-tensor (``scale``/``zero_point``,
    0-d) or dynamic per-token (``clip_ratio``), on the integer grid ``[qmin, qmax]``."""

    granularity: str
    qmin: int
    qmax: int
    scale: Tensor | None = None
    zero_point: Tensor | None = None
    clip_ratio: Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.qmin < 0  # UniformQuantizer: asymmetric grids start at 0, symmetric ones below 0

    def describe(self) -> dict[str, Any]:
        return describe_grid(self)


def describe_grid(q: Any) -> dict[str, Any]:
    """An activation grid (an :class:`ActQuant` or :class:`ActBuffers`) as a manifest entry."""
    bits = 1.58 if (q.qmin, q.qmax) == (-1, 1) else (q.qmax - q.qmin + 1).bit_length() - 1
    return {"granularity": q.granularity, "qmin": q.qmin, "qmax": q.qmax, "bits": bits, "symmetric": q.symmetric}


class ActBuffers(nn.Module):
    """Holds one activation quantizer's constants as buffers (exported with the program)."""

    def __init__(self, q: ActQuant) -> None:
        super().__init__()
        self.granularity, self.qmin, self.qmax, self.symmetric = q.granularity, q.qmin, q.qmax, q.symmetric
        if q.granularity == "tensor":
            assert q.scale is not None and q.zero_point is not None
            self.register_buffer("scale", q.scale.detach().float().reshape(()).clamp_min(_EPS).clone())
            z = q.zero_point.detach().float().reshape(())
            z = torch.zeros(()) if q.symmetric else torch.clamp(z.round(), q.qmin, q.qmax)
            self.register_buffer("zero_point", z.clone())
            self.centred_bounds = (float(q.qmin - z), float(q.qmax - z))
        else:
            assert q.clip_ratio is not None
            self.register_buffer("clip_ratio", q.clip_ratio.detach().float().reshape(()).clamp_min(_EPS).clone())

    def codes(self, x: Tensor, shift: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """The shared integer kernels' codes (:func:`vitqc.quant.intops.act_codes`), from these constants."""
        if self.granularity == "tensor":
            return act_codes(x, granularity="tensor", qmin=self.qmin, qmax=self.qmax, symmetric=self.symmetric,
                             scale=self.scale, zero_point=self.zero_point, shift=shift)
        return act_codes(x, granularity="token", qmin=self.qmin, qmax=self.qmax, symmetric=self.symmetric,
                         clip_ratio=self.clip_ratio, shift=shift)

    @property
    def zero_free(self) -> bool:
        """The centered codes need no zero-point correction (symmetric grid that fits int8 unshifted)."""
        return self.symmetric and self.qmax <= 127

    def centred_codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(q - z, s)``: the codes :func:`vitqc.quant.intops.integer_matmul` multiplies, the same integers. Per
        tensor in three ops, ``clamp(round(x / s), qmin - z, qmax - z)`` (equal to ``clamp(round(x / s) + z, qmin,
        qmax) - z``: integers in float are exact, and beyond the grid both saturate)."""
        if self.granularity == "tensor":
            return torch.clamp(torch.round(x / self.scale), *self.centred_bounds), self.scale
        q, s, z = self.codes(x)
        return (q if self.zero_free else q - z), s


def act_quant(state: dict[str, Tensor], prefix: str, region: Region, operand: fx.Node | None = None) -> ActQuant | None:
    """The activation quantizer stored at ``prefix`` as the program computes it, or None if it does nothing
    (``operand``: the region's input it quantizes, where the region quantizes two)."""
    bounds = region.clamp_bounds(operand)
    if not bounds:
        return None
    if len(bounds) == 2:  # an integer layer clamps the zero point to the grid and the codes to it shifted into int8
        (lo_a, hi_a), (lo_b, hi_b) = sorted(bounds)
        if (lo_b - lo_a, hi_b - hi_a) == (shift_for(hi_b),) * 2:
            bounds = {(lo_b, hi_b)}
    if len(bounds) != 1:
        raise Unsupported(f"several integer grids {sorted(bounds)} in one quantizer region")
    qmin, qmax = next(iter(bounds))
    if f"{prefix}.clip_ratio" in state:
        return ActQuant("token", qmin, qmax, clip_ratio=state[f"{prefix}.clip_ratio"])
    scale = state.get(f"{prefix}.scale")
    if scale is None:
        raise Unsupported(f"no scale or clip_ratio under {prefix}")
    if scale.numel() != 1:
        raise Unsupported("per-channel activation quantizer (no integer kernel for it)")
    return ActQuant("tensor", qmin, qmax, scale=scale, zero_point=state.get(f"{prefix}.zero_point", torch.zeros(())))


class Unsupported(Exception):
    """A region a backend cannot take over (the packed backend leaves it as the source program runs it)."""


class CodesMatmul(nn.Module):
    """An attention matmul (``IntMatmul``) as the source computes it, ``Q(a) @ Q(b)`` on centred integer codes
    (:func:`vitqc.quant.intops.integer_matmul`), each static operand's codes in three elementwise ops instead of
    five (:meth:`ActBuffers.centred_codes`: the same integers, so the same result to the last bit)."""

    def __init__(self, lhs: ActQuant, rhs: ActQuant) -> None:
        super().__init__()
        self.lhs, self.rhs = ActBuffers(lhs), ActBuffers(rhs)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        ca, sa = self.lhs.centred_codes(a)
        cb, sb = self.rhs.centred_codes(b)
        if self.rhs.granularity == "token":
            return torch.matmul(ca, cb * sb) * sa
        return torch.matmul(ca, cb) * (sa * sb)


def codes_matmul(state: dict[str, Tensor], region: Region, path: str) -> tuple[CodesMatmul, list[fx.Node], fx.Node]:
    """The :class:`CodesMatmul` for the ``IntMatmul`` region at ``path``, with the region's two inputs (in call
    order) and its output; :class:`Unsupported` if the region is not that."""
    inputs, outputs = region.tensor_inputs(), region.tensor_outputs()
    if len(inputs) != 2 or len(outputs) != 1:
        raise Unsupported(f"expected two tensors in and one out, found {len(inputs)} in / {len(outputs)} out")
    lhs, rhs = (act_quant(state, f"{path}.{side}", region, operand) for side, operand in zip(("lhs", "rhs"), inputs))
    if lhs is None or rhs is None:
        raise Unsupported("an operand without an integer grid")
    return CodesMatmul(lhs, rhs), inputs, outputs[0]
