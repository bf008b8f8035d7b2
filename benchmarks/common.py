"""Shared helpers for benchmarks on the reference models in ../shared (skipped when it is absent)."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VITQC_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "results"

# where each model's eval and calibration images are (MNIST calibrates on its own 1,000-digit calib slice)
DATASETS = {
    "vit_tiny_cifar10": ("data/cifar10/test", "data/cifar10/calib"),
    "vits14_cifar10": ("data/cifar10/test", "data/cifar10/calib"),
    "vit_tiny_mnist": ("data/mnist/test", "data/mnist/calib"),
}


def require_shared() -> None:
    if not (SHARED / "assets" / "models").is_dir():
        sys.exit(f"benchmarks need the shared assets at {SHARED} (set VITQC_SHARED)")


def load_reference_model(name: str):
    """(module, Preprocess, eval_dir, calib_dir) for a model card in ../shared/assets/models."""
    from vitqc.data import Preprocess

    sys.path.insert(0, str(SHARED / "tools"))
    import zoo  # the shared tool builds the module from its card

    module, card = zoo.load(name)
    eval_dir, calib_dir = (SHARED / "assets" / p for p in DATASETS[name])
    return module, Preprocess.from_timm(zoo.timm_data_config(card)), eval_dir, calib_dir, card


def folder_batches(calib_dir, preprocess, size: int | None = None, batch_size: int = 50) -> list[torch.Tensor]:
    """``size`` calibration images (all when None) from ``calib_dir``, vitqc's seeded class-balanced draw, in batches."""
    from vitqc.calib.images import load_images

    return list(load_images(calib_dir, preprocess, size, 0, quiet=True)[0].split(batch_size))


def load_timing_model(name: str, calib_size: int):
    """(module, calibration batches, (Preprocess, eval_dir) or None) for the latency benchmarks. timm
    ``vit_small_patch16_224`` gets random weights and random calibration images: timing only, no eval set."""
    if name == "vit_small_patch16_224":
        import timm

        torch.manual_seed(0)
        model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
        calib = list(torch.randn(calib_size, 3, 224, 224, generator=torch.Generator().manual_seed(0)).split(16))
        return model, calib, None
    require_shared()
    model, pre, eval_dir, calib_dir, _ = load_reference_model(name)
    calib = folder_batches(calib_dir, pre, calib_size)
    return model, calib, (pre, eval_dir)


def decode_eval_set(eval_dir: Path, preprocess, limit: int | None = None, batch_size: int = 250):
    """Decode the labelled eval set once (every method is then scored on identical tensors)."""
    from vitqc.data import ImageFolderData, iterate_labeled

    data = ImageFolderData(eval_dir, require_classes=True)
    return list(iterate_labeled(data, preprocess, batch_size=batch_size, limit=limit, description="decode"))


@torch.no_grad()
def predictions(model, batches) -> torch.Tensor:
    """argmax of ``model`` over every image of ``batches`` (pairs of images and labels), on the CPU; the
    images go to the device the model's parameters are on."""
    device = next(model.parameters()).device
    return torch.cat([model(x.to(device)).argmax(-1).cpu() for x, _ in batches])


def top1(model, batches, preds: torch.Tensor | None = None) -> float:
    preds = predictions(model, batches) if preds is None else preds
    return float((preds == torch.cat([y for _, y in batches])).float().mean())


def without(pipeline, *names):
    """The pipeline (a Pipeline, or anything ``load_pipeline`` reads) with the named passes removed."""
    import copy

    from vitqc.pipeline import load_pipeline

    pipe = copy.deepcopy(load_pipeline(pipeline))
    pipe.steps = [s for s in pipe.steps if s.name not in names]
    pipe.name = f"{pipe.name}-without-{'-'.join(names)}"
    return pipe


def joint_step_pipeline(bits: str, granularity: str, batch: int, iterations: int, **joint_options):
    """What the step-timing benchmarks run: ``bits`` ("w4a4") with ``granularity`` activations, channel_rescale,
    weight_refine, calibration on one batch, then ``iterations`` joint steps at ``batch`` without checkpoints;
    ``joint_options`` are further joint_optimize options."""
    from vitqc.pipeline import Pipeline  # here: host_overhead_ab's children import the vitqc under test first

    w, a = bits[1:].split("a")
    return Pipeline.from_list([
        "canonicalize", ("insert_quantizers", {"weight_bits": float(w), "act_bits": float(a), "act_granularity": granularity}),
        "channel_rescale", "weight_refine", ("calibrate", {"max_images": batch}),
        ("joint_optimize", {"iterations": iterations, "batch_size": batch, "checkpoint_every": 10**9, **joint_options})])


def write_result(name: str, payload: dict, tag: str = "") -> Path:
    """results/NAME[-TAG].json, written atomically (NAME may be given with its .json). The command that ran
    (``argv``) and the machine are recorded with it unless the payload says them (benchmarks/index.py reads them)."""
    import shlex
    import sys

    name = name.removesuffix(".json")
    payload = {"argv": "python " + shlex.join(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
               "machine": machine(), **payload}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}-{tag}.json" if tag else f"{name}.json")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def interleaved_ms(calls: dict[str, Callable[[], object]], runs: int, warmup: int = 3) -> dict[str, float]:
    """Median ms of each call over ``runs`` rounds after ``warmup`` rounds, the calls made in turn within each round
    (so all see the same machine load)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(warmup + runs):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def load_cells(name: str) -> dict:
    path = RESULTS / f"{name.removesuffix('.json')}.json"
    return json.loads(path.read_text())["cells"] if path.exists() else {}


def run_cell(cells, key, result_name, fn):
    """Run one measurement unless a previous run already recorded it; write the results file after each."""
    if key in cells:
        print(f"{key}: {cells[key]['top1']:.4f} (recorded earlier)", flush=True)
        return cells[key]
    cells[key] = fn()
    # Cells another process recorded meanwhile are kept: two runs may fill one results file (one per core).
    cells.update({k: v for k, v in load_cells(result_name).items() if k not in cells})
    write_result(result_name, {"cells": cells, "machine": machine()})
    c = cells[key]
    print(f"{key}: {c['top1']:.4f}  (compile {c.get('compile_s', 0):.0f}s, eval {c['eval_s']:.0f}s)", flush=True)
    return c


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the architecture: ratios vs fp32 depend on it."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, {gpu}"
