"""The packed backend: integer kernels over bit-packed weights, lowered from vitqc's quantized program.

One code path. The input is always a ``torch.export`` program of a materialized graph: an artifact's
``quantized.pt2`` as it is, or ``export_program(gm)`` for a graph from ``vitqc.compile`` (done here). In
that program every integer layer is found by its state (``<path>.weight_codes``, ``.weight_scale``,
``.weight_zero_point``, ``.bias``, ``.input_quantizer.{scale,zero_point,clip_ratio}``) and the nodes that
carry ``<path>`` in their ``nn_module_stack`` (:mod:`vitqc.backends.program`); the activation grid
``[qmin, qmax]`` is read from that region's integer-bounded ``clamp`` (an asymmetric 8-bit grid appears twice:
as itself on the zero point and shifted into int8 on the codes). Every quantizer likewise
(``<path>.initialized``). The region is replaced by one module call and the graph re-exported, so the result
is again a ``torch.export`` program (saved as JSON + safetensors by :mod:`vitqc.archive`: nothing in the file runs).

What runs: the integer kernels of :mod:`vitqc.quant.intops`, the very functions the source program's
``IntLinear`` / ``IntConv2d`` / ``IntMatmul`` call, so the packed model is bit-identical to the artifact's
program (same activation codes from the same float ops, exact integer accumulation, the same rescale):

* ``PackedLinear`` (each ``IntLinear``): activation codes (shifted to int8 when the grid is [0, 255]) times
  the unpacked int8 weight codes by ``torch._int_mm`` (int32 accumulation; any M/K/N on CPU), then
  ``acc * (s_x * s_w[n]) + bias`` with zero points folded exactly (``integer_linear``). Static per-tensor or
  dynamic per-token activations, as the program says. Layers without an input quantizer (weight-only)
  dequantize the unpacked codes and run ``F.linear`` in float, as the source does.
* weights are stored packed (:mod:`vitqc.backends.packing`): 8-bit as int8, 2..7-bit as dense b-bit fields,
  ternary as 2 bits or 5 trits a byte (``ternary="2bit"|"base3"``); the forward unpacks them to int8 each call
  (``unpack="call"``) or :func:`fold_unpack` does it once at load (``unpack="load"``: int8 in memory, packed
  on disk).
* ``PackedPatchConv`` (an ``IntConv2d`` whose stride equals its kernel, no padding/dilation/groups, i.e. a
  ViT patch embedding): patches of the image codes through the same int8 GEMM. Other convolutions keep the
  source's form (int8 codes, float conv) and are listed as not lowered.
* the attention matmuls (each ``IntMatmul``): :class:`vitqc.backends.program.CodesMatmul`, the source's fp32 GEMM
  of centred integer codes (exact below 2^24; PyTorch has no batched int8 GEMM on CPU), each static operand's
  codes computed in three elementwise ops instead of the source's five: the same integers, so the same result.

Speed: the eager program runs every quantize/dequantize as separate elementwise ops; ``unpack="load"`` (the
default) keeps the unpacked int8 weights in memory. ``packed.module(compile=True)`` (inductor) fuses the
elementwise ops around the int8 GEMMs and is faster still, but it also generates its own LayerNorm, softmax,
GELU and rescale code, whose float rounding differs from the artifact's: its output is the artifact's up to
float rounding, not bit for bit, so it is not the default (benchmarks/backend_latency.py --compile).

CUDA: lower a materialized graph that is on the GPU, with an example input there (``torch.export`` records
the device's kernels); the int8 GEMMs are then ``torch._int_mm`` with the operands zero-padded to the shapes
CUDA's kernel takes (``padded_int_mm``). On a GPU the eager packed program is slower than bf16 eager
(benchmarks/results/backend_latency-cuda.json): every quantize / unpack / dequantize is a kernel launch of its own,
and at these sizes launches, not GEMMs, set the time. Fusing them (Triton, or torch.compile) is not done.

Not done: no Triton kernels, no int8 kernel for
the attention matmuls (fp32 GEMM of integer codes, see above), per-channel activation quantizers and
non-patchify convolutions stay as the source program runs them (listed in the manifest's ``not_lowered``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from vitqc.archive import member_reader, open_archive, program_members, read_manifest, read_program, write_archive
from vitqc.backends import packing, register_backend
from vitqc.backends.program import ASSERTS, ActBuffers, ActQuant, Region, Unsupported, act_quant, codes_matmul, \
    describe_grid, finish, fold_constants, integer_layers, modules_by_type, quantized_program, regions_of, stack_paths
from vitqc.errors import VitqcError
from vitqc.quant.intops import integer_linear, patches
from vitqc.quant.rational_gelu import fast_rational_gelus

__all__ = ["ActQuant", "PackedLinear", "PackedPatchConv", "PackedProgram", "lower_packed",
           "save_packed", "load_packed", "fold_unpack", "quantized_program", "PACKED_FORMAT"]

PACKED_FORMAT = "vitqc-packed/2"
TERNARY_BITS = 1.58


# ----------------------------------------------------------------------------------------------- weights

@dataclass
class _WeightLayout:
    """How integer weight codes ``c`` are stored: ``u = c + store_offset`` packed in ``fmt``; the kernel
    multiplies ``r = u - runtime_offset`` (int8) and ``zero_point`` (per channel) is in ``r`` units."""

    fmt: str  # "int8" | "bits2".."bits7" | "trit5"
    bits: float
    store_offset: int
    runtime_offset: int

    def pack(self, codes: Tensor) -> Tensor:
        c = codes.to(torch.int16)
        if self.fmt == "int8":
            return (c + self.store_offset - self.runtime_offset).to(torch.int8).contiguous()
        u = (c + self.store_offset).to(torch.uint8)
        if self.fmt == "trit5":
            return packing.pack_trits(u)
        return packing.pack_bits(u, int(self.fmt[4:]))

    def unpack(self, packed: Tensor, k: int) -> Tensor:
        """int8 ``r`` codes ``[N, K]``."""
        if self.fmt == "int8":
            return packed
        u = packing.unpack_trits(packed, k) if self.fmt == "trit5" else packing.unpack_bits(packed, int(self.fmt[4:]), k)
        r = u.view(torch.int8)  # u < 128 for every format below 8 bits
        return r - self.runtime_offset if self.runtime_offset else r


def _weight_layout(codes: Tensor, bits_hint: float | None, ternary: str, path: str) -> _WeightLayout:
    lo, hi = int(codes.min()), int(codes.max())
    if bits_hint is not None and float(bits_hint) == TERNARY_BITS:
        if lo < -1 or hi > 1:
            raise VitqcError(f"{path}: declared ternary but its codes span [{lo}, {hi}]; recompile the artifact")
        return _WeightLayout("trit5" if ternary == "base3" else "bits2", TERNARY_BITS, 1, 1)
    signed = lo < 0
    fits = (lambda b: -(1 << (b - 1)) <= lo and hi <= (1 << (b - 1)) - 1) if signed else (lambda b: hi <= (1 << b) - 1)
    if bits_hint is not None:
        bits = int(bits_hint)
        if not 2 <= bits <= 8 or not fits(bits):
            raise VitqcError(f"{path}: declared {bits_hint}-bit weights but its codes span [{lo}, {hi}]")
    else:
        bits = next((b for b in range(2, 9) if fits(b)), 0)
        if not bits:
            raise VitqcError(f"{path}: weight codes span [{lo}, {hi}], wider than 8 bits; nothing to pack")
    half = 1 << (bits - 1)
    store = half if signed else 0
    return _WeightLayout("int8" if bits == 8 else f"bits{bits}", float(bits), store, half)


class _PackedWeightMixin:
    """Packed integer weights ``[N, K]`` + per-channel scale/zero point, shared by linear and patch conv."""

    weight_packed: Tensor
    weight_scale: Tensor
    weight_zero_point: Tensor
    weight_sum: Tensor
    layout: _WeightLayout
    in_features: int
    out_features: int

    def _init_weight(self, codes: Tensor, scale: Tensor, zero_point: Tensor, layout: _WeightLayout) -> None:
        n, k = codes.shape
        self.in_features, self.out_features, self.layout = k, n, layout
        self.register_buffer("weight_packed", layout.pack(codes))
        r = layout.unpack(self.weight_packed, k)
        c = codes.to(torch.int32)
        if not torch.equal(r.to(torch.int32) + layout.runtime_offset - layout.store_offset, c):
            raise AssertionError("packing round trip failed")  # a bug, not a user error
        zp = zero_point.detach().reshape(n).round().to(torch.int32) + layout.store_offset - layout.runtime_offset
        self.has_weight_zero_point = bool((zp != 0).any())
        self.register_buffer("weight_scale", scale.detach().float().reshape(n).clone())
        # symmetric weights (the usual case) store no zero point
        self.register_buffer("weight_zero_point", zp if self.has_weight_zero_point else None)
        # colsum(R) - K * zw: multiplies the activation zero point (see the module docstring)
        self.register_buffer("weight_sum", r.to(torch.int32).sum(1) - k * zp)

    def weight_int8(self) -> Tensor:
        return self.layout.unpack(self.weight_packed, self.in_features)

    def dequantized_weight(self) -> Tensor:
        w = self.weight_int8().to(torch.float32)
        if self.weight_zero_point is not None:
            w = w - self.weight_zero_point.unsqueeze(1)
        return w * self.weight_scale.unsqueeze(1)

    def _int_gemm(self, x2: Tensor, act: ActBuffers, bias: Tensor | None) -> Tensor:
        """``x2`` [M, K] float -> [M, N] float: the integer layer's own kernel on the unpacked weight."""
        return integer_linear(x2, act, self.weight_int8(), self.weight_scale, self.weight_zero_point,
                              self.weight_sum, bias)

    def storage_bytes(self) -> dict[str, int]:
        extra = sum(t.numel() * t.element_size() for t in (self.weight_scale, self.weight_zero_point, self.weight_sum)
                    if t is not None)
        return {"packed": self.weight_packed.numel() * self.weight_packed.element_size(), "per_channel": extra}


class PackedLinear(_PackedWeightMixin, nn.Module):
    def __init__(self, codes: Tensor, scale: Tensor, zero_point: Tensor, bias: Tensor | None,
                 act: ActQuant | None, layout: _WeightLayout) -> None:
        super().__init__()
        self._init_weight(codes, scale, zero_point, layout)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.act = None if act is None else ActBuffers(act)

    def forward(self, x: Tensor) -> Tensor:
        if self.act is None:
            return F.linear(x, self.dequantized_weight(), self.bias)
        y = self._int_gemm(x.reshape(-1, self.in_features), self.act, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


class PackedPatchConv(_PackedWeightMixin, nn.Module):
    """A conv with stride == kernel (no padding, dilation, groups): non-overlapping patches x int8 GEMM."""

    def __init__(self, codes: Tensor, scale: Tensor, zero_point: Tensor, bias: Tensor | None, act: ActQuant,
                 layout_for: Any) -> None:
        super().__init__()
        self.out_channels, self.in_channels, self.kh, self.kw = codes.shape
        flat = codes.reshape(self.out_channels, -1)
        self._init_weight(flat, scale, zero_point, layout_for(flat))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.act = ActBuffers(act)

    def forward(self, x: Tensor) -> Tensor:
        rows, ho, wo = patches(x, self.kh, self.kw)
        y = self._int_gemm(rows, self.act, self.bias)
        return y.reshape(x.shape[0], ho, wo, self.out_channels).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------- lowering

@dataclass
class PackedProgram:
    """A packed model: ``program`` (torch.export) + ``manifest`` (what was lowered, sizes)."""

    program: torch.export.ExportedProgram
    manifest: dict[str, Any]
    eager: fx.GraphModule | None = None  # the rewritten graph with the packed modules (not kept by save/load)

    @property
    def preprocess(self):
        """The artifact's preprocessing (a :class:`vitqc.data.Preprocess`), carried into the packed file."""
        from vitqc.data import Preprocess

        recorded = self.manifest.get("source", {}).get("preprocess")
        if not isinstance(recorded, dict):
            raise VitqcError("this packed model records no preprocessing: export it again from its artifact")
        return Preprocess.from_dict(recorded)

    def module(self, unpack: str = "load", compile: bool = False) -> nn.Module:
        """A callable module. ``unpack="load"`` (default: the fast exact form) unpacks the weights to int8 once
        (see :func:`fold_unpack`); ``"call"`` keeps them packed in memory and unpacks them inside every call.

        ``compile=True`` returns it through ``torch.compile`` (inductor): faster on CPU, after a compile on the
        first call of each input shape, and equal to the artifact only up to float rounding (see the module
        docstring)."""
        if unpack not in ("call", "load"):
            raise VitqcError(f"unpack must be 'call' or 'load', got {unpack!r}")
        gm = fast_rational_gelus(self.program.module())  # the program's GELU values, computed in place
        gm = fold_unpack(gm) if unpack == "load" else gm
        return torch.compile(gm, dynamic=False) if compile else gm


def _replace(gm: fx.GraphModule, region: Region, inputs: list[fx.Node], output: fx.Node, target: str,
             module: nn.Module) -> fx.Node:
    try:
        gm.get_submodule(target)
        gm.meta.setdefault("vitqc_pending", []).append((target, module))  # replaces a holder: see finish
    except AttributeError:
        gm.add_submodule(target, module)
    with gm.graph.inserting_before(output):
        new = gm.graph.call_module(target, tuple(inputs))
    new.meta.update({k: output.meta[k] for k in ("val",) if k in output.meta})
    output.replace_all_uses_with(new)
    for n in region.nodes:  # dtype asserts are side-effectful for DCE; drop those of the replaced region
        if n.op == "call_function" and n.target in ASSERTS:
            gm.graph.erase_node(n)
    return new


def lower_packed(source: Any, example: Tensor | None = None, *, ternary: str = "2bit") -> PackedProgram:
    """Lower an artifact (or its path), a materialized GraphModule or an ExportedProgram to packed kernels.

    ``ternary``: ``"2bit"`` (4 trits a byte, faster to unpack) or ``"base3"`` (5 a byte, 20 % smaller).
    """
    if ternary not in ("2bit", "base3"):
        raise VitqcError(f"ternary must be '2bit' or 'base3', got {ternary!r}")
    program, bits_hint, example, source_manifest, state, gm, weight_paths, quant_paths, regions = integer_layers(source, example)
    layers: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []

    for path in weight_paths:
        region = regions.get(path)
        try:
            if region is None:
                raise Unsupported("no nodes carry this module path")
            layers.append(_lower_weight_layer(gm, state, region, path, bits_hint.get(path), ternary))
        except Unsupported as why:
            skipped.append({"path": path, "reason": str(why)})

    matmul_paths = [path for path, _ in modules_by_type(gm, ("IntMatmul",))]
    for path, region in regions_of(gm, matmul_paths).items():
        try:
            layers.append(_lower_matmul(gm, state, region, path))
        except Unsupported as why:
            skipped.append({"path": path, "reason": str(why)})

    finish(gm)
    packed = _export(gm, example)
    manifest = _manifest(packed, layers, skipped, source_manifest, ternary)
    return PackedProgram(packed, manifest, gm)


def _export(gm: fx.GraphModule, example: Tensor) -> torch.export.ExportedProgram:
    """Re-export with a dynamic batch (what ``vitqc.artifact.export_program`` does; an unlifted program
    refuses ``.eval()``, which that function calls)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    example = example[:1].expand(2, *example.shape[1:]).contiguous()
    try:
        return torch.export.export(gm, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitqcError(f"could not export the packed graph with torch.export: {first}") from exc


def _lower_matmul(gm: fx.GraphModule, state: dict[str, Tensor], region: Region, path: str) -> dict[str, Any]:
    module, inputs, output = codes_matmul(state, region, path)
    _replace(gm, region, inputs, output, path, module)
    return {"path": path, "kind": "matmul", "form": "integer codes, fp32 GEMM (exact below 2^24)",
            "act": {"lhs": describe_grid(module.lhs), "rhs": describe_grid(module.rhs)}}


def _lower_weight_layer(gm: fx.GraphModule, state: dict[str, Tensor], region: Region, path: str,
                        bits_hint: float | None, ternary: str) -> dict[str, Any]:
    codes = state[f"{path}.weight_codes"]
    scale, zp = state[f"{path}.weight_scale"], state[f"{path}.weight_zero_point"]
    bias = state.get(f"{path}.bias")
    inputs, outputs = region.tensor_inputs(), region.tensor_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise Unsupported(f"expected one tensor in and one out, found {len(inputs)} in / {len(outputs)} out")
    act = act_quant(state, f"{path}.input_quantizer", region)
    if codes.dim() == 2:
        layout = _weight_layout(codes, bits_hint, ternary, path)
        module: nn.Module = PackedLinear(codes, scale, zp, bias, act, layout)
        kind = "linear"
    elif codes.dim() == 4:
        # the source's IntConv2d runs a patchify conv as patches x GEMM (no conv node); any other conv as a conv
        if region.find(torch.ops.aten.conv2d.default) or act is None or act.granularity != "tensor":
            raise Unsupported("only a patchify conv (stride == kernel, no padding/dilation/groups, per-tensor "
                               "input quantizer) is lowered; this conv keeps int8 codes and a float conv")
        module = PackedPatchConv(codes, scale, zp, bias, act, lambda flat: _weight_layout(flat, bits_hint, ternary, path))
        layout = module.layout
        kind = "patch_conv"
    else:
        raise Unsupported(f"{codes.dim()}-d weight codes")
    _replace(gm, region, inputs, outputs[0], path, module)
    sizes = module.storage_bytes()
    return {"path": path, "kind": kind, "weight_format": layout.fmt, "weight_bits": layout.bits,
            "shape": list(codes.shape), "act": None if act is None else act.describe(),
            "weight_params": codes.numel(), "packed_bytes": sizes["packed"], "per_channel_bytes": sizes["per_channel"]}


def _manifest(packed: torch.export.ExportedProgram, layers: list[dict], skipped: list[dict],
              source: dict[str, Any], ternary: str) -> dict[str, Any]:
    from vitqc.artifact import package_versions

    weight_layers = [l for l in layers if l["kind"] != "matmul"]
    total_params = sum(int(t.numel()) for t in packed.state_dict.values()) + sum(
        int(t.numel()) for t in packed.constants.values() if isinstance(t, Tensor))
    return {
        "format": PACKED_FORMAT,
        "source": {k: source[k] for k in ("model", "pipeline", "preprocess", "input_shape") if k in source},
        "ternary": ternary,
        "layers": layers,
        "not_lowered": skipped,
        "summary": {
            "weight_layers": len(weight_layers), "attention_matmuls": len(layers) - len(weight_layers),
            "not_lowered": len(skipped),
            "weight_params": sum(l["weight_params"] for l in weight_layers),
            "packed_bytes": sum(l["packed_bytes"] for l in weight_layers),
            "per_channel_bytes": sum(l["per_channel_bytes"] for l in weight_layers),
            "stored_elements": total_params,
        },
        "versions": package_versions(),
    }


# ----------------------------------------------------------------------------------------------- unpack at load

def fold_unpack(gm: fx.GraphModule) -> fx.GraphModule:
    """Evaluate, once, every node of a packed layer that depends only on stored tensors (the weight unpack,
    its transpose view, scale products) and store the results as buffers: the packed file stays small, the
    weights sit in memory as int8 and each call skips the unpack. Nodes outside packed layers are left alone."""
    packed_paths = {name for name, m in modules_by_type(gm, ("PackedLinear", "PackedPatchConv"))}
    return fold_constants(gm, lambda node: bool(stack_paths(node) & packed_paths))


# ----------------------------------------------------------------------------------------------- save / load

def save_packed(packed: PackedProgram, path: str | Path) -> Path:
    """Write the packed program with its manifest as a vitqc archive (``manifest.json`` + the program as JSON
    and safetensors, :mod:`vitqc.archive`: nothing in it runs when read), through a temporary file and a rename."""
    members = {"manifest.json": json.dumps(packed.manifest, indent=2).encode()}
    members.update(program_members(packed.program, "program"))
    return write_archive(path, members, what="packed model")


_PACKED_REQUIRED = {"format": (str, "the format tag"), "source": (dict, "the artifact it came from"),
                    "layers": (list, "what was lowered"), "summary": (dict, "sizes")}


def load_packed(path: str | Path) -> PackedProgram:
    """Read a packed model; a broken or hostile file is refused in one line (nothing in it runs)."""
    path = Path(path)
    where = repr(str(path))
    with open_archive(path, "packed model") as zf:
        manifest = read_manifest(zf, where, PACKED_FORMAT, _PACKED_REQUIRED)
        program = read_program(member_reader(zf, where), "program", where)
    return PackedProgram(program, manifest)


@register_backend
class PackedBackend:
    name = "packed"
    summary = "integer kernels over bit-packed weights (torch._int_mm), bit-identical to the artifact"
    suffix = ".packed.vitqc"

    @dataclass
    class Options:
        ternary: str = "2bit"  # ternary weights as 2bit (4 a byte) or base3 (5 a byte)

        def __post_init__(self) -> None:
            if self.ternary not in ("2bit", "base3"):
                raise VitqcError(f"--ternary must be 2bit or base3, got {self.ternary!r}")

    def export(self, artifact: Any, path: Path, options: "PackedBackend.Options", say) -> Path:
        packed = lower_packed(artifact, ternary=options.ternary)
        written = save_packed(packed, path)
        s = packed.manifest["summary"]
        bits = 8 * (s["packed_bytes"] + s["per_channel_bytes"]) / max(s["weight_params"], 1)
        say(f"lowered {s['weight_layers']} weight layers and {s['attention_matmuls']} attention matmuls"
            f" ({s['not_lowered']} left as the artifact runs them)")
        for item in packed.manifest["not_lowered"]:
            say(f"  not lowered: {item['path']}: {item['reason']}")
        say(f"weights: {s['packed_bytes']:,} packed bytes + {s['per_channel_bytes']:,} bytes of scales/zero "
            f"points for {s['weight_params']:,} weights ({bits:.2f} bits/weight)")
        return written
