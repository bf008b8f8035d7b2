"""Throughput of one joint-optimization step (teacher forward + student forward and backward + Adam).

    python benchmarks/joint_throughput.py [--model vit_small_patch16_224] [--batch 32] [--steps 10] [--device cuda]
                                          [--activation-checkpointing]

Random weights and random images (timing only). Prints iterations/s and peak memory (CUDA: max allocated;
CPU: peak resident set size of the process, so compare settings in separate processes) and keeps each
setting's row in results/joint_throughput-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import resource

import timm
import torch

import vitqc
from vitqc.pipeline import Pipeline

from common import RESULTS, write_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bits", default="w4a4")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--activation-checkpointing", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    size = model.default_cfg["input_size"][1]
    calib = [torch.randn(args.batch, 3, size, size)]
    w, a = args.bits[1:].split("a")
    steps = args.steps + args.warmup

    def pipeline(iterations: int) -> Pipeline:
        return Pipeline.from_list([
            "canonicalize", ("insert_quantizers", {"weight_bits": float(w), "act_bits": float(a)}),
            "channel_rescale", "weight_refine", ("calibrate", {"max_images": args.batch}),
            ("joint_optimize", {"iterations": iterations, "batch_size": args.batch, "checkpoint_every": 10**9,
                                "activation_checkpointing": args.activation_checkpointing})])

    # time warm-up + measured steps, and warm-up alone, in the same process: the difference is the steps
    timings = {}
    for label, its in (("warmup", args.warmup), ("all", steps)):
        gm = vitqc.compile(model, pipeline(its), calib, quiet=True, device=args.device)
        timings[label] = gm.meta["vitqc"]["record"]["joint_optimize"]["seconds"]
    per_step = (timings["all"] - timings["warmup"]) / args.steps
    if args.device.startswith("cuda"):
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA max allocated)"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS)"
    row = {"model": args.model, "device": args.device, "threads": torch.get_num_threads(), "batch": args.batch,
           "bits": args.bits, "activation_checkpointing": args.activation_checkpointing, "steps": args.steps,
           "it_per_s": round(1 / per_step, 4), "s_per_it": round(per_step, 4), "peak_memory": peak}
    name = f"joint_throughput-{args.device.split(':')[0]}"
    rows = json.loads((RESULTS / f"{name}.json").read_text())["rows"] if (RESULTS / f"{name}.json").exists() else []
    rows = [r for r in rows if {k: r[k] for k in ("model", "batch", "bits", "activation_checkpointing", "threads")}
            != {k: row[k] for k in ("model", "batch", "bits", "activation_checkpointing", "threads")}] + [row]
    write_result(name, {"rows": rows})
    print(f"| model | device | batch | bits | activation checkpointing | it/s | s/it | peak memory |\n"
          f"|---|---|---|---|---|---|---|---|\n"
          f"| {args.model} | {args.device} ({torch.get_num_threads()} threads) | {args.batch} | {args.bits} | "
          f"{'on' if args.activation_checkpointing else 'off'} | {1 / per_step:.3f} | {per_step:.3f} | {peak} |")


if __name__ == "__main__":
    main()
