"""Issue 6: searched mixed precision vs uniform W4A4 at the same average bits, after the same joint optimization.

    python benchmarks/mixed_precision.py [--model vits14_cifar10] [--iterations N] [--batch-size N]
                                         [--population N] [--generations N] [--limit N] [--result NAME]
                                         [--search-set OPTION=VALUE ...] [--arms uniform,mp] [--seed S]

Both arms are the same pipeline (joint-w4a4's passes and options) except that `mp-joint` runs
mixed_precision_search (average W4 A4 from {3,4,6,8}, head and patch embed at 8 as in joint-w4a4) before
calibrate. Calibration: ../shared cifar10/calib (or MNIST's calib slice); evaluation on the test set
(every image unless --limit). Cells are written as they finish and a rerun skips them (resume).
`--search-set contrastive_weight=0` varies mixed_precision_search's options; its cell is named after them
(`mp-joint[contrastive_weight=0]`), so variants share one results file and one uniform arm: run
`--arms mp` in a second process beside a first that runs both, one core each. `--seed S` repeats both arms
at another compile seed (cells `joint-w4a4@seedS`, `mp-joint@seedS`).
"""
from __future__ import annotations

import argparse
import copy
import sys

from common import (Timer, decode_eval_set, folder_batches, load_cells, load_reference_model, require_shared,
                    run_cell, top1)


def arm(module, pipeline, calib, test, overrides, seed):
    import vitqc

    with Timer() as tc:
        q = vitqc.compile(copy.deepcopy(module), pipeline, calib, quiet=False, set=overrides, seed=seed).quantized
    with Timer() as te:
        acc = top1(q, test)
    record = q.meta["vitqc"]["record"]
    cell = {"top1": acc, "compile_s": round(tc.seconds, 1), "eval_s": round(te.seconds, 1), "overrides": overrides,
            "seed": seed,
            "joint_seconds": record["joint_optimize"]["seconds"]}
    if "mixed_precision_search" in record:
        cell["search"] = record["mixed_precision_search"]
    return cell


def fp_cell(module, test) -> dict:
    with Timer() as t:
        acc = top1(module, test)
    return {"top1": acc, "eval_s": round(t.seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vits14_cifar10")
    ap.add_argument("--iterations", type=int, default=None, help="joint_optimize iterations of both arms")
    ap.add_argument("--batch-size", type=int, default=None, help="joint_optimize batch size of both arms")
    ap.add_argument("--population", type=int, default=None)
    ap.add_argument("--generations", type=int, default=None)
    ap.add_argument("--search-images", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on N test images (default: all)")
    ap.add_argument("--result", default=None)
    ap.add_argument("--search-set", action="append", default=[], metavar="OPTION=VALUE",
                    help="a mixed_precision_search option of the mp arm (repeatable)")
    ap.add_argument("--arms", default="uniform,mp", help="which arms to run: uniform, mp or both")
    ap.add_argument("--seed", type=int, default=0, help="compile seed of both arms (cells of seed S > 0 end in @seedS)")
    args = ap.parse_args()
    require_shared()
    result = args.result or f"mixed_precision_{args.model}"
    cells = load_cells(result)
    module, pre, eval_dir, calib_dir, _ = load_reference_model(args.model)
    calib = folder_batches(calib_dir, pre, batch_size=32)
    test = decode_eval_set(eval_dir, pre, limit=args.limit)
    joint = [f"joint_optimize.{k}={v}" for k, v in (("iterations", args.iterations), ("batch_size", args.batch_size))
             if v is not None]
    search = [f"mixed_precision_search.{k}={v}" for k, v in (("population", args.population),
              ("generations", args.generations), ("images", args.search_images)) if v is not None]
    search += [f"mixed_precision_search.{kv}" for kv in args.search_set]
    at_seed = f"@seed{args.seed}" if args.seed else ""
    uniform_key = "joint-w4a4" + at_seed
    mp_key = (f"mp-joint[{','.join(args.search_set)}]" if args.search_set else "mp-joint") + at_seed
    arms = set(args.arms.split(","))
    if not arms <= {"uniform", "mp"}:
        sys.exit(f"--arms: {args.arms!r}: give uniform, mp or uniform,mp")
    fp = run_cell(cells, "fp32", result, lambda: fp_cell(module, test))["top1"]
    if "uniform" in arms:
        run_cell(cells, uniform_key, result, lambda: arm(module, "joint-w4a4", calib, test, joint, args.seed))
    if "mp" in arms:
        run_cell(cells, mp_key, result, lambda: arm(module, "mp-joint", calib, test, joint + search, args.seed))
    print_table(args.model, sum(len(y) for _, y in test), joint, fp, load_cells(result), mp_key)


def print_table(model, images, joint, fp, cells, mp_key):
    print(f"\n{model}, {images} test images, joint {joint or 'pipeline defaults'}")
    print("| pipeline | avg W bits | avg A bits | top-1 % | vs FP | search fitness | compile s |\n|---|---|---|---|---|---|---|")
    print(f"| FP32 | 32 | 32 | {100 * fp:.2f} | | | |")
    for key, c in cells.items():
        if key.startswith("joint-w4a4"):
            print(f"| {key} (uniform) | 4 | 4 | {100 * c['top1']:.2f} | {100 * (c['top1'] - fp):+.2f} | | "
                  f"{c['compile_s']} |")
        elif key.startswith("mp-joint"):
            s = c["search"]
            print(f"| {key} (searched; uniform scored {s['uniform_fitness']:.4f}) | {s['average_weight_bits']:.3f} | "
                  f"{s['average_act_bits']:.3f} | {100 * c['top1']:.2f} | {100 * (c['top1'] - fp):+.2f} | "
                  f"{s['fitness']:.4f} | {c['compile_s']} |")
    if mp_key in cells:
        s = cells[mp_key]["search"]
        print(f"\n{mp_key} search: {s['evaluations']} candidates on {s['images']} images in {s['seconds']} s")
        print("| layer | W bits | A bits |\n|---|---|---|")
        for row in s["layers"]:
            print(f"| {row['path']} | {row.get('weight_bits', '')} | {row.get('act_bits', '')} |")


if __name__ == "__main__":
    sys.exit(main())
