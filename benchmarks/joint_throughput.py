"""Throughput of one joint-optimization step (teacher forward + student forward and backward + Adam).

    python benchmarks/joint_throughput.py [--model vit_small_patch16_224] [--img-size N] [--batch 32] [--steps 10]
                                          [--device cuda] [--granularity token|tensor] [--repeats 3]
                                          [--activation-checkpointing]

Random weights and random images (timing only). Activations are quantized per token by default, as the
shipped joint-w4a4 recipe does. Each run times the step in the same process with the fused fake-quant
training path (vitqc.quant.fused, the default) and with the plain ops, alternating them --repeats times, and
prints the median of each and their ratio. Memory: what the student's autograd graph keeps for backward
(counted, so comparable anywhere), and the peak: CUDA max allocated per setting, on CPU the process's peak
resident set size (one figure for the whole run: compare such settings in separate processes). Rows go to
results/joint_throughput-<device>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource

import timm
import torch

import vitqc
from vitqc.pipeline import Pipeline
from vitqc.quant.fused import fused_fake_quant

from common import RESULTS, machine, write_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=None, help="e.g. 112 for vit_small_patch14_dinov2 as vits14_cifar10")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternate plain and fused this many times (median)")
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--granularity", default="token", choices=("token", "tensor"), help="activation quantizers")
    ap.add_argument("--activation-checkpointing", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = timm.create_model(args.model, pretrained=False, **kwargs).eval()
    size = args.img_size or model.default_cfg["input_size"][1]
    calib = [torch.randn(args.batch, 3, size, size)]
    w, a = args.bits[1:].split("a")
    steps = args.steps + args.warmup

    def pipeline(iterations: int) -> Pipeline:
        return Pipeline.from_list([
            "canonicalize", ("insert_quantizers", {"weight_bits": float(w), "act_bits": float(a),
                                                   "act_granularity": args.granularity}),
            "channel_rescale", "weight_refine", ("calibrate", {"max_images": args.batch}),
            ("joint_optimize", {"iterations": iterations, "batch_size": args.batch, "checkpoint_every": 10**9,
                                "activation_checkpointing": args.activation_checkpointing})])

    def seconds_per_step(fused: bool) -> tuple[float, str]:
        # warm-up + measured steps, and warm-up alone: the difference is the measured steps
        timings = {}
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with fused_fake_quant(fused):
            for label, its in (("warmup", args.warmup), ("all", steps)):
                gm = vitqc.compile(copy.deepcopy(model), pipeline(its), calib, quiet=True, device=args.device)
                timings[label] = gm.meta["vitqc"]["record"]["joint_optimize"]["seconds"]
        if args.device.startswith("cuda"):
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA max allocated)"
        else:
            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS so far)"
        return (timings["all"] - timings["warmup"]) / args.steps, peak

    # the student before joint_optimize, for counting what its autograd graph keeps (one compile serves both paths)
    student = vitqc.compile(copy.deepcopy(model), Pipeline.from_list(pipeline(1).steps[:-1]), calib, quiet=True)

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
    (plain, plain_peak), (fused, fused_peak) = (sorted(runs[m])[len(runs[m]) // 2] for m in (False, True))
    plain_saved, fused_saved = saved_for_backward_gib(False), saved_for_backward_gib(True)
    key = ("model", "img_size", "device", "batch", "bits", "granularity", "activation_checkpointing", "threads")
    row = {"model": args.model, "img_size": size, "device": args.device, "threads": torch.get_num_threads(), "batch": args.batch,
           "bits": args.bits, "granularity": args.granularity,
           "activation_checkpointing": args.activation_checkpointing, "steps": args.steps,
           "it_per_s": round(1 / fused, 4), "s_per_it": round(fused, 4), "peak_memory": fused_peak,
           "plain_it_per_s": round(1 / plain, 4), "plain_peak_memory": plain_peak,
           "repeats": args.repeats, "fused_speedup": round(plain / fused, 3), "saved_for_backward_gib": round(fused_saved, 3),
           "plain_saved_for_backward_gib": round(plain_saved, 3), "machine": machine()}
    name = f"joint_throughput-{args.device.split(':')[0]}"
    rows = json.loads((RESULTS / f"{name}.json").read_text())["rows"] if (RESULTS / f"{name}.json").exists() else []
    rows = [r for r in rows if {k: r.get(k) for k in key} != {k: row[k] for k in key}] + [row]
    write_result(name, {"rows": rows})
    print("| model | device | batch | bits | activations | act. checkpointing | fake-quant | it/s | s/it | peak memory "
          "| saved for backward |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for label, t, peak, kept in (("plain ops", plain, plain_peak, plain_saved), ("fused", fused, fused_peak, fused_saved)):
        print(f"| {args.model} | {args.device} ({torch.get_num_threads()} threads) | {args.batch} | {args.bits} | "
              f"{args.granularity} | {'on' if args.activation_checkpointing else 'off'} | {label} | {1 / t:.3f} | "
              f"{t:.3f} | {peak} | {kept:.2f} GiB |")
    print(f"\nfused vs plain: {plain / fused:.2f}x the iterations per second ({machine()})")


if __name__ == "__main__":
    main()
