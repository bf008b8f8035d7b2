"""Issue 3's accuracy table and ablations: FP vs minmax-* vs joint-* on the reference models.

    python benchmarks/accuracy_joint.py table     [--models vit_tiny_cifar10,...] [--schemes w4a4,...]
                                                  [--families minmax,joint] [--iterations N] [--batch-size N]
                                                  [--limit N] [--result NAME] [--device cuda]
                                                  [--set "feature_weight=32,channel_rescale.alpha=0"]
    python benchmarks/accuracy_joint.py ablations [--model vit_tiny_cifar10] [--scheme w4a4]
                                                  [--iterations N] [--limit N] [--result NAME]
    python benchmarks/accuracy_joint.py tune      [--model ...] [--scheme w4a4] --try "lr_refine=1e-2,lr_quant=3e-3"
                                                  [--try ...] [--iterations N] [--limit N] [--result NAME]

Full test sets by default; calibration images from ../shared (cifar10/calib, 1,000 images; MNIST: its own
1,000-digit calib slice). `--iterations` overrides every joint pipeline's iteration count (default: the
pipeline's own); `--set` changes options of the joint pipelines as `--try` does below (recorded in each
cell). Each finished cell is written to benchmarks/results/NAME.json at once and a rerun with the
same NAME skips the cells already there, so an interrupted run resumes where it stopped.

Ablations (one model, one scheme, same iterations): joint (the pipeline as shipped) vs the same optimizer
run block by block, without channel_rescale, without weight_refine, and with 32 / 256 / 1000 calibration
images for the optimization (initialisation always uses the first 32).

Tune: the joint pipeline as shipped, then once per `--try` with those options changed (a bare name is a
joint_optimize option, PASS.OPTION another pass's, e.g. channel_rescale.alpha=0.2); these
are the runs that choose the pipelines' defaults.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

from vitqc.options import parse_literal

from common import (Timer, decode_eval_set, folder_batches, load_cells, load_reference_model, predictions,
                    require_shared, run_cell, top1, without)

SCHEMES = ("w8a8", "w4a4", "w3a3", "w1.58a8")


BATCH_SIZE: int | None = None  # --batch-size: joint_optimize batch size of every joint pipeline
DEVICE = "cpu"  # --device: where vitqc.compile runs and the models are evaluated


def compiled_cell(module, pipeline, calib, test, iterations, **overrides):
    import vitqc
    from vitqc.pipeline import load_pipeline

    pipe = load_pipeline(pipeline)
    if any(s.name == "joint_optimize" for s in pipe.steps):
        if iterations is not None:
            overrides["joint_optimize__iterations"] = iterations
        if BATCH_SIZE is not None:
            overrides["joint_optimize__batch_size"] = BATCH_SIZE
    with Timer() as tc:
        q = vitqc.compile(copy.deepcopy(module), pipe, calib, quiet=True, device=DEVICE, **overrides).quantized
    with Timer() as te:
        preds = predictions(q, test)
    acc = top1(q, test, preds)
    # argmax agreement with FP: more sensitive than top-1 where the quantized model is close to FP
    agreement = None if FP_PREDICTIONS is None else float((preds == FP_PREDICTIONS).float().mean())
    its = next((s.options.get("iterations") for s in pipe.steps if s.name == "joint_optimize"), None)
    batch = next((s.options.get("batch_size") for s in pipe.steps if s.name == "joint_optimize"), None)
    return {"top1": acc, "agreement_with_fp": agreement,
            "compile_s": round(tc.seconds, 1), "eval_s": round(te.seconds, 1), "device": DEVICE,
            "iterations": overrides.get("joint_optimize__iterations", its),
            "batch_size": overrides.get("joint_optimize__batch_size", batch),
            "calib_images": sum(len(b) for b in calib)}


FP_PREDICTIONS: torch.Tensor | None = None  # the FP model's argmax on the current test set


def fp_cell(module, test):
    """Top-1 of the FP model; also keeps its predictions for the agreement of every later cell."""
    global FP_PREDICTIONS
    with Timer() as te:
        FP_PREDICTIONS = predictions(copy.deepcopy(module).to(DEVICE), test)
    return {"top1": top1(module, test, FP_PREDICTIONS), "eval_s": round(te.seconds, 1)}


def table(args) -> None:
    cells = load_cells(args.result)
    for name in args.models.split(","):
        module, pre, eval_dir, calib_dir, _ = load_reference_model(name)
        calib = folder_batches(calib_dir, pre)
        test = decode_eval_set(eval_dir, pre, limit=args.limit)
        fp_result = fp_cell(module, test)
        run_cell(cells, f"{name}/fp32", args.result, lambda: fp_result)
        for scheme in args.schemes.split(","):
            for family in args.families.split(","):
                overrides = parse_try(args.set) if family == "joint" and args.set else {}
                run_cell(cells, f"{name}/{family}-{scheme}", args.result,
                         lambda: dict(compiled_cell(module, f"{family}-{scheme}", calib, test, args.iterations,
                                                    **overrides), overrides=dict(overrides)))
    print_table(cells, args.models.split(","), args.schemes.split(","))


def ablations(args) -> None:
    from vitqc.pipeline import load_pipeline

    cells = load_cells(args.result)
    module, pre, eval_dir, calib_dir, _ = load_reference_model(args.model)
    calib = folder_batches(calib_dir, pre, batch_size=32)
    test = decode_eval_set(eval_dir, pre, limit=args.limit)
    joint = load_pipeline(f"joint-{args.scheme}")
    flat = torch.cat(calib)
    fp_result = fp_cell(module, test)
    variants = {
        "fp32": lambda: fp_result,
        "joint": lambda: compiled_cell(module, joint, calib, test, args.iterations),
        "blockwise": lambda: compiled_cell(module, joint, calib, test, args.iterations, joint_optimize__mode="blockwise"),
        "no-rescale": lambda: compiled_cell(module, without(joint, "channel_rescale"), calib, test, args.iterations),
        "no-refine": lambda: compiled_cell(module, without(joint, "weight_refine"), calib, test, args.iterations),
        "calib-32": lambda: compiled_cell(module, joint, list(flat[:32].split(32)), test, args.iterations),
        "calib-256": lambda: compiled_cell(module, joint, list(flat[:256].split(32)), test, args.iterations),
        # with the full 1,000-image calibration set this is the joint run itself: reuse its cell, do not rerun it
        "calib-1000": ((lambda: dict(cells[f"{args.model}/{args.scheme}/joint"], same_as="joint")) if len(flat) == 1000
                       else (lambda: compiled_cell(module, joint, list(flat[:1000].split(32)), test, args.iterations))),
    }
    for label, fn in variants.items():
        run_cell(cells, f"{args.model}/{args.scheme}/{label}", args.result, fn)
    fp = cells[f"{args.model}/{args.scheme}/fp32"]["top1"]
    print(f"\n{args.model} joint-{args.scheme}, {args.iterations or 'pipeline default'} iterations\n")
    print("| variant | top-1 % | vs FP | agreement with FP % | compile s |\n|---|---|---|---|---|")
    for label in variants:
        c = cells[f"{args.model}/{args.scheme}/{label}"]
        agree = "" if c.get("agreement_with_fp") is None else f"{100 * c['agreement_with_fp']:.2f}"
        print(f"| {label} | {100 * c['top1']:.2f} | {100 * (c['top1'] - fp):+.2f} | {agree} | {c.get('compile_s', '')} |")


def parse_try(text: str) -> dict:
    """'lr_refine=1e-2,channel_rescale.alpha=0.2,amp_cpu=true' -> {'joint_optimize__lr_refine': 0.01,
    'channel_rescale__alpha': 0.2, 'joint_optimize__amp_cpu': True}: a bare name is a joint_optimize option,
    PASS.OPTION any pass's; values are TOML literals, as ``--set`` takes them."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--try {text!r}: write options as name=value,pass.name=value")
        key = key.strip()
        out[key.replace(".", "__", 1) if "." in key else f"joint_optimize__{key}"] = parse_literal(value.strip())
    return out


def tune(args) -> None:
    cells = load_cells(args.result)
    module, pre, eval_dir, calib_dir, _ = load_reference_model(args.model)
    calib = folder_batches(calib_dir, pre, batch_size=32)
    test = decode_eval_set(eval_dir, pre, limit=args.limit)
    fp_result = fp_cell(module, test)
    prefix = f"{args.model}/{args.scheme}/{args.iterations}x{BATCH_SIZE}"
    labels = ["fp32", "shipped"] + list(args.tries)
    for label in labels:
        fn = (lambda: fp_result) if label == "fp32" else (
            lambda: compiled_cell(module, f"joint-{args.scheme}", calib, test, args.iterations,
                                  **({} if label == "shipped" else parse_try(label))))
        run_cell(cells, f"{prefix}/{label}", args.result, fn)
    fp = cells[f"{prefix}/fp32"]["top1"]
    print(f"\n{args.model} joint-{args.scheme}, {args.iterations} iterations at batch {BATCH_SIZE}\n")
    print("| joint_optimize options | top-1 % | vs FP | agreement with FP % | compile s |\n|---|---|---|---|---|")
    for label in labels[1:]:
        c = cells[f"{prefix}/{label}"]
        print(f"| {label} | {100 * c['top1']:.2f} | {100 * (c['top1'] - fp):+.2f} | "
              f"{100 * c['agreement_with_fp']:.2f} | {c['compile_s']} |")


def print_table(cells, models, schemes) -> None:
    print("\n| model | FP32 | " + " | ".join(f"minmax-{s} | joint-{s}" for s in schemes) + " |")
    print("|---|---|" + "---|---|" * len(schemes))
    for m in models:
        fp = cells[f"{m}/fp32"]["top1"]
        row = [f"{100 * fp:.2f}"]
        for s in schemes:
            for family in ("minmax", "joint"):
                c = cells.get(f"{m}/{family}-{s}")
                row.append("–" if c is None else f"{100 * c['top1']:.2f} ({100 * (c['top1'] - fp):+.2f})")
        print(f"| {m} | " + " | ".join(row) + " |")
    print("\njoint iterations and compile wall time (s):")
    for key, c in cells.items():
        if "joint" in key and "iterations" in c:
            print(f"  {key}: {c['iterations']} iterations at batch {c.get('batch_size')}, {c['compile_s']} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("table")
    t.add_argument("--models", default="vit_tiny_cifar10,vit_tiny_mnist,vits14_cifar10")
    t.add_argument("--schemes", default=",".join(SCHEMES))
    t.add_argument("--families", default="minmax,joint", help="which pipeline families to run (minmax, joint)")
    t.add_argument("--set", default="", help="joint pipelines' options changed, as --try of tune")
    a = sub.add_parser("ablations")
    a.add_argument("--model", default="vit_tiny_cifar10")
    a.add_argument("--scheme", default="w4a4")
    u = sub.add_parser("tune")
    u.add_argument("--model", default="vits14_cifar10")
    u.add_argument("--scheme", default="w4a4")
    u.add_argument("--try", dest="tries", action="append", default=[],
                   help="options to try, e.g. lr_refine=1e-2,channel_rescale.alpha=0.2 (repeatable; "
                        "a bare name is a joint_optimize option)")
    for p in (t, a, u):
        p.add_argument("--iterations", type=int, default=None, help="override every joint pipeline's iterations")
        p.add_argument("--batch-size", type=int, default=None, help="override every joint pipeline's batch size")
        p.add_argument("--limit", type=int, default=None, help="evaluate on N test images (default: all)")
        p.add_argument("--result", default=None, help="name of the JSON file in benchmarks/results")
        p.add_argument("--device", default="cpu", help="cpu or cuda: where compile (joint_optimize) and evaluation run")
    args = ap.parse_args()
    require_shared()
    args.result = args.result or f"accuracy_joint_{args.what}"
    global BATCH_SIZE, DEVICE
    BATCH_SIZE, DEVICE = args.batch_size, args.device
    {"table": table, "ablations": ablations, "tune": tune}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
