"""Calibration sources compared: real calibration images vs data-free ones, on CIFAR-10, one row at a time.

    python benchmarks/calib_sources.py [--models vit_tiny_cifar10,vits14_cifar10] [--pipeline NAME]
        [--set PASS.OPTION=VALUE ...] [--limit 1000] [--calib-size 128] [--sources real,inversion,noise,...]
        [--inversion-steps 40] [--inversion-opt KEY=VALUE ...] [--label TEXT] [--also-full] [--tiny-timing] [--threads 1]
        [--name calib_sources]

For each model (../shared reference models) the pipeline is compiled once per calibration source and scored
(top-1) on the same decoded CIFAR-10 test images:

* ``real``: ``--calib-size`` images from ../shared/assets/data/cifar10/calib (the real-data reference),
* ``inversion``, ``noise``: the same number of images from ``vitqc.calib`` (class-balanced, seed 0),
* ``prompts``, ``learned-prompts``: SD-Turbo images; reported as unavailable when the weights cannot be
  loaded (offline machines without them in the Hugging Face cache).

A pipeline with ``joint_optimize.datafree_rounds`` (``joint-w4a4-datafree``) adds images during the joint
optimization (vitqc.calib.cyclic): the row records the final pool size, and the generation time of the
initial images and of every round beside the accuracy (``seconds_generation``: both together).

Each (model, pipeline, source, label, overrides, options, test images, calibration images) is one row of
benchmarks/results/NAME.json, written as soon as it is measured; a row already there is not run again, so an
interrupted table resumes. ``--label`` names a variant in the table (e.g. an ablation); ``--also-full`` scores
each row on the whole test set as well (``top1_full``). ``--tiny-timing``
also times prompt learning and generation on the tiny diffusers pipeline of the tests (CPU; these are not
SD-Turbo numbers). A markdown table of every row of the file is printed at the end.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from common import (ROOT, Timer, decode_eval_set, folder_batches, load_reference_model, machine, require_shared, top1,
                    write_result)

sys.path.insert(0, str(ROOT))


def default_pipeline() -> str:
    from vitqc.pipeline import builtin_pipelines

    return "joint-w4a4" if "joint-w4a4" in builtin_pipelines() else "minmax-w4a4"


def class_names_of(calib_dir: Path) -> list[str]:
    """CIFAR-10's class names in class-index order (the ImageFolder's sorted folder names)."""
    return sorted(p.name for p in calib_dir.iterdir() if p.is_dir())


def calibration(source: str, module, pre, calib_dir: Path, size: int, args) -> tuple[list[torch.Tensor], dict, object]:
    """(normalised batches, record, the Source that made them or None for real images)."""
    from vitqc.calib import calibration_batches, make_source
    from vitqc.calib.spec import parse_options
    if source == "real":
        with Timer() as t:
            batches = folder_batches(calib_dir, pre, size, batch_size=32)
        return batches, {"seconds_generate": round(t.seconds, 2)}, None
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
    batches, info = calibration_batches(built, module, pre, built.class_names, size=size, seed=0, quiet=True,
                                        batch_size=options.get("batch_size", 32))
    return batches, info, built


def tiny_timing(threads: int) -> dict:
    """Prompt learning and generation throughput on the tests' tiny diffusers pipeline (CPU)."""
    from prompt_throughput import measure

    return {"label": "tiny diffusers pipeline (UNet 32/64 ch, VAE 16/32 ch, 2-layer CLIP text, 16 px), CPU, "
                     f"{threads} thread(s); not SD-Turbo", **measure("tiny", "cpu", steps=10)}


def row_key(row: dict) -> tuple:
    return (row["model"], row["pipeline"], row["source"], row.get("label", ""), tuple(row["overrides"]),
            tuple(row.get("source_options", [])), row["limit"], row["calib_size"])


def load_rows(name: str) -> list[dict]:
    from common import RESULTS

    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()).get("rows", []) if path.exists() else []


def generation_seconds(record: dict, info: dict) -> tuple[float, float]:
    """(seconds the data-free rounds generated during the compile, seconds of all generation)."""
    rounds = record.get("joint_optimize", {}).get("datafree_rounds") or []
    during = sum(r.get("seconds", 0.0) for r in rounds)
    return round(during, 1), round(info.get("seconds_generate", 0.0) + info.get("seconds_prepare", 0.0) + during, 1)


def print_table(rows: list[dict]) -> None:
    print("\n| model | pipeline | calibration | images | top-1 % | FP % | generation s | images/s | compile s | test images |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = r["source"] + (f" ({r['label']})" if r.get("label") else "")
        if "unavailable" in r:
            print(f"| {r['model']} | {r['pipeline']} | {name} | – | n/a: {r['unavailable']} | | | | | |")
            continue
        rate = f"{r['images_per_second']:.2f}" if r.get("images_per_second") else "–"
        print(f"| {r['model']} | {r['pipeline']} | {name} | {r['images']} | {100 * r['top1']:.2f} | {100 * r['fp32']:.2f} "
              f"| {r['seconds_generation']:.0f} | {rate} | {r['seconds_compile']:.0f} | {r['limit']} |")


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
    ap.add_argument("--label", default="", help="names this variant in the table")
    ap.add_argument("--also-full", action="store_true", help="score on the whole test set too (top1_full)")
    ap.add_argument("--tiny-timing", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="calib_sources")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    require_shared()
    import vitqc
    from vitqc.calib.spec import Calibration
    from vitqc.errors import VitqcError

    pipeline = args.pipeline or default_pipeline()
    print(f"pipeline: {pipeline} {' '.join('--set ' + o for o in args.overrides)}  (test images: {args.limit}, "
          f"calibration images per source: {args.calib_size}, threads: {args.threads})", flush=True)
    rows = load_rows(args.name)
    done = {row_key(r) for r in rows}

    def save() -> Path:
        return write_result(args.name, {"rows": rows, "machine": machine()})

    for name in args.models.split(","):
        test = fp32 = None
        for source in args.sources.split(","):
            options = [f"steps={args.inversion_steps}", f"batch_size={args.inversion_batch}", *args.inversion_opt] \
                if source == "inversion" else []
            row: dict = {"model": name, "pipeline": pipeline, "source": source, "label": args.label,
                         "overrides": args.overrides, "source_options": options, "limit": args.limit,
                         "calib_size": args.calib_size, "threads": args.threads}
            if row_key(row) in done:
                print(f"  {source:16s} {args.label}: recorded earlier", flush=True)
                continue
            if test is None:
                module, pre, eval_dir, calib_dir, card = load_reference_model(name)
                test = decode_eval_set(eval_dir, pre, limit=args.limit)
                fp32 = top1(module, test)
                print(f"{name}: FP32 top-1 {fp32:.2%} on {sum(len(y) for _, y in test)} test images", flush=True)
            try:
                with Timer() as tg:
                    calib, info, built = calibration(source, module, pre, calib_dir, args.calib_size, args)
            except VitqcError as e:
                rows.append({**row, "unavailable": str(e)})
                print(f"  {source:16s} unavailable: {e}", flush=True)
                save()
                continue
            with Timer() as tc:
                # the source travels with the images: joint_optimize's data-free rounds ask it for more
                drawn = Calibration(torch.cat(calib), None, info, source=built)
                quantized = vitqc.compile(copy.deepcopy(module), pipeline, drawn, seed=0, quiet=True,
                                          set=args.overrides).quantized
            record = quantized.meta["vitqc"]["record"]
            acc = top1(quantized, test)
            if args.also_full:
                full = decode_eval_set(eval_dir, pre)
                row.update(top1_full=top1(quantized, full), fp32_full=top1(module, full), full_test_images=sum(
                    len(y) for _, y in full))
                del full
            during, total = generation_seconds(record, info)
            images = sum(len(b) for b in calib) + sum(r["images"] for r in record.get("joint_optimize", {}).get(
                "datafree_rounds") or [])
            # the source's own record first: its "images" / "images_per_second" count only the initial pool
            row.update({f"source_{k}": v for k, v in info.items() if k not in ("options", "seconds_generate")})
            row.update({"fp32": fp32, "top1": acc, "images": images, "seconds_source": round(tg.seconds, 1),
                        "seconds_rounds": during, "seconds_generation": total,
                        "images_per_second": round(images / total, 3) if source != "real" and total else None,
                        "seconds_compile": round(tc.seconds, 1),
                        "rounds": record.get("joint_optimize", {}).get("datafree_rounds")})
            rows.append(row)
            save()
            print(f"  {source:16s} {args.label} {pipeline} top-1 {acc:.2%}  (generation {total:.0f}s, compile "
                  f"{tc.seconds:.0f}s)", flush=True)
    if args.tiny_timing:
        rows.append({"model": "tiny diffusers pipeline", "tiny_pipeline_timing": tiny_timing(args.threads)})
    path = save()
    print_table([r for r in rows if "source" in r])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
