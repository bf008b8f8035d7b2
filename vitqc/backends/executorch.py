"""ExecuTorch lowering: vitqc's quantized program -> PT2E (XNNPACK int8 linears) -> ``.pte``, on vitqc's own grids.

What runs where:

* weights: vitqc's integer codes and per-channel scales, kept exactly. A fixed-qparams observer hands PT2E the
  artifact's scales; the float weight it quantizes is the artifact's dequantized weight, so ``round(w / s)``
  gives back the codes. Codes (centred on their zero point) that fit int4 [-8, 7] go as XNNPACK's packed qc4w
  (two a byte: 2-4-bit and ternary codes), others that fit int8 as qc8w. Only codes that fit neither (8-bit
  asymmetric weights with a zero point far from the middle) are re-quantized symmetric 8-bit: not exact.
* activations: each quantized linear takes its input on vitqc's grid through XNNPACK's dynamic int8, with two
  anchor columns that pin XNNPACK's per-row grid to vitqc's step and zero point
  (:mod:`vitqc.backends.xnnpack_act`): static per-tensor A8 / A6 / A4 / A3 and every per-token grid give
  vitqc's codes and its exact integer GEMM; the patch embedding runs as patches x the same int8 GEMM, as
  vitqc's ``IntConv2d`` does. Weight-only layers (no input quantizer) stay float linears on the dequantized
  weight, as vitqc computes them.
* attention matmuls run as vitqc's program computes them (codes and GEMM in fp32, exact below 2^24), or in
  plain fp32 with ``attention="fp32"`` (not exact: vitqc's codes dropped there).
* float ops: the rescale after each integer GEMM is XNNPACK's fused multiply-add, as vitqc's. A program
  materialized with vitqc's own GELU and LayerNorm (the default) gets them bit for bit: its GELU is XNNPACK's GELU
  kernel's formula (:mod:`vitqc.quant.rational_gelu`), its LayerNorm sums in an order the graph fixes and takes a
  correctly rounded square root, which stays on ExecuTorch's portable kernel (:mod:`vitqc.quant.pairwise_layer_norm`).
  Softmax (XNNPACK's exp) and programs with ATen's GELU or LayerNorm agree up to float rounding. ATen's LayerNorm,
  attention's batched matmuls and the quantizers' row min/max and rounding are rewritten into ops XNNPACK takes
  (:func:`vitqc.backends.xnnpack_rewrite.xnnpack_supported_ops`), so they run inside the delegates rather than on
  portable kernels between them.

Whatever has no exact XNNPACK form is listed by :func:`inexact_parts`; ``lower_executorch(..., exact=True)``
refuses it in one line, otherwise its cost is measured (:func:`measure_substitution`) and said with the rest in
one line (:func:`describe_substitution`) before lowering. ``run_pte`` runs a ``.pte`` with ``executorch.runtime``.

One code path: like the packed backend, it starts from the quantized ``torch.export`` program (an artifact's,
or ``export_program`` of a materialized GraphModule), replaces each integer layer by a float layer with the
dequantized weight behind the modules above, then annotates those layers for PT2E.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, fx, nn

from vitqc.backends import register_backend
from vitqc.backends.program import Unsupported, act_quant, codes_matmul, finish, fold_constants, integer_layers, \
    modules_by_type, regions_of
from vitqc.backends.xnnpack_act import ANCHORS, AnchoredInput, ClippedInput, PatchGemm, QuantizedInput, \
    StaticInt8Linear, device_act, padded_linear
from vitqc.backends.xnnpack_rewrite import SQRT_OUTSIDE_XNNPACK, is_sqrt_rn, xnnpack_supported_ops
from vitqc.errors import VitqcError
from vitqc.quant.rational_gelu import rational_gelu_nodes

__all__ = ["PteResult", "lower_executorch", "describe_substitution", "inexact_parts", "measure_substitution",
           "float_program", "save_pte", "load_pte", "run_pte", "count_delegates", "ATTENTION"]


@dataclass
class _LayerPlan:
    path: str
    source_bits: float | None  # vitqc weight bits (None: unknown)
    act: str  # vitqc activation grid, described
    device_weight: str  # "qc8w" | "qc4w" | "qc8w-requantized" | "fp32"
    scale: Tensor | None  # per-channel weight scale handed to PT2E (None: observer computes it)
    qmin: int
    qmax: int
    device_act: str = "fp32"  # see vitqc.backends.xnnpack_act.device_act; "fp32-conv": vitqc's codes, float conv


@dataclass
class PteResult:
    buffer: bytes
    delegates: int
    layers: list[dict[str, Any]]
    substitution: str
    fp32: bool
    portable_ops: dict[str, int]  # ops left outside the XNNPACK delegates (run on portable kernels), by name
    exact: bool = True  # no scheme substitution (float rounding aside); see inexact_parts
    cost: dict[str, Any] | None = None  # what the substitution was measured to cost (measure_substitution)

    def summary(self) -> dict[str, Any]:
        return {"delegate_segments": self.delegates, "bytes": len(self.buffer), "substitution": self.substitution,
                "exact": self.exact, "substitution_cost": self.cost, "portable_ops": self.portable_ops,
                "layers": self.layers, "fp32": self.fp32}


# ----------------------------------------------------------------------------------------------- the float graph

ATTENTION = ("vitqc", "fp32")


def float_program(source: Any, example: Tensor | None = None, *, activations: bool = True,
                  attention: str = "vitqc") -> tuple[fx.GraphModule, list[_LayerPlan], Tensor, dict]:
    """The quantized program with every integer layer replaced by a float layer holding the dequantized weight,
    behind the module that hands XNNPACK vitqc's activation grid (:mod:`vitqc.backends.xnnpack_act`); plus the
    plan for each weight layer. Run eagerly it is vitqc's program with float GEMMs where inputs go as vitqc's codes
    (static per-tensor layers, the attention matmuls); anchored and clipped layers leave the rounding to XNNPACK's
    dynamic quantization, so eagerly they see unrounded inputs. ``activations=False`` drops every activation quantizer instead (attention matmuls
    become float matmuls of their inputs): the float model with vitqc's weights, the baseline a quantized ``.pte``
    is timed against. ``attention="fp32"`` drops only the attention matmuls' quantizers: XNNPACK has no integer
    batched matmul, so vitqc's codes there are computed by float ops, which cost more than a float matmul
    (benchmarks/results/executorch_pte-token-fp32attn.json)."""
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
        try:
            act_q = act_quant(state, f"{path}.input_quantizer", region) if activations else None
        except Unsupported as why:
            raise VitqcError(f"{path}: cannot lower its activation quantizer ({why})") from None
        n = weight.shape[0]
        symmetric = not bool((zp != 0).any())
        how = device_act(act_q, symmetric)
        convs = region.find(torch.ops.aten.conv2d.default)
        if codes.dim() == 2 or (codes.dim() == 4 and not convs and act_q is not None):
            # a linear, or a patchify conv (vitqc ran it as patches x integer GEMM: no conv node in its region)
            flat, flat_codes = weight.reshape(n, -1), codes.reshape(n, -1)
            if how == "static-int8":
                layer: nn.Module = StaticInt8Linear(act_q, flat_codes, scale.reshape(-1),
                                                    state[f"{path}.gemm_weight_sum"], bias)
                plan_scale = layer.out_scale
            else:
                extra = ANCHORS if how == "anchored" else 0
                linear = padded_linear(flat, bias, extra)
                wrap = {"anchored": AnchoredInput, "xnnpack-grid": ClippedInput}.get(how)
                layer = wrap(act_q, linear) if wrap else linear
                plan_scale = scale.reshape(-1)
            k = flat.shape[1] + (ANCHORS if how in ("static-int8", "anchored") else 0)
            plans.append(_plan(path, flat_codes, plan_scale, zp.reshape(-1), bits_hint.get(path), _describe_act(region),
                               how, k))
            if codes.dim() == 4:
                layer = PatchGemm(layer, tuple(codes.shape[2:]), n)
        else:
            layer = _float_conv(path, convs, weight, bias)
            plans.append(_LayerPlan(path, bits_hint.get(path), _describe_act(region), "fp32", None, 0, 0,
                                    "fp32" if act_q is None else "fp32-conv"))
            if act_q is not None:
                layer = QuantizedInput(act_q, layer)
        _swap(gm, inputs[:1], outputs[0], path, layer)
    if not activations:
        _drop_activation_quantizers(gm, weight_paths, quant_paths, regions)
    elif attention == "fp32":
        _float_attention_matmuls(gm)
    else:
        _codes_matmuls(gm, state)
    finish(gm)
    return gm, plans, example, manifest


def _float_conv(path: str, convs: list[fx.Node], weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
    """A float conv with the dequantized weight, its geometry read from the region's conv node (none: the
    patchify conv of a weight-only or float baseline layer, stride == kernel)."""
    if len(convs) > 1:
        raise VitqcError(f"{path}: conv region with {len(convs)} aten.conv2d nodes")
    args = list(convs[0].args) + [None] * 7 if convs else [None, None, None, tuple(weight.shape[2:])] + [None] * 7
    layer = nn.Conv2d(weight.shape[1] * (args[6] or 1), weight.shape[0], tuple(weight.shape[2:]),
                      stride=tuple(args[3] or (1, 1)), padding=tuple(args[4] or (0, 0)),
                      dilation=tuple(args[5] or (1, 1)), groups=args[6] or 1, bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _codes_matmuls(gm: fx.GraphModule, state: dict[str, Tensor]) -> None:
    """Attention matmuls as :class:`vitqc.backends.program.CodesMatmul` (the same integers in fewer ops); one that
    is not the usual two-operand form is left as the program computes it."""
    matmul_paths = [p for p, _ in modules_by_type(gm, ("IntMatmul",))]
    for path, region in regions_of(gm, matmul_paths).items():
        try:
            module, inputs, output = codes_matmul(state, region, path)
        except Unsupported:
            continue
        _swap(gm, inputs, output, path, module)


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


def _plan(path: str, codes: Tensor, scale: Tensor, zp: Tensor, bits: float | None, act: str, how: str,
          k: int) -> _LayerPlan:
    """How XNNPACK holds a weight [N, K] (``k``: its input width on the device, anchors included): vitqc's codes
    centred on their zero point, as packed int4 (qc4w; XNNPACK packs pairs along K, so K must be even) or int8
    (qc8w); symmetric per-channel scales, as XNNPACK's weights are. A weight-only layer stays float."""
    if how == "fp32":
        return _LayerPlan(path, bits, act, "fp32", None, 0, 0, how)
    centred = codes.to(torch.int32) - zp.reshape(-1, 1).round().to(torch.int32)
    lo, hi = int(centred.min()), int(centred.max())
    if -8 <= lo and hi <= 7 and k % 2 == 0:
        return _LayerPlan(path, bits, act, "qc4w", scale, -8, 7, how)
    if -128 <= lo and hi <= 127:
        return _LayerPlan(path, bits, act, "qc8w", scale, -128, 127, how)
    return _LayerPlan(path, bits, act, "qc8w-requantized", None, -127, 127, how)


def _swap(gm: fx.GraphModule, inputs: list[fx.Node], out: fx.Node, path: str, layer: nn.Module) -> None:
    gm.meta.setdefault("vitqc_pending", []).append((path, layer))
    with gm.graph.inserting_before(out):
        # the holder module at `path` is replaced in finish; call it by path (fx checks the target lazily)
        new = gm.graph.create_node("call_module", path, tuple(inputs))
    new.meta["val"] = out.meta.get("val")
    out.replace_all_uses_with(new)


def inexact_parts(plans: list[_LayerPlan], attention: str = "vitqc") -> list[str]:
    """What of vitqc's scheme the ``.pte`` would not compute exactly (float rounding aside), one phrase each."""
    parts = []
    requantized = [p.path for p in plans if p.device_weight == "qc8w-requantized"]
    if requantized:
        parts.append(f"{len(requantized)} layers' weight codes do not fit int8 around their zero point "
                     f"({requantized[0]}{', ...' if len(requantized) > 1 else ''}): re-quantized symmetric 8-bit")
    if attention == "fp32":
        parts.append("attention matmuls in fp32 instead of on vitqc's codes (attention='fp32')")
    return parts


def describe_substitution(plans: list[_LayerPlan], manifest: dict[str, Any] | None = None,
                          attention: str = "vitqc", cost: dict[str, Any] | None = None,
                          gelu: tuple[int, int] = (0, 0), layer_norm: tuple[int, int] = (0, 0)) -> str:
    """One line: vitqc's scheme -> what XNNPACK will run, what is exact, and what is not (with ``cost``, the
    measurement of :func:`measure_substitution`). ``gelu``: the program's GELUs in XNNPACK's form
    (:mod:`vitqc.quant.rational_gelu`) and in ATen's; ``layer_norm``: its LayerNorms in vitqc's pairwise form
    (:mod:`vitqc.quant.pairwise_layer_norm`) and in ATen's."""
    def fmt_bits(b: float | None) -> str:
        return "?" if b is None else ("1.58" if float(b) == 1.58 else f"{float(b):g}")

    linear = [p for p in plans if p.device_weight != "fp32"]
    src_w = sorted({fmt_bits(p.source_bits) for p in plans})
    src_a = sorted({p.act[1:] for p in plans if p.act != "fp"})
    dev_w = sorted({{"qc4w": "4", "qc8w": "8", "qc8w-requantized": "8"}[p.device_weight] for p in linear})
    pipeline = (manifest or {}).get("pipeline")
    name = pipeline.get("name") if isinstance(pipeline, dict) else None
    head = f"vitqc W{'/'.join(src_w)}A{'/'.join(src_a) or 'fp'}{f' ({name})' if name else ''} -> " \
           f"XNNPACK W{'/'.join(dev_w) or 'fp32'}A8"
    on_grid = [p for p in plans if p.device_act in ("static-int8", "anchored", "xnnpack-grid")]
    notes = [f"{len(on_grid)} of {len(plans)} weight layers as int8 GEMMs on vitqc's codes and activation grids "
             "(XNNPACK's dynamic int8 pinned to them)"]
    if any(p.device_weight == "qc4w" for p in linear):
        notes.append("weights of up to 4 bits packed as int4")
    float_layers = [p for p in plans if p.device_act in ("fp32", "fp32-conv")]
    if float_layers:
        notes.append(f"{len(float_layers)} in fp32 on vitqc's dequantized weights ({float_layers[0].path}"
                     f"{', ...' if len(float_layers) > 1 else ''}: weight-only or not a patchify conv)")
    if attention == "vitqc":
        notes.append("attention matmuls on vitqc's codes")
    rational, aten_gelus = gelu
    if rational:
        notes.append("GELU as the program computes it (XNNPACK's kernel is its formula)")
    if aten_gelus:
        notes.append(f"{aten_gelus} GELU(s) computed by XNNPACK's kernel where the program has ATen's (last bits "
                     "differ; recompile with materialize.gelu='xnnpack' for the same values)")
    pairwise, aten_norms = layer_norm
    if pairwise:
        notes.append("LayerNorm as the program computes it (its pairwise sums in XNNPACK, square roots on the "
                     "portable kernel)")
    if aten_norms:
        notes.append(f"{aten_norms} LayerNorm(s) as XNNPACK means and rsqrt where the program has ATen's kernel "
                     "(last bits differ; recompile with materialize.layer_norm='pairwise' for the same values)")
    notes.append("softmax (XNNPACK's exp) and the rescales in fp32")
    inexact = inexact_parts(plans, attention)
    if inexact:
        measured = "" if cost is None else (
            f" (measured with and without it on {cost['images']} {cost['inputs']}: argmax agreement "
            f"{cost['agreement']:.1%}, logit SQNR {cost['sqnr_db']:.1f} dB)")
        notes.append("NOT exact: " + "; ".join(inexact) + measured)
    else:
        notes.append("exact up to float rounding")
    return f"{head}: " + "; ".join(notes)


def measure_substitution(source: Any, plans: list[_LayerPlan], example: Tensor, attention: str = "vitqc",
                         inputs: Tensor | None = None, count: int = 8) -> dict[str, Any]:
    """What the substitutions of :func:`inexact_parts` cost: the float program (:func:`float_program`, run
    eagerly) with them against the same program without them (vitqc's attention quantizers; vitqc's own weights
    where XNNPACK re-quantizes them), on ``inputs`` (images the caller has, e.g. calibration images) or, without
    them, on ``count`` random-normal inputs of the example's shape (not images: said in the result). Both run the
    same float kernels, so the difference is the substitution's alone."""
    if inputs is None:
        inputs = torch.randn(count, *example.shape[1:], generator=torch.Generator().manual_seed(0))
        kind = "random-normal inputs (no images given)"
    else:
        kind = "given inputs"
    reference = float_program(source, example)[0]
    substituted = float_program(source, example, attention=attention)[0]
    for plan in plans:
        if plan.device_weight == "qc8w-requantized":  # what PT2E's symmetric min-max observer will make of it
            linear = next(m for m in substituted.get_submodule(plan.path).modules() if isinstance(m, nn.Linear))
            with torch.no_grad():
                step = linear.weight.abs().amax(1, keepdim=True).clamp_min(2 ** -12) / 127
                linear.weight.copy_(torch.round(linear.weight / step) * step)
    with torch.no_grad():
        ref = torch.cat([reference(x) for x in inputs.split(8)])
        got = torch.cat([substituted(x) for x in inputs.split(8)])
    noise = (got - ref).pow(2).sum().clamp_min(1e-30)
    return {"images": len(inputs), "inputs": kind, "agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
            "sqnr_db": float(10 * torch.log10(ref.pow(2).sum() / noise))}


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
                     attention: str = "vitqc", exact: bool = False,
                     check_inputs: Tensor | None = None, announce: Any = print) -> PteResult:
    """Lower an artifact (or its path), a materialized GraphModule or an ExportedProgram to an XNNPACK ``.pte``
    (bytes in the result).

    ``fp32=True`` lowers the float model with vitqc's dequantized weights and no quantization (the baseline).
    ``batch``: the static batch size of the program. ``attention``: "vitqc" computes the attention matmuls on
    vitqc's codes, "fp32" in float (faster, not exact). ``exact=True`` refuses, in one line
    (``VitqcError``), any part of the scheme without an exact XNNPACK form (:func:`inexact_parts`); otherwise such a
    substitution is measured first (:func:`measure_substitution`, on ``check_inputs`` when given). ``announce``
    receives the one-line description before lowering (``None``: silent)."""
    try:
        from executorch.exir import to_edge_transform_and_lower
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise VitqcError(f"the executorch backend needs executorch and torchao ({exc.name} is missing)") from None
    gm, plans, example, manifest = float_program(source, example, activations=not fp32, attention=attention)
    inexact = [] if fp32 else inexact_parts(plans, attention)
    if inexact and exact:
        raise VitqcError(f"no exact XNNPACK form for: {'; '.join(inexact)} (lower without --exact / exact=True "
                         "to accept this substitution)")
    cost = measure_substitution(source, plans, example, attention, check_inputs) if inexact else None
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    gelus = (len(rational_gelu_nodes(gm.graph)), sum(n.target is torch.ops.aten.gelu.default for n in calls))
    norms = (sum(is_sqrt_rn(n) for n in calls),
             sum(n.target is torch.ops.aten.layer_norm.default for n in calls))
    substitution = "fp32 baseline: no quantization" if fp32 else describe_substitution(plans, manifest, attention, cost,
                                                                                       gelus, norms)
    if announce is not None:
        announce(substitution)
    example = example[:1].expand(batch, *example.shape[1:]).contiguous()
    with torch.no_grad():
        graph = fold_constants(xnnpack_supported_ops(_export(gm, example, dynamic=False).module()))
        if fp32:
            program = _export(graph, example, dynamic=False)
        else:
            prepared = prepare_pt2e(graph, _quantizer(plans))
            prepared(example)  # observers: fixed or weight min-max; dynamic activations need no calibration
            program = _export(convert_pt2e(prepared), example, dynamic=False)
        edge = to_edge_transform_and_lower(program, partitioner=[xnnpack_partitioner()])
        delegates = count_delegates(edge.exported_program().graph_module)
        portable = _portable_ops(edge.exported_program().graph_module)
        et = edge.to_executorch()
    layers = [{"path": p.path, "vitqc_weight_bits": p.source_bits, "vitqc_act": p.act,
               "device": "fp32" if fp32 or p.device_weight == "fp32" else p.device_weight + "+dynA8",
               "activation": "fp32" if fp32 else p.device_act}
              for p in plans]
    return PteResult(bytes(et.buffer), delegates, layers, substitution, fp32, portable, exact=not inexact, cost=cost)


def xnnpack_partitioner(without: Sequence[str] = ()):
    """XNNPACK's partitioner with every op config but :data:`SQRT_OUTSIDE_XNNPACK` and those named in ``without``
    (config class names: what is left out runs on ExecuTorch's portable kernels)."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    left_out = set(SQRT_OUTSIDE_XNNPACK) | set(without)
    return XnnpackPartitioner(configs=[c for c in ALL_PARTITIONER_CONFIGS if c.__name__ not in left_out])


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
    """Write the ``.pte`` (a temporary file, then a rename)."""
    from vitqc.archive import write_bytes

    return write_bytes(path, result.buffer, what=".pte")


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


@register_backend
class ExecutorchBackend:
    name = "executorch"
    summary = "ExecuTorch .pte for XNNPACK (phones, edge CPUs); says what it runs instead of the scheme"
    suffix = ".pte"

    @dataclass
    class Options:
        batch: int = 1  # static batch size of the program
        fp32: bool = False  # lower the float model (dequantized weights, no quantization) as a baseline
        attention: str = "vitqc"  # vitqc: attention matmuls on vitqc's codes; fp32: float (faster, not the scheme)
        exact: bool = False  # refuse what XNNPACK cannot compute exactly instead of substituting it
        limits: ClassVar[dict[str, str]] = {"batch": ">= 1"}

        def __post_init__(self) -> None:
            if self.attention not in ATTENTION:
                raise VitqcError(f"--attention must be {' or '.join(ATTENTION)}, got {self.attention!r}")

    def export(self, artifact: Any, path: Path, options: "ExecutorchBackend.Options", say) -> Path:
        result = lower_executorch(artifact, fp32=options.fp32, batch=options.batch, attention=options.attention,
                                  exact=options.exact, announce=say)
        written = save_pte(result, path)
        portable = ", ".join(f"{name} x{n}" for name, n in result.portable_ops.items()) or "none"
        say(f"{result.delegates} XNNPACK delegate segments; on portable kernels between them: {portable}")
        return written
