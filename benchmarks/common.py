"""Shared helpers for benchmarks on the reference models in ../shared (skipped when it is absent)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

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


def decode_eval_set(eval_dir: Path, preprocess, limit: int | None = None, batch_size: int = 250):
    """Decode the labelled eval set once (every method is then scored on identical tensors)."""
    from vitqc.data import ImageFolderData, iterate_labeled

    data = ImageFolderData(eval_dir, require_classes=True)
    return list(iterate_labeled(data, preprocess, batch_size=batch_size, limit=limit, description="decode"))


@torch.no_grad()
def top1(model, batches) -> float:
    right = total = 0
    for x, y in batches:
        right += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return right / total


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
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
