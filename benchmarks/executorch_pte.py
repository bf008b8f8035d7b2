"""The ExecuTorch faithfulness table: every built-in pipeline x model, each XNNPACK ``.pte`` against the artifact
it was lowered from.

    python benchmarks/executorch_pte.py table [--models vit_tiny_cifar10,vits14_cifar10] [--pipelines all|a,b,...]
        [--limit 1000] [--batch 8] [--runs 20] [--threads 1] [--calib-size N]
        [--set MODEL:PASS.OPTION=VALUE ...] [--work DIR] [--result NAME] [--relower]
    python benchmarks/executorch_pte.py retime [--work DIR] [--runs 20] [--result NAME]
    python benchmarks/executorch_pte.py profile --models vit_tiny_cifar10 --pipelines minmax-w8a8 --work DIR
        [--runs 20] [--result NAME]
    python benchmarks/executorch_pte.py static-output --models vit_tiny_cifar10 --pipelines minmax-w8a8
        [--limit 10000] [--result NAME]
    python benchmarks/executorch_pte.py portable-ops --models vits14_cifar10 --pipelines minmax-w8a8
        [--without GeluConfig;SoftmaxConfig;MeanDimConfig] [--limit 1000] [--result NAME]
    python benchmarks/executorch_pte.py float-sensitivity --models vits14_cifar10 --pipelines minmax-w8a8
        [--limit 1000] [--result NAME]
    python benchmarks/executorch_pte.py --time BASELINE.pte OTHER.pte ... [--runs 30] [--tag TAG]

Per cell (model, pipeline): the pipeline is compiled with the model's calibration images (cifar10/calib, all
1,000 unless --calib-size) and saved as an artifact in --work (kept: a rerun, or --relower after a change to the
lowering, reuses it); ``--set MODEL:PASS.OPTION=VALUE`` changes an option for that model's pipelines that have the
pass (e.g. fewer joint_optimize iterations for vits14, recorded in the cell). The artifact is lowered with
``vitqc.backends.executorch.lower_executorch`` (its one-line description recorded), and on ``--limit`` test images
(cifar10/test, spread over the classes) the cell records:

* argmax agreement of the ``.pte`` (``executorch.runtime``) with the artifact's program, and top-1 of both;
* the float floor: agreement with the artifact of the artifact's own program after the ``.pte``'s graph rewrites
  (``xnnpack_supported_ops``: ATen's LayerNorm as means and rsqrt, the rest exact; GELU and square roots as the
  program computes them), run in torch; how far one change of float rounding order alone moves this model's argmax;
* size: the ``.pte`` and the fp32 ``.pte`` in bytes, ``.pte`` bytes per weight of the weight layers, and an
  estimate of the weight storage alone: ``(pte - fp32 pte) / weights + 4`` (the fp32 file is the same graph with
  4-byte weights; scales and the rest are counted in);
* latency: medians of ``--runs`` calls at the static batch ``--batch``, the fp32 ``.pte`` and the quantized one
  interleaved after 3 warm-up calls each (same machine load). The fp32 ``.pte`` (vitqc's dequantized weights, no
  quantization) is lowered once per model from its first artifact; weights' values do not change its time.

Each cell is written to benchmarks/results/NAME.json when done; a rerun skips recorded cells (``--relower``: redo
the lowering, the fp32 baseline's too, and the measurements from the kept artifacts). ``--time`` re-times ``.pte`` files, calls interleaved,
each as a ratio to the first. ``profile`` says where a cell's ``.pte`` and its fp32 ``.pte`` spend their time, and
what speedup any int8 GEMM could give at most (:func:`profile`). ``static-output`` measures why the lowering does not use XNNPACK's static int8 linear
(:func:`static_output`).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

import torch

from common import (RESULTS, Timer, cpu_model, decode_eval_set, folder_batches, interleaved_ms, load_cells,
                    load_reference_model, require_shared, write_result)

DEFAULT_WORK = Path(os.environ.get("TMPDIR", "/tmp")) / "vitqc-pte-table"


def executorch_threads(n: int) -> None:
    """ExecuTorch's threadpool, which XNNPACK's kernels share, to ``n`` threads (it starts with one per core).
    Before any program is loaded: resetting it under a loaded program corrupts memory (executorch 1.5)."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(n)


def interleaved(baseline, candidate, x: torch.Tensor, runs: int) -> tuple[float, float]:
    """Medians (ms) of two ``.pte`` methods called alternately on ``x`` after 3 warm-up calls each."""
    ms = interleaved_ms({"baseline": lambda: baseline.execute([x]), "candidate": lambda: candidate.execute([x])}, runs)
    return ms["baseline"], ms["candidate"]


def time_files(paths: list[str], runs: int, tag: str) -> None:
    from vitqc.backends.executorch import load_pte

    methods = {p: load_pte(p) for p in paths}
    x = torch.randn(*methods[paths[0]].metadata.input_tensor_meta(0).sizes())
    ms = interleaved_ms({p: (lambda m=m: m.execute([x])) for p, m in methods.items()}, runs)
    rows = [{"pte": p, "bytes": Path(p).stat().st_size, "ms": round(ms[p], 2),
             "speedup_vs_first": round(ms[paths[0]] / ms[p], 2)} for p in paths]
    for r in rows:
        print(f"| {r['pte']} | {r['ms']} ms | x{r['speedup_vs_first']} | {r['bytes'] / 1e6:.2f} MB |")
    write_result("executorch_pte", {"timed": rows, "runs": runs, "cpu": cpu_model(), "cores": os.cpu_count(),
                                    "load_avg": os.getloadavg()}, tag)


def model_sets(args, name: str) -> list[str]:
    """The ``--set`` options given for ``name`` (``MODEL:PASS.OPTION=VALUE``)."""
    out = []
    for item in args.set:
        model, _, option = item.partition(":")
        if not option:
            raise SystemExit(f"--set {item!r}: write MODEL:PASS.OPTION=VALUE")
        if model == name:
            out.append(option)
    return out


def artifact_for(module, pre, calib, name: str, pipeline: str, sets: list[str], work: Path) -> tuple[Path, dict]:
    """The compiled artifact of ``pipeline`` for this model in ``work`` (compiled and saved if absent)."""
    import vitqc
    from vitqc.pipeline import load_pipeline

    passes = {s.name for s in load_pipeline(pipeline).steps}
    mine = [s for s in sets if s.split(".", 1)[0] in passes]
    path = work / f"{name}-{pipeline}{'-' + '-'.join(sorted(mine)) if mine else ''}.vitqc".replace("=", "_")
    info = {"set": mine}
    if path.exists():
        return path, {**info, "compile_s": None}
    with Timer() as tc:
        vitqc.compile(copy.deepcopy(module), pipeline, calib, quiet=True, set=mine, preprocess=pre).save(path)
    print(f"  compiled in {tc.seconds:.0f}s -> {path}", flush=True)
    return path, {**info, "compile_s": round(tc.seconds)}


@torch.no_grad()
def measure(art_path: Path, fp32_path: Path, module, test, batch: int, runs: int, work: Path) -> dict:
    from vitqc.artifact import load_artifact
    from vitqc.backends.executorch import load_pte, lower_executorch, run_pte, save_pte
    from vitqc.backends.xnnpack_rewrite import xnnpack_supported_ops
    from vitqc.quant.pairwise_layer_norm import sqrt_rn
    from vitqc.quant.rational_gelu import rational_gelu, rational_gelu_nodes

    art = load_artifact(art_path)
    with Timer() as tl:
        result = lower_executorch(art, batch=batch, announce=lambda line: print(f"  {line}", flush=True))
    pte = save_pte(result, work / f"{art_path.stem}-b{batch}.pte")
    method, fp32 = load_pte(pte), load_pte(fp32_path)
    program = art.quantized
    example = test[0][0][:batch].contiguous()
    exported = torch.export.export(program, (example,), strict=False).module()
    own_gelu = bool(rational_gelu_nodes(exported.graph))
    rewritten = xnnpack_supported_ops(exported)
    for node in rewritten.graph.nodes:  # in torch, the kernels the .pte's compute: XNNPACK's GELU is the
        if node.op != "call_function":  # program's own (when it has that form); the portable sqrt is rounded right
            continue
        if node.target is torch.ops.aten.gelu.default and own_gelu:
            node.target = rational_gelu
        elif node.target is torch.ops.aten.sqrt.default:
            node.target = sqrt_rn
    rewritten.recompile()
    n = agree = agree_floor = right_art = right_pte = right_fp = 0
    with Timer() as te:
        for x, y in test:
            ref = program(x).argmax(1)
            got = run_pte(method, x, batch=batch).argmax(1)
            floor = run_pte(_Eager(rewritten), x, batch=batch).argmax(1)
            n += len(y)
            agree += int((got == ref).sum())
            agree_floor += int((floor == ref).sum())
            right_art += int((ref == y).sum())
            right_pte += int((got == y).sum())
            right_fp += int((module(x).argmax(1) == y).sum())
    fp32_ms, pte_ms = interleaved(fp32, method, example, runs)
    weights = sum(math.prod(shape) for shape in _weight_shapes(art))
    return {"images": n, "agreement": agree / n, "floor_agreement": agree_floor / n,
            "top1_artifact": right_art / n, "top1_pte": right_pte / n, "top1_fp": right_fp / n,
            "exact": result.exact, "substitution": result.substitution, "delegates": result.delegates,
            "portable_ops": result.portable_ops, "pte_bytes": pte.stat().st_size,
            "fp32_pte_bytes": fp32_path.stat().st_size, "weight_params": weights,
            "pte_bytes_per_weight": pte.stat().st_size / weights,
            # the fp32 .pte holds the same graph with 4-byte weights: what the quantized file has beyond the rest
            "weight_bytes_per_weight_est": (pte.stat().st_size - fp32_path.stat().st_size) / weights + 4,
            "batch": batch, "pte_ms": round(pte_ms, 2), "fp32_pte_ms": round(fp32_ms, 2),
            "speedup_vs_fp32_pte": round(fp32_ms / pte_ms, 2), "lower_s": round(tl.seconds), "eval_s": round(te.seconds),
            "load_avg": os.getloadavg()}


class _Eager:
    """A module behind ``.execute([x])``, so ``run_pte`` batches it as it batches a ``.pte`` method."""

    def __init__(self, module) -> None:
        self.module = module

    def execute(self, inputs):
        return [self.module(inputs[0])]


def _weight_shapes(art) -> list[tuple[int, ...]]:
    state = {**art.quantized_program.state_dict, **art.quantized_program.constants}
    return [tuple(v.shape) for k, v in state.items() if k.endswith(".weight_codes")]


@torch.no_grad()
def static_output(args) -> None:
    """What XNNPACK's static int8 linear (PT2E's static recipe) would add to vitqc's program: XNNPACK's static
    linear needs an int8 output grid, so every quantized linear and patch GEMM gets one (per tensor, min-max over
    the calibration images), simulated in torch on vitqc's own program; argmax agreement with the program as it is."""
    import vitqc
    from vitqc.quant.modules import INT_LAYERS

    require_shared()
    torch.set_num_threads(args.threads)
    module, pre, eval_dir, calib_dir, _ = load_reference_model(args.models)
    calib = folder_batches(calib_dir, pre, args.calib_size)
    test = decode_eval_set(eval_dir, pre, limit=args.limit, batch_size=250)
    rows = []
    for pipeline in args.pipelines.split(","):
        gm = vitqc.compile(copy.deepcopy(module), pipeline, calib, quiet=True).quantized
        layers = [(name, m) for name, m in gm.named_modules() if isinstance(m, INT_LAYERS)]
        ranges: dict[str, tuple[float, float]] = {}

        def observe(name):
            def hook(m, inputs, out):
                lo, hi = ranges.get(name, (0.0, 0.0))
                ranges[name] = (min(lo, float(out.min())), max(hi, float(out.max())))
            return hook

        def int8_output(name):
            lo, hi = ranges[name]
            step = (hi - lo) / 255
            zero = round(-lo / step) - 128
            return lambda m, inputs, out: (torch.clamp(torch.round(out / step) + zero, -128, 127) - zero) * step

        hooks = [m.register_forward_hook(observe(name)) for name, m in layers]
        for c in calib:
            gm(c)
        for h in hooks:
            h.remove()
        refs = [gm(x).argmax(1) for x, _ in test]
        hooks = [m.register_forward_hook(int8_output(name)) for name, m in layers]
        n = agree = right = right_static = 0
        for (x, y), ref in zip(test, refs):
            got = gm(x).argmax(1)
            n += len(y)
            agree += int((got == ref).sum())
            right += int((ref == y).sum())
            right_static += int((got == y).sum())
        for h in hooks:
            h.remove()
        row = {"model": args.models, "pipeline": pipeline, "layers": len(layers), "images": n,
               "agreement_with_vitqc": agree / n, "top1_vitqc": right / n, "top1_static_output": right_static / n}
        rows.append(row)
        print(row, flush=True)
        write_result(args.result, {"rows": rows, "cpu": cpu_model(), "threads": args.threads})


def table(args) -> None:
    from vitqc.backends.executorch import lower_executorch, save_pte
    from vitqc.pipeline import builtin_pipelines

    require_shared()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cells = load_cells(args.result)
    names = sorted(builtin_pipelines()) if args.pipelines == "all" else args.pipelines.split(",")
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__}
    for model_name in args.models.split(","):
        module, pre, eval_dir, calib_dir, _ = load_reference_model(model_name)
        calib = folder_batches(calib_dir, pre, args.calib_size)
        test = decode_eval_set(eval_dir, pre, limit=args.limit, batch_size=100)
        sets = model_sets(args, model_name)
        fp32_path = work / f"{model_name}-fp32-b{args.batch}.pte"
        fp32_stale = args.relower  # --relower lowers the baseline again too (once per model)
        for pipeline in names:
            key = f"{model_name}/{pipeline}"
            if key in cells and not args.relower:
                print(f"{key}: recorded earlier", flush=True)
                continue
            print(f"{key}", flush=True)
            art_path, info = artifact_for(module, pre, calib, model_name, pipeline, sets, work)
            if "compile_s" in cells.get(key, {}) and info["compile_s"] is None:
                info["compile_s"] = cells[key]["compile_s"]  # compiled by an earlier run
            if fp32_stale or not fp32_path.exists():
                save_pte(lower_executorch(art_path, fp32=True, batch=args.batch, announce=None), fp32_path)
                fp32_stale = False
            cell = {"model": model_name, "pipeline": pipeline, **info, "calib_images": sum(len(c) for c in calib),
                    **measure(art_path, fp32_path, module, test, args.batch, args.runs, work)}
            cells[key] = cell
            cells.update({k: v for k, v in load_cells(args.result).items() if k not in cells})
            write_result(args.result, {"cells": cells, "machine": machine, "args": vars(args)})
            print(f"  agreement {cell['agreement']:.2%} (floor {cell['floor_agreement']:.2%}), top-1 .pte "
                  f"{cell['top1_pte']:.2%} / artifact {cell['top1_artifact']:.2%}, {cell['pte_bytes'] / 1e6:.2f} MB "
                  f"({cell['pte_bytes_per_weight']:.2f} B/weight), x{cell['speedup_vs_fp32_pte']} vs fp32 .pte", flush=True)
    print_table(cells)


def recorded_ptes(cells: dict, work: Path, wanted=lambda cell: True):
    """``(key, cell, its .pte, its model's fp32 .pte)`` for each recorded table cell ``wanted`` whose two files are
    in ``work``; a cell whose files are not is said and skipped."""
    for key, cell in cells.items():
        if not wanted(cell):
            continue
        stem = f"{cell['model']}-{cell['pipeline']}{'-' + '-'.join(sorted(cell['set'])) if cell['set'] else ''}"
        pte = work / f"{stem.replace('=', '_')}-b{cell['batch']}.pte"
        fp32 = work / f"{cell['model']}-fp32-b{cell['batch']}.pte"
        if not (pte.exists() and fp32.exists()):
            print(f"{key}: {pte if not pte.exists() else fp32} is not in --work; skipped", flush=True)
            continue
        yield key, cell, pte, fp32


def op_profile(path: Path, runs: int) -> dict:
    """Where a ``.pte``'s time goes, from an ETDump of ``runs`` calls on random input: per op class (XNNPACK's
    operator names without their index, the portable kernels' names), the sum over its ops of each op's median ms,
    and the whole call's median (``execute``). Profiling adds a little to every op, so the classes' shares are
    what to read, not their sum."""
    import re
    import tempfile
    import warnings

    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(str(path), enable_etdump=True)
    method = program.load_method("forward")
    x = torch.randn(*method.metadata.input_tensor_meta(0).sizes())
    for _ in range(runs):
        method.execute([x])
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Inspector's note that no debug buffer (tensor values) was kept
        program.write_etdump_result_to_file(f"{tmp}/p.etdp", f"{tmp}/debug.bin")
        frame = Inspector(etdump_path=f"{tmp}/p.etdp").to_dataframe()
    frame = frame[frame.event_block_name == "Execute"]
    classes: dict[str, float] = {}
    for name, ms in zip(frame.event_name, frame["p50 (ms)"]):
        if name not in ("Method::execute", "DELEGATE_CALL"):
            cls = re.sub(r" #\d+$", "", name)
            classes[cls] = classes.get(cls, 0.0) + float(ms)
    execute = float(frame[frame.event_name == "Method::execute"]["p50 (ms)"].sum())
    return {"execute_ms": round(execute, 3), "ops_ms": round(sum(classes.values()), 3),
            "classes_ms": {k: round(v, 3) for k, v in sorted(classes.items(), key=lambda kv: -kv[1])}}


def profile(args) -> None:
    """Per recorded cell of ``--models`` x ``--pipelines`` with its files in ``--work``: :func:`op_profile` of its
    ``.pte`` and of its model's fp32 ``.pte``, and the most any int8 GEMM could give (Amdahl): the fp32 call's
    time over its time without its linears (``Fully Connected``), and without its batched matmuls too."""
    torch.set_num_threads(args.threads)
    cells, work = load_cells("executorch_pte-table"), Path(args.work)
    out = load_cells(args.result)
    models, names = args.models.split(","), args.pipelines.split(",")
    baselines: dict[Path, dict] = {}  # one profile of each fp32 .pte, for all its cells
    for key, cell, pte, fp32 in recorded_ptes(cells, work, lambda c: c["model"] in models and
                                              (args.pipelines == "all" or c["pipeline"] in names)):
        if fp32 not in baselines:
            baselines[fp32] = op_profile(fp32, args.runs)
        base, quant = baselines[fp32], op_profile(pte, args.runs)
        linear = sum(v for k, v in base["classes_ms"].items() if k.startswith("Fully Connected"))
        bmm = sum(v for k, v in base["classes_ms"].items() if k.startswith("Batch Matrix Multiply"))
        row = {"model": cell["model"], "pipeline": cell["pipeline"], "batch": cell["batch"], "fp32": base,
               "quantized": quant, "fp32_linear_share": round(linear / base["execute_ms"], 3),
               "fp32_bmm_share": round(bmm / base["execute_ms"], 3),
               "bound_if_linears_free": round(base["execute_ms"] / (base["execute_ms"] - linear), 2),
               "bound_if_all_gemms_free": round(base["execute_ms"] / (base["execute_ms"] - linear - bmm), 2)}
        out[key] = row
        print(f"{key}: linears {row['fp32_linear_share']:.0%} and batched matmuls {row['fp32_bmm_share']:.0%} of the "
              f"fp32 .pte's time: at most x{row['bound_if_linears_free']} with free linears, "
              f"x{row['bound_if_all_gemms_free']} with every GEMM free", flush=True)
        write_result(args.result, {"cells": out, "runs": args.runs, "threads": args.threads,
                                   "load_avg": os.getloadavg()})


def retime(args) -> None:
    """Time every recorded cell's ``.pte`` again against its model's fp32 ``.pte`` (interleaved, ``--runs``), on a
    quiet machine: the cells' latency fields are replaced and the load average recorded with them."""
    from vitqc.backends.executorch import load_pte

    torch.set_num_threads(args.threads)
    work, cells = Path(args.work), load_cells(args.result)
    for key, cell, pte, fp32 in recorded_ptes(cells, work):
        method, baseline = load_pte(pte), load_pte(fp32)
        x = torch.randn(*baseline.metadata.input_tensor_meta(0).sizes())
        fp32_ms, pte_ms = interleaved(baseline, method, x, args.runs)
        cell.update({"pte_ms": round(pte_ms, 2), "fp32_pte_ms": round(fp32_ms, 2),
                     "speedup_vs_fp32_pte": round(fp32_ms / pte_ms, 2), "load_avg": os.getloadavg(), "retimed": True,
                     "executorch_threads": args.threads})
        print(f"{key}: x{cell['speedup_vs_fp32_pte']} ({pte_ms:.2f} / {fp32_ms:.2f} ms)", flush=True)
        write_result(args.result, {**_result_header(args.result), "cells": cells,
                                   "retimed_by": "python " + " ".join(["benchmarks/executorch_pte.py", *sys.argv[1:]])})
    print_table(cells)


def _result_header(name: str) -> dict:
    """A results file's fields other than its cells (kept when the cells are rewritten)."""
    path = RESULTS / f"{name}.json"
    return {k: v for k, v in json.loads(path.read_text()).items() if k != "cells"} if path.exists() else {}


def print_table(cells: dict) -> None:
    print("\n| model | pipeline | options | images | .pte vs artifact | float floor | top-1 .pte / artifact (FP) | "
          "size MB (fp32) | B/weight (weights alone, est.) | ms .pte / fp32 .pte (batch) | speedup | exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c in cells.values():
        print(f"| {c['model']} | {c['pipeline']} | {', '.join(c['set']) or 'defaults'} | {c['images']} | "
              f"{c['agreement']:.2%} | {c['floor_agreement']:.2%} | {c['top1_pte']:.2%} / {c['top1_artifact']:.2%} "
              f"({c['top1_fp']:.2%}) | {c['pte_bytes'] / 1e6:.2f} ({c['fp32_pte_bytes'] / 1e6:.2f}) | "
              f"{c['pte_bytes_per_weight']:.2f} ({c['weight_bytes_per_weight_est']:.2f}) | {c['pte_ms']} / {c['fp32_pte_ms']} ({c['batch']}) | "
              f"x{c['speedup_vs_fp32_pte']} | {'yes' if c['exact'] else 'no'} |")


@torch.no_grad()
def portable_ops(args) -> None:
    """Which of XNNPACK's float ops moves the argmax: the table's artifact for one model and pipeline (from --work,
    compiled if absent) lowered once as usual and once per op class left out of the delegate (portable kernels
    instead: ``--without GeluConfig;SoftmaxConfig;MeanDimConfig``), each ``.pte``'s argmax agreement with the
    artifact on the same test images."""
    import vitqc.backends.executorch as vx

    from vitqc.artifact import load_artifact
    from vitqc.backends.executorch import load_pte, lower_executorch, run_pte, save_pte
    require_shared()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (model_name,), (pipeline,) = args.models.split(","), args.pipelines.split(",")
    module, pre, eval_dir, calib_dir, _ = load_reference_model(model_name)
    calib = folder_batches(calib_dir, pre, args.calib_size)
    art_path, info = artifact_for(module, pre, calib, model_name, pipeline, model_sets(args, model_name), work)
    art = load_artifact(art_path)
    test = decode_eval_set(eval_dir, pre, limit=args.limit, batch_size=100)
    refs = [art.quantized(x).argmax(1) for x, _ in test]
    real = vx.xnnpack_partitioner
    rows = []
    for left_out in [[]] + [[name] for name in args.without.split(";")] + [args.without.split(";")]:
        # lower_executorch calls this module's xnnpack_partitioner; the square root stays outside as it does there
        vx.xnnpack_partitioner = lambda: real(without=left_out)
        try:
            result = lower_executorch(art, batch=args.batch, announce=None)
        finally:
            vx.xnnpack_partitioner = real
        method = load_pte(save_pte(result, work / f"{art_path.stem}-portable-{'-'.join(left_out) or 'none'}.pte"))
        agree = sum(int((run_pte(method, x, batch=args.batch).argmax(1) == r).sum()) for (x, _), r in zip(test, refs))
        rows.append({"left_out_of_xnnpack": left_out, "portable_ops": result.portable_ops,
                     "agreement": agree / sum(len(r) for r in refs)})
        print(rows[-1], flush=True)
    write_result(args.result, {"model": model_name, "pipeline": pipeline, **info, "images": sum(len(r) for r in refs),
                               "batch": args.batch, "rows": rows, "cpu": cpu_model(), "threads": args.threads})


def float_sensitivity(args) -> None:
    """How far a last-bit change in each float op class moves this model's argmax: the artifact's program with one
    op class (``layer_norm``, ``gelu``, ``softmax``; then all three) computed in float64 and rounded to float32 once,
    against the program itself, on the same test images. A backend whose kernel for that op rounds differently
    (XNNPACK's means and rsqrt for LayerNorm, its exp for softmax) moves about as many. A class the program does
    not hold as that ATen op (vitqc's pairwise LayerNorm) is recorded as None: measure programs compiled with
    ``--set MODEL:materialize.layer_norm=aten`` (and ``gelu=aten``) to see what vitqc's own forms avoid."""
    from vitqc.artifact import load_artifact
    from vitqc.backends.xnnpack_rewrite import rational_gelus_to_kernel

    require_shared()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    aten = torch.ops.aten
    classes = {"layer_norm": {aten.layer_norm.default}, "gelu": {aten.gelu.default}, "softmax": {aten.softmax.int}}
    classes["all three"] = set().union(*classes.values())

    def in_float64(target):
        def run(*a, **kw):
            a = [v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in a]
            return target(*a, **kw).float()
        return run

    out = load_cells(args.result)
    for model_name in args.models.split(","):
        module, pre, eval_dir, calib_dir, _ = load_reference_model(model_name)
        calib = folder_batches(calib_dir, pre, args.calib_size)
        test = decode_eval_set(eval_dir, pre, limit=args.limit, batch_size=100)
        for pipeline in args.pipelines.split(","):
            art_path, info = artifact_for(module, pre, calib, model_name, pipeline, model_sets(args, model_name), work)
            program = load_artifact(art_path).quantized
            with torch.no_grad():
                refs = torch.cat([program(x).argmax(1) for x, _ in test])
                row = {"model": model_name, "pipeline": pipeline, **info, "images": len(refs)}
                for label, targets in classes.items():
                    gm = copy.deepcopy(program)
                    rational_gelus_to_kernel(gm.graph)  # vitqc's GELU as one node, to compute in float64
                    hits = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]
                    for node in hits:
                        node.target = in_float64(node.target)
                    gm.recompile()
                    if not hits:  # the program has none (vitqc's pairwise LayerNorm is not aten.layer_norm)
                        row[label] = None
                        continue
                    got = torch.cat([gm(x).argmax(1) for x, _ in test])
                    row[label] = float((got == refs).float().mean())
            print(row, flush=True)
            out[f"{model_name}/{pipeline}"] = row
            write_result(args.result, {"cells": out, "cpu": cpu_model(), "threads": args.threads})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", nargs="?",
                    choices=["table", "retime", "profile", "static-output", "portable-ops", "float-sensitivity"],
                    help="table: the faithfulness table; static-output: what an int8 output grid on every linear "
                         "(XNNPACK's static int8 linear) would change (--models: one model); portable-ops: "
                         "agreement with float op classes left out of XNNPACK (one model, one pipeline)")
    ap.add_argument("--without", default="GeluConfig;SoftmaxConfig;MeanDimConfig",
                    help="portable-ops: XNNPACK partitioner config classes to leave out, one at a time, then all")
    ap.add_argument("--models", default="vit_tiny_cifar10,vits14_cifar10")
    ap.add_argument("--pipelines", default="all", help="all built-in pipelines, or a comma-separated list")
    ap.add_argument("--limit", type=int, default=1000, help="test images (spread over the classes)")
    ap.add_argument("--batch", type=int, default=8, help="static batch of the .pte programs")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (vitqc's compile and reference program) and ExecuTorch's (XNNPACK's)")
    ap.add_argument("--calib-size", type=int, default=None, help="calibration images (default: all 1,000)")
    ap.add_argument("--set", action="append", default=[], metavar="MODEL:PASS.OPTION=VALUE")
    ap.add_argument("--work", default=str(DEFAULT_WORK), help="where artifacts and .pte files are kept")
    ap.add_argument("--result", default="executorch_pte-table", help="benchmarks/results/NAME.json")
    ap.add_argument("--relower", action="store_true", help="redo recorded cells from the kept artifacts")
    ap.add_argument("--time", nargs="+", metavar="PTE", help="only time these .pte files (ratios to the first)")
    ap.add_argument("--tag", default="", help="--time: results/executorch_pte[-TAG].json")
    args = ap.parse_args()
    executorch_threads(args.threads)
    if args.time:
        return time_files(args.time, max(args.runs, 20), args.tag)
    if args.command is None:
        ap.error("give a command (table, static-output, portable-ops) or --time")
    if args.command in ("float-sensitivity", "profile") and args.result == "executorch_pte-table":
        args.result = f"executorch_pte-{args.command}"
    {"table": table, "retime": retime, "profile": profile, "static-output": static_output, "portable-ops": portable_ops,
     "float-sensitivity": float_sensitivity}[args.command](args)


if __name__ == "__main__":
    main()
