"""Throughput of one joint-optimization step (teacher forward + student forward and backward + Adam).

    python benchmarks/joint_throughput.py [--model vit_small_patch16_224] [--img-size N] [--batch 32] [--steps 10]
                                          [--device cuda] [--granularity token|tensor] [--repeats 3]
                                          [--activation-checkpointing] [--compare fused|compile|optimizer]
                                          [--compile-mode reduce-overhead] [--width N] [--count-ops]

Random weights and random images (timing only). Activations are quantized per token by default, as the
shipped joint-w4a4 recipe does. Each run times the step in the same process with the fused fake-quant
training path (vitqc.quant.fused, the default) and with the plain ops, alternating them --repeats times, and
prints the median of each and their ratio. ``--compare compile`` (or ``--compile``) compares fused eager with
fused + torch.compile (``joint_optimize.compile``) instead; ``--compare optimizer`` compares torch's Adam stepping
group by group (fused on CUDA, as joint_optimize did until 2026-12) with :class:`vitqc.optim.GroupedAdam` (one
multi-tensor update over all groups, what joint_optimize uses), both fused fake-quant, eager unless ``--compile``
is also given. ``--width N`` builds the model with every width N (timm ``embed_dim``; the same graph, the same
number of quantizers and optimizer groups, negligible arithmetic): the step's time is then its host and dispatch
overhead, what bounds a GPU step, measurable on a CPU. Memory: what the student's autograd graph keeps for backward
(counted, so comparable anywhere), and the peak: CUDA max allocated per setting, on CPU the process's peak
resident set size (one figure for the whole run: compare such settings in separate processes). Rows go to
results/joint_throughput-<device>.json.

``--count-ops`` times nothing: it counts the aten operations one step dispatches (the kernels a GPU would launch,
and the view ops that launch none), plain and fused, on this machine at batch 2 (the count does not depend on
the batch), as the difference between compiles of 4 and 2 iterations. Rows go to results/joint_ops.json.
"""
from __future__ import annotations

import argparse
import collections
import copy
import gc
import json
import math
import resource
from unittest import mock

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vitqc
from vitqc.passes import joint_optimize
from vitqc.optim import GroupedAdam
from vitqc.passes.joint_optimize import WARMUP_STEPS
from vitqc.pipeline import Pipeline
from vitqc.quant.fused import fused_fake_quant

from common import RESULTS, joint_step_pipeline, machine, write_result


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched below autograd: views (no kernel) apart from the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: collections.Counter = collections.Counter()
        self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view or func.overloadpacket.__name__ in ("detach", "alias"):
            self.views += 1
        else:
            self.kernels[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(model, pipeline, calib) -> dict:
    """aten ops of one joint step (teacher forward, student forward and backward, Adam): the difference between
    whole compiles of 4 and 2 iterations, halved (everything else in them is the same)."""
    counts = []
    for n in (2, 4):
        counter = OpCounter()
        with counter:
            vitqc.compile(copy.deepcopy(model), pipeline(n), calib, quiet=True).quantized
        counts.append(counter)
    kernels = collections.Counter({k: (counts[1].kernels[k] - counts[0].kernels[k]) / 2 for k in counts[1].kernels})
    return {"kernels": round(sum(kernels.values())), "views": round((counts[1].views - counts[0].views) / 2),
            "top_kernels": {k: round(v) for k, v in kernels.most_common(8)}}


def torch_adam_per_group(groups: list[dict]) -> torch.optim.Adam:
    """The optimizer joint_optimize used before GroupedAdam: torch's Adam, stepping group by group (one tensor per
    group), fused on CUDA, torch's default elsewhere."""
    on_gpu = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.Adam(groups, fused=True if on_gpu else None)


def replace_row(name: str, row: dict, key: tuple[str, ...], missing: dict | None = None) -> None:
    """Add ``row`` to the rows of results/NAME.json, in place of the row with the same values at ``key`` (a key an
    older row lacks reads as ``missing[key]``, else None)."""
    path = RESULTS / f"{name}.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    missing = missing or {}
    rows = [r for r in rows if [r.get(k, missing.get(k)) for k in key] != [row[k] for k in key]]
    write_result(name, {"rows": rows + [row]})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=None, help="e.g. 112 for vit_small_patch14_dinov2 as vits14_cifar10")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="alternate plain and fused this many times (median)")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--granularity", default="token", choices=("token", "tensor"), help="activation quantizers")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--compare", choices=("fused", "compile", "optimizer"), default=None,
                    help="fused: plain ops vs fused fake-quant (default); compile: fused eager vs fused + torch.compile; "
                         "optimizer: torch Adam per group vs GroupedAdam")
    ap.add_argument("--compile", action="store_true", help="--compare compile; with --compare optimizer: both compiled")
    ap.add_argument("--compile-mode", default="default", help="joint_optimize.compile_mode (torch.compile's mode), "
                    "e.g. reduce-overhead: CUDA graphs")
    ap.add_argument("--width", type=int, default=None, help="every width N (timm embed_dim): host overhead only")
    ap.add_argument("--count-ops", action="store_true", help="count the aten ops of one step (plain and fused), no timing")
    args = ap.parse_args()
    args.compare = args.compare or ("compile" if args.compile else "fused")
    args.compile = args.compile or args.compare == "compile"
    if args.compile_mode != "default" and not args.compile:
        ap.error("--compile-mode needs --compile (or --compare compile)")
    torch.manual_seed(0)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    if args.width:
        kwargs["embed_dim"] = args.width
    model = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    size = args.img_size or model.default_cfg["input_size"][1]
    calib = [torch.randn(args.batch, 3, size, size)]
    steps = args.steps + WARMUP_STEPS  # joint_optimize times its first WARMUP_STEPS apart

    def pipeline(iterations: int, compiled: bool = False) -> Pipeline:
        return joint_step_pipeline(args.bits, args.granularity, args.batch, iterations, compile=compiled,
                                   activation_checkpointing=args.activation_checkpointing,
                                   compile_mode=args.compile_mode if compiled else "default")

    if args.count_ops:
        calib = [calib[0][:2]]
        args.batch = 2
        row = {"model": args.model, "img_size": size, "bits": args.bits, "granularity": args.granularity}
        for fused in (False, True):
            with fused_fake_quant(fused):
                row["fused" if fused else "plain"] = ops_per_step(model, pipeline, calib)
        replace_row("joint_ops", row, ("model", "img_size", "bits", "granularity"))
        print("| model | fake-quant path | kernels per step | views per step | most frequent kernels |\n|---|---|---|---|---|")
        for path in ("plain", "fused"):
            c = row[path]
            print(f"| {args.model} ({size} px, {args.bits}, {args.granularity}) | {path} | {c['kernels']} | {c['views']} | "
                  + ", ".join(f"{k} {v}" for k, v in c["top_kernels"].items()) + " |")
        return

    def seconds_per_step(mode: bool) -> tuple[float, str]:
        """mode: the second setting of --compare (fused fake-quant, torch.compile, GroupedAdam) or the first
        (plain ops, eager, torch Adam per group). joint_optimize records the time of its first steps (the compile,
        warm-up) apart: the rest over the steps after them."""
        if args.device.startswith("cuda"):
            # the previous setting's graph is garbage but held by reference cycles (fx): freed first, so this peak is
            # this setting's alone (the H200 peaks measured before 2026-12-07 include the earlier run's; scaling.py)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        fused = mode if args.compare == "fused" else True
        compiled = mode if args.compare == "compile" else args.compare == "optimizer" and args.compile
        optimizer = GroupedAdam if mode or args.compare != "optimizer" else torch_adam_per_group
        with fused_fake_quant(fused), mock.patch.object(joint_optimize, "GroupedAdam", optimizer):
            gm = vitqc.compile(copy.deepcopy(model), pipeline(steps, compiled), calib, quiet=True, device=args.device).quantized
        record = gm.meta["vitqc"]["record"]["joint_optimize"]
        measured = (record["seconds"] - record["warmup_seconds"]) / (steps - record["warmup_steps"])
        if args.device.startswith("cuda"):
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA max allocated)"
        else:
            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS so far)"
        return measured, peak

    # the student before joint_optimize, for counting what its autograd graph keeps (one compile serves both paths)
    student = vitqc.compile(copy.deepcopy(model), Pipeline.from_list(pipeline(1).steps[:-1]), calib, quiet=True).quantized

    def saved_for_backward_gib(fused: bool) -> float:
        """What the student's autograd graph keeps from forward to backward for one batch (device-independent)."""
        seen: dict[int, int] = {}

        def pack(t):
            seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
            return t

        with fused_fake_quant(fused), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            student(calib[0])
        return sum(seen.values()) / 2**30

    # plain first: on CPU the process's peak RSS then grows only if the fused path needs more. Alternated
    # --repeats times, median of each: a shared machine's drift then hits both alike.
    runs: dict[bool, list[tuple[float, str]]] = {False: [], True: []}
    for _ in range(args.repeats):
        for mode in (False, True):
            runs[mode].append(seconds_per_step(mode))
    (base, base_peak), (new, new_peak) = (sorted(runs[m])[len(runs[m]) // 2] for m in (False, True))
    # base, new: the medians of the first and the second setting of --compare
    labels = {"fused": ("plain ops", "fused"), "compile": ("fused eager", "fused + torch.compile"),
              "optimizer": ("torch Adam per group", "GroupedAdam")}[args.compare]
    if args.compare == "optimizer" and args.compile:
        labels = tuple(f"{label} (compiled)" for label in labels)
    if args.compare != "fused":  # only fused vs plain changes what is kept (compiled: inductor's graph, not comparable)
        base_saved = new_saved = float("nan")
    else:
        base_saved, new_saved = saved_for_backward_gib(False), saved_for_backward_gib(True)
    key = ("model", "img_size", "width", "device", "batch", "bits", "granularity", "activation_checkpointing", "threads",
           "compare", "compile", "compile_mode")
    row = {"model": args.model, "img_size": size, "width": args.width, "device": args.device, "threads": torch.get_num_threads(),
           "batch": args.batch, "bits": args.bits, "granularity": args.granularity,
           "activation_checkpointing": args.activation_checkpointing, "steps": args.steps, "repeats": args.repeats,
           "compare": args.compare, "compile": args.compile, "compile_mode": args.compile_mode, "it_per_s": round(1 / new, 4), "s_per_it": round(new, 4),
           "peak_memory": new_peak, "machine": machine()}
    if args.compare == "compile":
        row.update({"eager_it_per_s": round(1 / base, 4), "eager_peak_memory": base_peak,
                    "compile_speedup": round(base / new, 3)})
    elif args.compare == "optimizer":
        row.update({"torch_adam_it_per_s": round(1 / base, 4), "torch_adam_peak_memory": base_peak,
                    "grouped_adam_speedup": round(base / new, 3)})
    else:
        row.update({"plain_it_per_s": round(1 / base, 4), "plain_peak_memory": base_peak,
                    "fused_speedup": round(base / new, 3), "saved_for_backward_gib": round(new_saved, 3),
                    "plain_saved_for_backward_gib": round(base_saved, 3)})
    replace_row(f"joint_throughput-{args.device.split(':')[0]}", row, key)
    print(f"{args.model}" + (f" at every width {args.width} (host and dispatch overhead)" if args.width else ""))
    print("| model | device | batch | bits | activations | act. checkpointing | step | it/s | s/it | peak memory "
          "| saved for backward |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for label, t, peak, kept in ((labels[0], base, base_peak, base_saved), (labels[1], new, new_peak, new_saved)):
        print(f"| {args.model} | {args.device} ({torch.get_num_threads()} threads) | {args.batch} | {args.bits} | "
              f"{args.granularity} | {'on' if args.activation_checkpointing else 'off'} | {label} | {1 / t:.3f} | "
              f"{t:.3f} | {peak} | {'–' if math.isnan(kept) else f'{kept:.2f} GiB'} |")
    print(f"\n{labels[1]} vs {labels[0]}: {base / new:.2f}x the iterations per second ({machine()})")


if __name__ == "__main__":
    main()
