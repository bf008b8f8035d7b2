"""``vitqc.compile``: the whole job as a library call — load and capture a model, draw calibration images, run a
pipeline, measure the result on held-out images, and return a :class:`CompileResult` whose ``save`` writes the
artifact the command line writes.

    result = vitqc.compile("timm:deit_tiny_patch16_224", "joint-w4a4", calib="images:calib/", out="m.vitqc")
    result = vitqc.compile(model, "minmax-w8a8", images)            # an nn.Module and a tensor work too
    result.quantized(images); result.layers; result.measurement; result.save("m.vitqc")

:func:`run_pipeline` is the compiler proper (a graph in, the rewritten graph out) for passes and tests.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import fx, nn

from vitqc import distributed
from vitqc.errors import VitqcError
from vitqc.layers import LayerTable
from vitqc.passes.base import CompileContext
from vitqc.passes.manager import PassManager
from vitqc.pipeline import Pipeline, load_pipeline

__all__ = ["compile", "run_pipeline", "CompileResult", "seed_everything", "check_finite_weights",
           "default_artifact_path"]

# a zip of the quantized program (int8 codes: a quarter of the FP weights) and the FP one, plus JSON
_ARTIFACT_BYTES_PER_FP32_BYTE = 1.5


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _override_strings(overrides: dict[str, Any]) -> list[str]:
    """``calibrate__method="mse"`` or ``**{"calibrate.method": "mse"}`` -> ``["calibrate.method=mse"]``."""
    out = []
    for key, value in overrides.items():
        dotted = key if "." in key else key.replace("__", ".", 1)
        if "." not in dotted:
            raise VitqcError(f"override {key!r}: name it PASS__OPTION (or 'PASS.OPTION'), e.g. calibrate__method")
        text = value if isinstance(value, str) else _toml_literal(value)
        out.append(f"{dotted}={text}")
    return out


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_literal(v)}' for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_literal(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    return repr(value)


def check_finite_weights(module: nn.Module, what: str = "the model") -> None:
    """Refuse a model whose weights hold NaN or infinity, naming the first such tensor (a corrupt checkpoint
    or a diverged training run would otherwise surface as a confusing failure much later)."""
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, tensor in named:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise VitqcError(f"{what}'s {kind} {name!r} holds {bad} non-finite value(s) (NaN or inf): the weights "
                                 f"are corrupt or training diverged; fix the checkpoint before quantizing")


def run_pipeline(graph: fx.GraphModule, pipeline: str | Pipeline, calib: torch.Tensor | Sequence[torch.Tensor] | None,
                 *, reference: nn.Module | None = None, seed: int = 0, dump_graphs: str | Path | None = None,
                 quiet: bool = False, work_dir: str | Path | None = None, resume: bool = False,
                 device: str | torch.device = "cpu", strict: bool = False,
                 calib_source: Any = None) -> tuple[fx.GraphModule, CompileContext, list[dict]]:
    """Run ``pipeline`` over a captured ``graph`` (rewritten in place): the graph, the context the passes
    filled (layer table, records, ``record["coverage"]``: :mod:`vitqc.coverage`) and one statistics row per pass.
    ``strict``: a weight or attention matmul the pipeline cannot recognise is an error instead of a warning.
    ``calib_source``: the data-free :class:`vitqc.calib.Source` that made ``calib``, if one did
    (joint_optimize's data-free rounds ask it for more images)."""
    from vitqc.coverage import report as report_coverage
    from vitqc.passes.canonicalize import reference_copy

    pipe = load_pipeline(pipeline)
    passes = pipe.instantiate()
    reference = (reference_copy(graph) if reference is None else reference).to(device)
    ctx = CompileContext(calib=calib, reference=reference, seed=seed, quiet=quiet,
                         work_dir=None if work_dir is None else str(work_dir), resume=resume,
                         device=torch.device(device), pipeline=pipe, strict=strict, calib_source=calib_source)
    ctx.record["capture"] = dict(graph.meta.get("vitqc", {}))  # front end and why (vitqc.capture)
    manager = PassManager(passes, dump_dir=dump_graphs)
    gm = manager(graph, ctx).graph_module
    report_coverage(gm, ctx.record, quiet=quiet)
    stats = [vars(s) for s in manager.stats]
    gm.meta["vitqc"] = {**gm.meta.get("vitqc", {}), "pipeline": pipe.to_dict(), "record": ctx.record, "passes": stats,
                        "layers": ctx.layers.to_list()}
    return gm, ctx, stats


@dataclass
class CompileResult:
    """What :func:`compile` made: the quantized and FP graphs, what every pass recorded, the layer table and
    the measurements. ``save(path)`` writes the artifact (exactly what ``vitqc compile`` writes)."""

    quantized: fx.GraphModule
    reference: fx.GraphModule
    pipeline: Pipeline
    layers: LayerTable
    record: dict[str, Any]
    passes: list[dict]
    example: torch.Tensor
    model: dict[str, Any]  # where the model came from (JSON-able)
    preprocess: Any = None  # vitqc.data.Preprocess, when known
    calibration: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    measurement: dict[str, Any] | None = None
    preview: torch.Tensor | None = None  # the first calibration images, for the report
    seconds: float = 0.0
    path: Path | None = None
    _programs: tuple[Any, Any] | None = field(default=None, repr=False)

    @property
    def coverage(self) -> dict[str, Any] | None:
        return self.record.get("coverage")

    def programs(self) -> tuple[torch.export.ExportedProgram, torch.export.ExportedProgram]:
        """The quantized and FP graphs as ``torch.export`` programs (what the artifact stores), made once."""
        from vitqc.artifact import export_program

        if self._programs is None:
            self._programs = (export_program(self.quantized.cpu(), self.example),
                              export_program(self.reference.cpu(), self.example))
        return self._programs

    def measure(self, data: Any, on: str, description: str, total: int | None = None, quiet: bool = False) -> dict:
        """Compare the quantized program with the FP one over ``data`` (batches or (batch, labels) pairs):
        top-1 when labelled, argmax agreement, per-layer SQNR. Stored as ``measurement`` (and in the manifest)."""
        from vitqc.evaluate import compare
        from vitqc.quant.rational_gelu import fast_rational_gelus

        q_program, ref_program = self.programs()
        result = compare(ref_program.module(), fast_rational_gelus(q_program.module()), data,
                         [layer.path for layer in self.layers.weight_layers], total=total, quiet=quiet)
        self.measurement = {"on": on, "data": description, **result.to_dict()}
        return self.measurement

    def manifest(self) -> dict[str, Any]:
        from vitqc.artifact import package_versions

        summary = {} if self.measurement is None else {"measurement": self.measurement}
        return {
            "model": self.model, "pipeline": self.quantized.meta["vitqc"]["pipeline"], "overrides": self.overrides,
            "seed": self.seed, "calibration": self.calibration,
            "preprocess": None if self.preprocess is None else self.preprocess.to_dict(),
            "input_shape": [int(d) for d in self.example.shape[1:]], "layers": self.layers.to_list(),
            "coverage": self.coverage, "passes": self.passes, "record": self.record, "summary": summary,
            "versions": package_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "compile_seconds": round(self.seconds, 1),
        }

    def save(self, path: str | Path) -> Path:
        """Write the artifact (temporary file, then rename); returns its path."""
        from vitqc.artifact import save_artifact

        if self.preprocess is None:
            raise VitqcError("the artifact records how images become inputs: compile with preprocess=Preprocess(...) "
                             "(or a model that carries its data config) before saving")
        from vitqc.report import PREVIEW_MEMBER, preview_png

        q_program, ref_program = self.programs()
        manifest = self.manifest()
        extra = {}
        if self.preview is not None and self.preprocess.channels in (1, 3):
            extra[PREVIEW_MEMBER] = preview_png(self.preview, self.preprocess)
            manifest["calibration"] = {**manifest["calibration"], "preview_images": min(len(self.preview), 16)}
        self.path = save_artifact(path, q_program, ref_program, manifest, extra)
        return self.path


def default_artifact_path(model: str, pipeline: str | Pipeline) -> Path:
    """``<model stem>-<pipeline name>.vitqc`` in the current directory."""
    stem = "demo" if model == "demo" else Path(str(model).split(":")[-1]).stem
    return Path(f"{stem}-{load_pipeline(pipeline).name}.vitqc")


def _load(model: Any, preprocess: Any, model_options: dict[str, Any]):
    """(LoadedModel, Preprocess or None) for a model spec (``demo``, ``timm:NAME``, a path ...), a LoadedModel or
    an nn.Module."""
    from vitqc.models import LoadedModel, load_model_and_preprocess

    if isinstance(model, str):
        loaded, default_preprocess = load_model_and_preprocess(model, **model_options)
        return loaded, preprocess or default_preprocess
    if model_options:
        raise VitqcError(f"{', '.join(sorted(model_options))} apply to a model named by a spec string, not to an "
                         f"{type(model).__name__}")
    if isinstance(model, LoadedModel):
        return model, preprocess or model.preprocess
    if isinstance(model, nn.Module):
        return LoadedModel(module=model, source={"form": "python", "class": type(model).__qualname__}), preprocess
    raise VitqcError(f"cannot compile a {type(model).__name__}: give a model spec (timm:NAME, FILE.pt, ...) or an "
                     f"nn.Module")


def _calibration(calib: Any, loaded, preprocess, *, size: int | None, holdout: int | None, seed: int,
                 class_names: Any, diffusion: str | None, device: Any, quiet: bool):
    from vitqc.calib.spec import Calibration, draw

    if calib is None:
        return None
    if isinstance(calib, Calibration):
        return calib
    if isinstance(calib, (str, Path)):
        if preprocess is None:
            raise VitqcError(f"--calib {calib}: the model does not say how images become its inputs: give --img-size "
                             f"(and --mean/--std), or preprocess=Preprocess(...)")
        return draw(str(calib), model=loaded.module, preprocess=preprocess, size=size, holdout=holdout, seed=seed,
                    class_names=class_names, diffusion=diffusion, device=device, quiet=quiet)
    images = calib if isinstance(calib, torch.Tensor) else torch.cat(list(calib))
    if size is not None:
        images = images[:size + (holdout or 0)]
    held = holdout or 0  # a tensor the user gave is used whole unless they ask to hold some out
    if held >= len(images):
        raise VitqcError(f"holdout {held} leaves none of the {len(images)} calibration images for the passes")
    return Calibration(images[:len(images) - held], images[len(images) - held:] if held else None,
                       {"source": "tensor"})


def _eval_source(eval_data: Any, loaded, preprocess, limit: int | None):
    """(batches, total, description) for the labelled evaluation, or None."""
    if eval_data is not None:
        from vitqc.data import ImageFolderData, iterate_labeled

        if preprocess is None:
            raise VitqcError("eval data needs the model's preprocessing: give --img-size (and --mean/--std)")
        data = ImageFolderData(eval_data, require_classes=True)
        total = min(limit, len(data.samples)) if limit else len(data.samples)
        return iterate_labeled(data, preprocess, limit=limit), total, str(eval_data)
    if loaded.source.get("form") == "demo":
        from vitqc import demo

        batches = list(demo.demo_eval_batches())
        return batches, sum(len(y) for _, y in batches), "demo test split"
    return None


def compile(model: nn.Module | str | Any, pipeline: str | Pipeline, calib: Any = None, *,
            preprocess: Any = None, calib_size: int | None = None, holdout: int | None = None,
            eval_data: str | Path | None = None, eval_limit: int | None = None, out: str | Path | None = None,
            seed: int = 0, set: Sequence[str] = (), device: str | torch.device = "cpu",
            work_dir: str | Path | None = None, resume: bool = False, dump_graphs: str | Path | None = None,
            class_names: str | Path | None = None, diffusion: str | None = None, example: torch.Tensor | None = None,
            reference: nn.Module | None = None, measure: bool | None = None, strict: bool = False, quiet: bool = False,
            model_kwargs: dict[str, Any] | None = None, checkpoint: str | Path | None = None,
            pretrained: bool = False, **overrides: Any) -> CompileResult:
    """Quantize ``model`` with ``pipeline`` and return a :class:`CompileResult`.

    ``model``: a spec string (``demo``, ``timm:NAME``, ``FILE.pt``, ``FILE.pt2``, ``FILE.py:factory``; with
    ``model_kwargs``, ``checkpoint``, ``pretrained``), a :class:`vitqc.models.LoadedModel` or an ``nn.Module``.
    ``pipeline``: a built-in name, a TOML path, a one-line text or a :class:`Pipeline`; its options are
    overridden by keyword (``calibrate__method="mse"``) or ``set=["calibrate.method=mse"]``.
    ``calib``: a ``--calib`` spec (``images:DIR``, ``inversion``, ...; ``calib_size`` images, ``holdout`` more held
    out for measurements), preprocessed images (a tensor or a list of batches, used whole unless ``holdout``
    is given), or a :class:`vitqc.calib.spec.Calibration`. The demo model defaults to its own train split.
    ``preprocess``: how image files become inputs (default: the model's own data config).
    Measurements run on ``eval_data`` (labelled ImageFolder; the demo's test split for the demo), else on the
    held-out images; ``measure=True`` falls back to the calibration images themselves (with a warning: they set
    the ranges), ``measure=False`` skips them; by default they run when there is something held out.
    ``strict``: a weight or attention matmul vitqc does not recognise is an error, not a warning (coverage in
    ``result.coverage``, :mod:`vitqc.coverage`). With ``out`` the output path
    is checked before any long work and the artifact is written there. Long passes checkpoint into
    ``work_dir``; ``resume`` continues from there.
    """
    from vitqc.archive import check_free_space, check_output_path
    from vitqc.capture import capture
    from vitqc.console import warn
    from vitqc.from_export import is_exported_module
    from vitqc.passes.canonicalize import reference_copy

    started = time.time()
    main_rank = distributed.is_main()  # torchrun's RANK (the group starts below); True in one process
    if calib is None and example is None and not (model == "demo" or isinstance(model, fx.GraphModule)):
        raise VitqcError("calibration images are required: --calib images:DIR (no labels needed), or without data "
                         "--calib inversion (in Python: calib=tensor or calib='images:DIR')")
    if resume and main_rank and (work_dir is None or not Path(work_dir).is_dir()):
        raise VitqcError(f"--resume: no work directory {str(work_dir) if work_dir else ''!r}; pass the --work-dir "
                         f"of the interrupted run (its default is <out>.work)")
    if out is not None and main_rank:
        check_output_path(out, "artifact")
    pipe = load_pipeline(pipeline).with_overrides(list(set) + _override_strings(overrides))
    # under torchrun: one process per device (cuda:LOCAL_RANK), joint_optimize data-parallel; rank 0 alone prints,
    # measures and writes (vitqc.distributed)
    device = distributed.resolve_device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VitqcError("--device cuda: no CUDA device is available here; use --device cpu")
    distributed.init_from_env(distributed.backend_for(device))
    quiet = quiet or not main_rank
    dump_graphs = dump_graphs if main_rank else None
    seed_everything(seed)
    model_options = {k: v for k, v in (("model_kwargs", model_kwargs), ("checkpoint", checkpoint),
                                       ("pretrained", pretrained)) if v}
    loaded, preprocess = _load(model, preprocess, model_options)
    module = loaded.module
    captured = isinstance(module, fx.GraphModule) and not is_exported_module(module)  # a torch.export program is not
    if not captured:
        check_finite_weights(module)
    if out is not None and main_rank:
        fp32_bytes = sum(t.numel() * 4 for t in module.state_dict().values() if isinstance(t, torch.Tensor))
        check_free_space(out, int(fp32_bytes * _ARTIFACT_BYTES_PER_FP32_BYTE) + (1 << 20), "artifact")
    if calib is None and loaded.source.get("form") == "demo":
        calib = "demo"
    has_eval = eval_data is not None or loaded.source.get("form") == "demo"
    calibration = _calibration(calib, loaded, preprocess, size=calib_size,
                               holdout=0 if has_eval and holdout is None else holdout, seed=seed,
                               class_names=class_names, diffusion=diffusion, device=device, quiet=quiet)
    if example is None:
        if calibration is None:
            raise VitqcError("vitqc.compile needs calibration images (calib=...) or an `example` input to trace "
                             "the model; on the command line: --calib images:DIR, or --calib inversion without data")
        example = calibration.images[:1]
    if captured:
        graph = module
    else:
        on = next(module.parameters(), None)  # a model moved by an earlier compile on a GPU
        graph = capture(module, example if on is None else example.to(on.device), quiet=quiet)
        with torch.no_grad():
            fp_out = graph(example if on is None else example.to(on.device))
        if isinstance(fp_out, torch.Tensor) and not bool(torch.isfinite(fp_out).all()):
            raise VitqcError("the FP model's output on a calibration image is not finite (NaN or inf): the model or "
                             "its preprocessing is broken; check it with `vitqc eval MODEL --data DIR`")
    graph = graph.cpu()
    if reference is None:
        reference = reference_copy(graph)  # the passes rewrite `graph` in place
    quantized, ctx, stats = run_pipeline(
        graph, pipe, None if calibration is None else calibration.images, reference=reference, seed=seed,
        dump_graphs=dump_graphs, quiet=quiet, work_dir=work_dir, resume=resume, device=device, strict=strict,
        calib_source=None if calibration is None else calibration.source)
    result = CompileResult(
        quantized=quantized.cpu(), reference=reference.cpu(), pipeline=pipe, layers=ctx.layers, record=ctx.record,
        passes=stats, example=example.cpu(), model=loaded.source, preprocess=preprocess,
        calibration={} if calibration is None else calibration.record, seed=seed,
        overrides=list(set) + _override_strings(overrides),
        preview=None if calibration is None else calibration.images[:16].cpu())
    if measure is not False and main_rank:
        evaluation = _eval_source(eval_data, loaded, preprocess, eval_limit)
        if evaluation is not None:
            batches, total, name = evaluation
            result.measure(batches, "eval", name, total=total, quiet=quiet)
        elif calibration is not None and calibration.holdout is not None:
            result.measure(calibration.holdout.split(32), "held-out",
                           f"{len(calibration.holdout)} held-out calibration images", quiet=quiet)
        elif calibration is not None and measure:
            warn("measuring on the calibration images themselves: they set the ranges, so the figures flatter the "
                 "model; give --eval-data DIR or hold images out (--holdout N)")
            result.measure(calibration.images.split(32), "calibration",
                           f"{len(calibration.images)} calibration images (not held out)", quiet=quiet)
    result.seconds = time.time() - started
    if out is not None and main_rank:
        result.save(out)
    return result
