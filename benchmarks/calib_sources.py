"""Calibration sources compared: real calibration images vs data-free ones, at W4A4, on CIFAR-10.

    python benchmarks/calib_sources.py [--models vit_tiny_cifar10,vits14_cifar10] [--pipeline NAME]
        [--set PASS.OPTION=VALUE ...] [--limit 1000] [--calib-size 128] [--sources real,inversion,noise,...]
        [--inversion-steps 40] [--inversion-opt KEY=VALUE ...] [--tiny-timing] [--threads 1]

For each model (../shared reference models) the same pipeline is compiled once per calibration source and
scored (top-1) on the same decoded CIFAR-10 test images:

* ``real``: ``--calib-size`` images from ../shared/assets/data/cifar10/calib (the real-data reference),
* ``inversion``, ``noise``: the same number of images from ``vitqc.calib`` (class-balanced, seed 0),
* ``prompts``, ``learned-prompts``: SD-Turbo images; reported as unavailable when the weights cannot be
  loaded (offline machines without them in the Hugging Face cache).

The pipeline defaults to ``joint-w4a4`` when ``vitqc pipelines`` lists it, else ``minmax-w4a4``; the one used
and every ``--set`` override are printed and saved. ``--tiny-timing`` also times prompt learning and
generation on the tiny diffusers pipeline of the tests (CPU; these are not SD-Turbo numbers). Results go to
benchmarks/results/calib_sources[_NAME].json and a markdown table is printed.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from common import ROOT, Timer, decode_eval_set, load_reference_model, require_shared, top1, write_result

sys.path.insert(0, str(ROOT))


def default_pipeline() -> str:
    from vitqc.pipeline import builtin_pipelines

    return "joint-w4a4" if "joint-w4a4" in builtin_pipelines() else "minmax-w4a4"


def class_names_of(calib_dir: Path) -> list[str]:
    """CIFAR-10's class names in class-index order (the ImageFolder's sorted folder names)."""
    return sorted(p.name for p in calib_dir.iterdir() if p.is_dir())


def calibration(source: str, module, pre, calib_dir: Path, size: int, args) -> tuple[list[torch.Tensor], dict]:
    from vitqc.calib import calibration_batches, make_source
    from vitqc.calib.spec import parse_options
    from vitqc.calib.images import load_images

    if source == "real":
        with Timer() as t:
            batches = list(load_images(calib_dir, pre, size, 0, quiet=True)[0].split(32))
        return batches, {"seconds_generate": round(t.seconds, 2)}
    options: dict = {}
    if source == "inversion":
        options = {"steps": args.inversion_steps, "batch_size": args.inversion_batch,
                   **parse_options("inversion", None, args.inversion_opt)}  # as `--opt KEY=VALUE` of the CLI
    if source in ("prompts", "learned-prompts"):
        options = {"diffusion": args.diffusion} if args.diffusion else {}
        if source == "learned-prompts":
            options.update(steps=args.prompt_steps)
    # the source is built first: calibration_batches' own batch_size is the output batching, so passing the
    # source's batch_size through it never reached the source; inversion's output stays in batches of
    # --inversion-batch as in every recorded run
    built = make_source(source, module, pre, class_names_of(calib_dir), seed=0, quiet=True, **options)
    return calibration_batches(built, module, pre, built.class_names, size=size, seed=0, quiet=True,
                               batch_size=options.get("batch_size", 32))


def tiny_timing(threads: int) -> dict:
    """Prompt learning and generation throughput on the tests' tiny diffusers pipeline (CPU)."""
    from prompt_throughput import measure

    return {"label": "tiny diffusers pipeline (UNet 32/64 ch, VAE 16/32 ch, 2-layer CLIP text, 16 px), CPU, "
                     f"{threads} thread(s); not SD-Turbo", **measure("tiny", "cpu", steps=10)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit_tiny_cifar10,vits14_cifar10")
    ap.add_argument("--pipeline", default=None, help="default: joint-w4a4 if available, else minmax-w4a4")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="PASS.OPTION=VALUE")
    ap.add_argument("--limit", type=int, default=1000, help="test images (spread over classes)")
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--sources", default="real,inversion,noise,prompts,learned-prompts")
    ap.add_argument("--inversion-steps", type=int, default=40)
    ap.add_argument("--inversion-batch", type=int, default=64)
    ap.add_argument("--inversion-opt", action="append", default=[], help="KEY=VALUE (InversionOptions)")
    ap.add_argument("--prompt-steps", type=int, default=100)
    ap.add_argument("--diffusion", default=None, help="SD-Turbo hub id or folder (default stabilityai/sd-turbo)")
    ap.add_argument("--tiny-timing", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="calib_sources")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    require_shared()
    import vitqc
    from vitqc.errors import VitqcError

    pipeline = args.pipeline or default_pipeline()
    print(f"pipeline: {pipeline} {' '.join('--set ' + o for o in args.overrides)}  (test images: {args.limit}, "
          f"calibration images per source: {args.calib_size}, threads: {args.threads})", flush=True)
    payload: dict = {"pipeline": pipeline, "overrides": args.overrides, "limit": args.limit,
                     "calib_size": args.calib_size, "inversion_steps": args.inversion_steps,
                     "inversion_options": args.inversion_opt, "threads": args.threads,
                     "device": "cpu", "rows": []}
    for name in args.models.split(","):
        module, pre, eval_dir, calib_dir, card = load_reference_model(name)
        test = decode_eval_set(eval_dir, pre, limit=args.limit)
        row: dict = {"model": name, "fp32": top1(module, test), "sources": {}}
        print(f"{name}: FP32 top-1 {row['fp32']:.2%} on {sum(len(y) for _, y in test)} test images", flush=True)
        for source in args.sources.split(","):
            try:
                with Timer() as tg:
                    calib, info = calibration(source, module, pre, calib_dir, args.calib_size, args)
            except VitqcError as e:
                row["sources"][source] = {"unavailable": str(e)}
                print(f"  {source:16s} unavailable: {e}", flush=True)
                continue
            with Timer() as tc:
                quantized = vitqc.compile(copy.deepcopy(module), pipeline, calib, seed=0, quiet=True,
                                          set=args.overrides).quantized
            acc = top1(quantized, test)
            info = {k: v for k, v in info.items() if k != "options"}
            row["sources"][source] = {"top1": acc, "images": sum(len(b) for b in calib),
                                      "seconds_source": round(tg.seconds, 1), "seconds_compile": round(tc.seconds, 1),
                                      **info}
            print(f"  {source:16s} {pipeline} top-1 {acc:.2%}  (source {tg.seconds:.0f}s, compile {tc.seconds:.0f}s)",
                  flush=True)
        payload["rows"].append(row)
        write_result(args.name, payload)
    if args.tiny_timing:
        payload["tiny_pipeline_timing"] = tiny_timing(args.threads)
        print("tiny pipeline timing:", payload["tiny_pipeline_timing"], flush=True)
    path = write_result(args.name, payload)
    print("\n| model | FP32 | " + " | ".join(args.sources.split(",")) + " |")
    print("|---|---|" + "---|" * len(args.sources.split(",")))
    for row in payload["rows"]:
        cells = []
        for source in args.sources.split(","):
            r = row["sources"].get(source, {})
            cells.append("n/a (no SD-Turbo weights)" if "unavailable" in r else f"{r['top1']:.2%}")
        print(f"| {row['model']} | {row['fp32']:.2%} | " + " | ".join(cells) + " |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
