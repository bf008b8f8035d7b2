"""ExecuTorch lowering: vitqc's quantized program -> PT2E (XNNPACK dynamic int8) -> ``.pte``.

What XNNPACK can run: linear layers with int8 activations quantized *dynamically* (XNNPACK computes an
asymmetric range per row at run time) and symmetric per-channel weights of 8 bits (qc8w) or 4 bits (qc4w).
Static activation ranges would need an output quantizer on every linear (XNNPACK's static int8 linear has an
int8 output), which vitqc's graphs do not have. So the program keeps vitqc's own activation quantizers:

* weights: vitqc's integer codes and per-channel scales are kept exactly (a fixed-qparams observer hands
  PT2E the artifact's scales; the FP weight it quantizes is the artifact's dequantized weight, so
  ``round(w/s)`` gives back the codes). Codes of 2-4 bits and ternary codes fit int4 [-8, 7] exactly and go
  as qc4w; 5-8 bits as qc8w. Asymmetric weights cannot be expressed (XNNPACK weights are symmetric) and are
  re-quantized symmetric 8-bit per channel from the dequantized weight (a min-max observer).
* activations: each linear's input goes through vitqc's quantizer, computed in fp32 with the same float ops
  (:class:`QuantizedInput`), and XNNPACK's dynamic int8 then quantizes those values again. For per-token
  asymmetric grids of 255 / k steps (A8, A4, A2) that second quantization is exact, so the linear computes
  vitqc's integer GEMM (see :func:`_device_act`); per-token A8 is XNNPACK's own grid, so there vitqc's
  rounding is skipped and only its clip is kept (:class:`ClippedInput`); other grids (A3, A6, static
  per-tensor) are re-rounded to XNNPACK's per-row 8-bit grid. Attention matmuls run as vitqc's program
  computes them (codes and GEMM in fp32, exact below 2^24), or in plain fp32 with ``attention="fp32"``;
  softmax, LayerNorm and GELU run in fp32. The patch-embedding conv runs in fp32 on vitqc's dequantized codes
  and weights. LayerNorm, attention's batched matmuls and the quantizers' row min/max and rounding are
  rewritten into ops XNNPACK takes (:func:`vitqc.backends.xnnpack_rewrite.xnnpack_supported_ops`), so they run inside the delegates rather
  than on portable kernels between them.

:func:`describe_substitution` states this in one line before lowering; ``lower_executorch`` returns the
delegate count and the per-layer mapping, and the caller re-measures accuracy of what was lowered
(``run_pte`` runs a ``.pte`` with ``executorch.runtime``).

One code path: like the packed backend, it starts from the quantized ``torch.export`` program (an artifact's,
or ``export_program`` of a materialized GraphModule), replaces each integer layer by a float layer with the
dequantized weight and bypasses activation quantizers, then annotates those layers for PT2E.
"""
from __future__ import annotations

import operator
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn

from vitqc.backends.program import (ActBuffers, ActQuant, Unsupported, act_quant, finish, integer_layers,
                                   modules_by_type, regions_of)
from vitqc.backends.xnnpack_rewrite import xnnpack_supported_ops
from vitqc.errors import VitqcError
from vitqc.quant.intops import token_range

__all__ = ["PteResult", "lower_executorch", "describe_substitution", "float_program",
           "save_pte", "load_pte", "run_pte", "count_delegates"]


@dataclass
class _LayerPlan:
    path: str
    source_bits: float | None  # vitqc weight bits (None: unknown)
    act: str  # vitqc activation grid, described
    device_weight: str  # "qc8w" | "qc4w" | "qc8w-requantized" | "fp32"
    scale: Tensor | None  # per-channel weight scale handed to PT2E (None: observer computes it)
    qmin: int
    qmax: int
    device_act: str = "fp32"  # how vitqc's input quantizer runs on device (see _device_act)


class QuantizedInput(nn.Module):
    """``layer(dequantize(vitqc's activation codes of x))``: vitqc's input quantizer, computed with the same
    float ops (:func:`vitqc.quant.intops.act_codes`), in front of the float layer that PT2E then quantizes."""

    def __init__(self, act: ActQuant, layer: nn.Module) -> None:
        super().__init__()
        self.act, self.layer = ActBuffers(act), layer

    def forward(self, x: Tensor) -> Tensor:
        q, s, z = self.act.codes(x)
        return self.layer((q - z) * s)


class ClippedInput(nn.Module):
    """``layer(x clipped to vitqc's per-token range)``, for per-token asymmetric A8 with clip ratio <= 1 (see
    :func:`_device_act`, "xnnpack-grid"): each clipped row reaches both ends of vitqc's range, so XNNPACK's
    dynamic int8 of it has vitqc's step and zero point, and vitqc's own rounding (several float ops per element)
    need not run first. With ratio 1 the clip changes nothing and is left out."""

    def __init__(self, act: ActQuant, layer: nn.Module) -> None:
        super().__init__()
        assert act.clip_ratio is not None
        self.layer, self.ratio = layer, float(act.clip_ratio)

    def forward(self, x: Tensor) -> Tensor:
        if self.ratio == 1.0:
            return self.layer(x)
        lo, hi = token_range(x)
        return self.layer(torch.minimum(torch.maximum(x, lo * self.ratio), hi * self.ratio))


def _device_act(act: ActQuant | None) -> str:
    """How XNNPACK's dynamic int8 (per row: asymmetric, range including 0) takes vitqc's dequantized codes.

    Per token on an asymmetric grid with clip ratio <= 1, vitqc's codes span the whole grid in every row (the
    clip saturates both ends; a row without negatives has zero point qmin and XNNPACK's range starts at 0
    too), so XNNPACK's row range is exactly the grid's
    and its step is vitqc's step * (qmax - qmin) / 255. When the number of steps divides 255 (A8, A4, A2),
    XNNPACK's codes are vitqc's codes times 255 / (qmax - qmin) plus a constant, and the integer GEMM gives
    vitqc's result up to float rounding: "exact". For A8 (255 steps) XNNPACK's own rounding of the clipped
    row already gives vitqc's codes, so vitqc's quantizer is not computed at all: "xnnpack-grid" (same range,
    step and zero-point formula; only the float rounding of the step, and ties, may differ). Otherwise (A3,
    A6, per-tensor grids, whose rows need not reach both ends, symmetric grids, ratios above 1) XNNPACK rounds
    vitqc's values again to its own 8-bit grid: "re-quantized"."""
    if act is None:
        return "fp32"
    steps = act.qmax - act.qmin
    if act.granularity == "token" and not act.symmetric and float(act.clip_ratio) <= 1 and 255 % steps == 0:
        return "xnnpack-grid" if steps == 255 else "exact"
    return "re-quantized"


@dataclass
class PteResult:
    buffer: bytes
    delegates: int
    layers: list[dict[str, Any]]
    substitution: str
    fp32: bool
    portable_ops: dict[str, int]  # ops left outside the XNNPACK delegates (run on portable kernels), by name

    def summary(self) -> dict[str, Any]:
        return {"delegate_segments": self.delegates, "bytes": len(self.buffer), "substitution": self.substitution,
                "portable_ops": self.portable_ops, "layers": self.layers, "fp32": self.fp32}


# ----------------------------------------------------------------------------------------------- the float graph

ATTENTION = ("vitqc", "fp32")


def float_program(source: Any, example: Tensor | None = None, *, activations: bool = True,
                  attention: str = "vitqc") -> tuple[fx.GraphModule, list[_LayerPlan], Tensor, dict]:
    """The quantized program with every integer layer replaced by a float layer holding the dequantized
    weight, behind vitqc's input quantizer (:class:`QuantizedInput`); plus the plan for each weight layer.
    ``activations=False`` drops every activation quantizer instead (attention matmuls become float matmuls of
    their inputs): the float model with vitqc's weights, the baseline a quantized ``.pte`` is timed against.
    ``attention="fp32"`` drops only the attention matmuls' quantizers: XNNPACK has no integer batched matmul, so
    vitqc's codes there are computed by ~30 float ops per operand, which cost as much as every int8 linear of
    the model together (vits14 W8A8 per token: 31 vs 17 ms); the float matmul is the cheaper substitute."""
    if attention not in ATTENTION:
        raise VitqcError(f"attention={attention!r}: use one of {', '.join(ATTENTION)}")
    program, bits_hint, example, manifest, state, gm, weight_paths, quant_paths, regions = integer_layers(source, example)
    plans: list[_LayerPlan] = []
    for path in weight_paths:
        region = regions.get(path)
        if region is None:
            raise VitqcError(f"{path}: no graph nodes carry this module path; cannot lower")
        inputs, outputs = region.tensor_inputs(), region.tensor_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise VitqcError(f"{path}: expected one tensor in and one out ({len(inputs)} in / {len(outputs)} out)")
        codes = state[f"{path}.weight_codes"]
        scale = state[f"{path}.weight_scale"].float()
        zp = state[f"{path}.weight_zero_point"].float()
        weight = (codes.float() - zp) * scale
        bias = state.get(f"{path}.bias")
        act = _describe_act(region)
        try:
            act_q = act_quant(state, f"{path}.input_quantizer", region) if activations else None
        except Unsupported as why:
            raise VitqcError(f"{path}: cannot lower its activation quantizer ({why})") from None
        if codes.dim() == 2:
            layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            plans.append(_plan(path, codes, scale.reshape(-1), zp, bits_hint.get(path), act))
        else:
            convs = region.find(torch.ops.aten.conv2d.default)
            if len(convs) > 1:
                raise VitqcError(f"{path}: conv region with {len(convs)} aten.conv2d nodes")
            # no conv node: vitqc ran this patchify conv (stride == kernel) as patches x integer GEMM
            args = list(convs[0].args) + [None] * 7 if convs else [None, None, None, tuple(weight.shape[2:])] + [None] * 7
            layer = nn.Conv2d(weight.shape[1] * (args[6] or 1), weight.shape[0], tuple(weight.shape[2:]),
                              stride=tuple(args[3] or (1, 1)), padding=tuple(args[4] or (0, 0)),
                              dilation=tuple(args[5] or (1, 1)), groups=args[6] or 1, bias=bias is not None)
            plans.append(_LayerPlan(path, bits_hint.get(path), act, "fp32", None, 0, 0))
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        # the patch conv runs in fp32 on vitqc's dequantized codes: nothing is re-quantized there
        plans[-1].device_act = _device_act(act_q) if codes.dim() == 2 or act_q is None else "exact"
        if act_q is not None:
            layer = (ClippedInput if plans[-1].device_act == "xnnpack-grid" else QuantizedInput)(act_q, layer)
        _swap(gm, region, inputs[0], outputs[0], path, layer)
    if not activations:
        _drop_activation_quantizers(gm, weight_paths, quant_paths, regions)
    elif attention == "fp32":
        _float_attention_matmuls(gm)
    finish(gm)
    return gm, plans, example, manifest


def _float_attention_matmuls(gm: fx.GraphModule) -> list[str]:
    """Integer attention matmuls become float matmuls of their inputs; returns their module paths."""
    matmul_paths = [p for p, _ in modules_by_type(gm, ("IntMatmul",))]
    for path, region in regions_of(gm, matmul_paths).items():
        ins, outs = region.tensor_inputs(), region.tensor_outputs()
        if len(ins) != 2 or len(outs) != 1:
            raise VitqcError(f"{path}: expected two tensors in and one out ({len(ins)} in / {len(outs)} out)")
        with gm.graph.inserting_before(outs[0]):
            plain = gm.graph.call_function(torch.ops.aten.matmul.default, (ins[0], ins[1]))
        plain.meta["val"] = outs[0].meta.get("val")
        outs[0].replace_all_uses_with(plain)
    return matmul_paths


def _drop_activation_quantizers(gm: fx.GraphModule, weight_paths: list[str], quant_paths: list[str],
                                regions: dict) -> None:
    """Attention matmuls in float (:func:`_float_attention_matmuls`); other activation quantizers are bypassed."""
    matmul_paths = _float_attention_matmuls(gm)
    inside = tuple(p + "." for p in weight_paths + matmul_paths)
    for qp in quant_paths:
        region = regions.get(qp)
        if region is None or qp.startswith(inside):
            continue
        ins, outs = region.tensor_inputs(), region.tensor_outputs()
        if len(ins) == 1 and len(outs) == 1:
            outs[0].replace_all_uses_with(ins[0])


def _describe_act(region) -> str:
    bounds = region.clamp_bounds()
    if not bounds:
        return "fp"
    lo, hi = sorted(bounds)[0]
    if (lo, hi) == (-1, 1):
        return "A1.58"
    return f"A{(hi - lo + 1).bit_length() - 1}"


def _plan(path: str, codes: Tensor, scale: Tensor, zp: Tensor, bits: float | None, act: str) -> _LayerPlan:
    lo, hi = int(codes.min()), int(codes.max())
    if bool((zp != 0).any()) or codes.dtype == torch.uint8:
        return _LayerPlan(path, bits, act, "qc8w-requantized", None, -127, 127)
    if -8 <= lo and hi <= 7 and codes.shape[1] % 2 == 0:  # XNNPACK packs int4 pairs along the input dim
        return _LayerPlan(path, bits, act, "qc4w", scale, -8, 7)
    return _LayerPlan(path, bits, act, "qc8w", scale, -128, 127)


def _swap(gm: fx.GraphModule, region, x: fx.Node, out: fx.Node, path: str, layer: nn.Module) -> None:
    gm.meta.setdefault("vitqc_pending", []).append((path, layer))
    with gm.graph.inserting_before(out):
        # the holder module at `path` is replaced in finish; call it by path (fx checks the target lazily)
        new = gm.graph.create_node("call_module", path, (x,))
    new.meta["val"] = out.meta.get("val")
    out.replace_all_uses_with(new)


def describe_substitution(plans: list[_LayerPlan], manifest: dict[str, Any] | None = None,
                          attention: str = "vitqc") -> str:
    """One line: vitqc's scheme -> what XNNPACK will run."""
    def fmt_bits(b: float | None) -> str:
        return "?" if b is None else ("1.58" if float(b) == 1.58 else f"{float(b):g}")

    linear = [p for p in plans if p.device_weight != "fp32"]
    src_w = sorted({fmt_bits(p.source_bits) for p in linear})
    src_a = sorted({p.act[1:] for p in linear if p.act != "fp"})
    dev_w = sorted({ {"qc4w": "4", "qc8w": "8", "qc8w-requantized": "8"}[p.device_weight] for p in linear})
    name = (manifest or {}).get("pipeline", {}).get("name") if isinstance((manifest or {}).get("pipeline"), dict) else None
    src = f"W{'/'.join(src_w)}A{'/'.join(src_a) or 'fp'}"
    dev = f"W{'/'.join(dev_w)}A8"
    notes = []
    if any(p.device_weight == "qc8w-requantized" for p in linear):
        notes.append("asymmetric weights re-quantized symmetric 8-bit")
    if any(p.source_bits is not None and float(p.source_bits) in (1.58, 2, 3) for p in linear):
        notes.append("ternary/2/3-bit codes stored exactly as int4")
    quantized = [p for p in plans if p.device_act != "fp32"]
    own_grid = [p for p in quantized if p.device_act == "xnnpack-grid"]
    inexact = [p for p in quantized if p.device_act not in ("exact", "xnnpack-grid")]
    if own_grid:
        notes.append(f"{len(own_grid)} of {len(quantized)} layers' per-token A8 rounded by XNNPACK's dynamic int8 "
                     "itself (the same grid)")
    if len(own_grid) < len(quantized) and not inexact:
        notes.append("vitqc's activation codes computed in fp32 and taken exactly by XNNPACK's dynamic int8")
    elif inexact:
        notes.append(f"vitqc's activation codes computed in fp32, re-quantized by XNNPACK's dynamic int8 per row "
                     f"({len(inexact)} of {len(quantized)} layers not exactly: static or non-255-dividing grids)")
    attn = "attention matmuls in fp32 instead of vitqc's quantized ones" if attention == "fp32" \
        else "attention matmuls on vitqc's codes"
    notes.append(f"{attn}, softmax and the patch conv in fp32")
    return f"vitqc {src}{f' ({name})' if name else ''} -> XNNPACK {dev}: " + "; ".join(notes)


# ----------------------------------------------------------------------------------------------- PT2E + lowering

def _quantizer(plans: list[_LayerPlan]):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config
    from torchao.quantization.pt2e import PerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

    class FixedPerChannel(PerChannelMinMaxObserver):
        """Per-channel observer whose qparams are given (vitqc's scales), not observed."""

        def __init__(self, fixed_scale: Tensor, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.register_buffer("fixed_scale", fixed_scale.detach().float().clone())

        def forward(self, x: Tensor) -> Tensor:
            return x

        def calculate_qparams(self):  # type: ignore[override]
            return self.fixed_scale, torch.zeros(self.fixed_scale.shape, dtype=torch.int64)

    act_spec = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True).input_activation
    by_path = {p.path: p for p in plans if p.device_weight != "fp32"}

    def weight_spec(p: _LayerPlan) -> QuantizationSpec:
        if p.scale is None:
            ctr = PerChannelMinMaxObserver.with_args(eps=2 ** -12)
        else:
            ctr = FixedPerChannel.with_args(fixed_scale=p.scale)
        return QuantizationSpec(dtype=torch.int8, quant_min=p.qmin, quant_max=p.qmax, qscheme=torch.per_channel_symmetric,
                                ch_axis=0, is_dynamic=False, observer_or_fake_quant_ctr=ctr)

    class VitqcXnnpackQuantizer(Quantizer):
        """Annotates the linear layers of vitqc's float graph: dynamic int8 input, vitqc's weight qparams."""

        def annotate(self, model: fx.GraphModule) -> fx.GraphModule:
            self.annotated: list[str] = []
            for node in model.graph.nodes:
                if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
                    continue
                paths = [v[0] for v in node.meta.get("nn_module_stack", {}).values() if isinstance(v, tuple)]
                plan = next((by_path[p] for p in reversed(paths) if p in by_path), None)
                if plan is None:
                    continue
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={node.args[0]: act_spec, node.args[1]: weight_spec(plan)}, _annotated=True)
                self.annotated.append(plan.path)
            return model

        def validate(self, model: fx.GraphModule) -> None:
            pass

    return VitqcXnnpackQuantizer()


def _export(module: nn.Module, example: Tensor, dynamic: bool) -> torch.export.ExportedProgram:
    if dynamic:
        batch = torch.export.Dim("batch", min=1, max=64)
        ex = example[:1].expand(2, *example.shape[1:]).contiguous()
        return torch.export.export(module, (ex,), dynamic_shapes=({0: batch},), strict=False)
    return torch.export.export(module, (example,), strict=False)


def lower_executorch(source: Any, example: Tensor | None = None, *, fp32: bool = False, batch: int = 1,
                     attention: str = "vitqc", announce: Any = print) -> PteResult:
    """Lower to an XNNPACK ``.pte`` (bytes in the result). ``fp32=True`` lowers the float model with vitqc's
    dequantized weights and no quantization at all (the baseline). ``batch``: the static batch size of the
    program. ``attention``: "vitqc" computes the attention matmuls on vitqc's codes, "fp32" runs them in float
    (faster; see :func:`float_program`). ``announce`` receives the one-line scheme substitution before lowering
    (``None``: silent)."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise VitqcError(f"the executorch backend needs executorch and torchao ({exc.name} is missing)") from None
    gm, plans, example, manifest = float_program(source, example, activations=not fp32, attention=attention)
    example = example[:1].expand(batch, *example.shape[1:]).contiguous()
    substitution = "fp32 baseline: no quantization" if fp32 else describe_substitution(plans, manifest, attention)
    if announce is not None:
        announce(substitution)
    with torch.no_grad():
        graph = xnnpack_supported_ops(_export(gm, example, dynamic=False).module())
        if fp32:
            program = _export(graph, example, dynamic=False)
        else:
            quantizer = _quantizer(plans)
            prepared = prepare_pt2e(graph, quantizer)
            prepared(example)  # observers: fixed or weight min-max; dynamic activations need no calibration
            converted = convert_pt2e(prepared)
            program = _export(converted, example, dynamic=False)
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        delegates = count_delegates(edge.exported_program().graph_module)
        portable = _portable_ops(edge.exported_program().graph_module)
        et = edge.to_executorch()
    layers = [{"path": p.path, "vitqc_weight_bits": p.source_bits, "vitqc_act": p.act,
               "device": "fp32" if fp32 else p.device_weight + ("" if p.device_weight == "fp32" else "+dynA8"),
               "activation": "fp32" if fp32 else p.device_act}
              for p in plans]
    return PteResult(bytes(et.buffer), delegates, layers, substitution, fp32, portable)


def count_delegates(gm: fx.GraphModule) -> int:
    """Delegate segments: ``executorch_call_delegate`` calls (one per lowered subgraph)."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and "executorch_call_delegate" in str(node.target):
            n += 1
    return n


def _portable_ops(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or "executorch_call_delegate" in str(node.target) \
                or node.target is operator.getitem:
            continue
        name = getattr(node.target, "__name__", str(node.target)).split(" ")[0]
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def save_pte(result: PteResult, path: str | Path) -> Path:
    from vitqc.artifact import check_writable

    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(result.buffer)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_pte(path: str | Path):
    """``executorch.runtime`` method ``forward`` of a ``.pte`` file (call ``.execute([x])``)."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(Path(path))
    method = program.load_method("forward")
    if method is None:
        raise VitqcError(f"{path}: no 'forward' method in the program")
    return method


def run_pte(method, x: Tensor, batch: int = 1) -> Tensor:
    """Run a static-batch ``.pte`` method over ``x`` in chunks of ``batch`` (the last chunk zero-padded)."""
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = torch.cat([chunk, chunk.new_zeros(batch - n, *chunk.shape[1:])])
        outs.append(method.execute([chunk.contiguous()])[0][:n])
    return torch.cat(outs)
