"""The embedded default model ("demo"): a small timm ViT trained by this project on scikit-learn's digits.

``tools/train_demo.py`` trains it and writes ``vitqc/assets/demo_digits.safetensors`` (weights) and
``vitqc/assets/demo_digits.json`` (the model card). The digits data ships with scikit-learn (1,797 8x8
grey images, values 0..16), so the demo needs no download. The train/test split is defined here and
shared with the training script, so calibration (train split) and evaluation (test split) are the same
images the card's accuracy was measured on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from functools import lru_cache
from importlib import resources

import numpy as np
import torch
from torch import nn

from vitqc.calib.spec import Calibration, register_source
from vitqc.data import Preprocess, balanced_order
from vitqc.errors import VitqcError

CARD_NAME = "demo_digits.json"
WEIGHTS_NAME = "demo_digits.safetensors"

SPLIT_SEED = 0
TEST_SIZE = 500
PIXEL_MAX = 16.0  # load_digits values are 0..16; images are scaled by 1/16 to [0, 1]

# Constructor kwargs of timm.models.vision_transformer.VisionTransformer (the card records what was used).
MODEL_KWARGS = dict(
    img_size=8,
    patch_size=2,
    in_chans=1,
    num_classes=10,
    embed_dim=48,
    depth=4,
    num_heads=3,
    mlp_ratio=2.0,
    global_pool="token",
    class_token=True,
)


# --------------------------------------------------------------------------------------------------
# Data: the deterministic split (shared with tools/train_demo.py)
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x01 = (bunch.images.astype(np.float64) / PIXEL_MAX)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    x01.setflags(write=False)
    y.setflags(write=False)
    return x01, y


def load_digits_01() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as float64 (N, 1, 8, 8) in [0, 1] and int64 labels (read-only arrays)."""
    return _digits()


def split_indices(labels: Sequence[int], test_size: int = TEST_SIZE, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, stratified train/test split: sorted (train_idx, test_idx).

    Each class gets a share of ``test_size`` proportional to its size (largest remainder, ties to the
    lower class), and its test images are the first ones of a ``np.random.RandomState(seed)`` permutation
    of that class's indices (RandomState's streams are frozen, so the split is stable across numpy versions).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if not 0 < test_size < n:
        raise ValueError(f"test_size {test_size} must be in (0, {n})")
    classes = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes])
    exact = test_size * counts / n
    take = np.floor(exact).astype(int)
    remainder_order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - take[i]), i))
    for i in remainder_order[: test_size - int(take.sum())]:
        take[i] += 1
    rng = np.random.RandomState(seed)
    test: list[int] = []
    for c, k in zip(classes, take):
        members = np.flatnonzero(labels == c)
        test.extend(members[rng.permutation(len(members))[:k]].tolist())
    test_idx = np.array(sorted(test), dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(n), test_idx)
    return train_idx, test_idx


def indices_digest(indices: np.ndarray) -> str:
    """sha256 of the indices as little-endian int64 (the card records the test split's)."""
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def normalisation_stats(x01_train: np.ndarray) -> tuple[float, float]:
    """Mean and (population) std of all train pixels in [0, 1], as Python floats."""
    return float(x01_train.mean()), float(x01_train.std())


def normalise(x01: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """[0, 1] pixels -> normalised float32 tensor (computed in float64, then rounded once)."""
    return torch.tensor(((np.asarray(x01, dtype=np.float64) - mean) / std).astype(np.float32))


# --------------------------------------------------------------------------------------------------
# Card and model
# --------------------------------------------------------------------------------------------------


def _asset(name: str):
    return resources.files("vitqc") / "assets" / name


@lru_cache(maxsize=1)
def _card_text() -> str:
    path = _asset(CARD_NAME)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VitqcError(f"demo model card {path} is missing: run python tools/train_demo.py") from None


def demo_card() -> dict:
    """The model card (a fresh dict each call)."""
    return json.loads(_card_text())


def demo_preprocess() -> Preprocess:
    """How an image file becomes a demo input: grey 8x8, normalised with the train split's mean/std."""
    return Preprocess.from_dict(demo_card()["preprocess"])


def pretrained_cfg(card: dict | None = None) -> dict:
    """A timm-style pretrained_cfg for the demo model, so ``timm.data.resolve_data_config`` knows its input."""
    card = card or demo_card()
    pre = card["preprocess"]
    return {
        "architecture": card.get("name", "vitqc_demo_digits"),
        "input_size": tuple(pre["input_size"]),
        "mean": tuple(pre["mean"]),
        "std": tuple(pre["std"]),
        "interpolation": pre["interpolation"],
        "crop_pct": pre["crop_pct"],
        "crop_mode": pre["crop_mode"],
        "num_classes": card["model_kwargs"]["num_classes"],
        "label_names": [str(c) for c in range(card["model_kwargs"]["num_classes"])],
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def build_model(model_kwargs: dict, state_dict: dict | None = None) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**model_kwargs)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def load_demo_model() -> nn.Module:
    """The demo ViT with its committed weights, in eval mode, with ``pretrained_cfg`` set."""
    from safetensors.torch import load as load_safetensors

    card = demo_card()
    path = _asset(card.get("weights", WEIGHTS_NAME))
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise VitqcError(f"demo model weights {path} are missing: run python tools/train_demo.py") from None
    model = build_model(card["model_kwargs"], load_safetensors(blob))
    cfg = pretrained_cfg(card)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    return model


# --------------------------------------------------------------------------------------------------
# Data as the model sees it
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _split_arrays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    card = demo_card()
    split, pre = card["split"], card["preprocess"]
    x01, y = load_digits_01()
    train_idx, test_idx = split_indices(y, split["test_size"], split["seed"])
    mean, std = pre["mean"][0], pre["std"][0]
    return (
        normalise(x01[train_idx], mean, std),
        torch.tensor(y[train_idx]),
        normalise(x01[test_idx], mean, std),
        torch.tensor(y[test_idx]),
    )


def demo_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): normalised float32 NCHW images and int64 labels (fresh copies)."""
    return tuple(t.clone() for t in _split_arrays())  # type: ignore[return-value]


def demo_calibration(size: int | None, seed: int, holdout: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``size`` train-split images (all but ``holdout`` when None), a seeded choice balanced across the ten
    classes, and ``holdout`` more after them in the same order (or None)."""
    if size is not None and size < 1:
        raise VitqcError(f"calibration size {size} is not positive: pass a size of at least 1 (or all)")
    x_train, y_train, _, _ = _split_arrays()
    order = balanced_order(y_train.tolist(), seed)
    size = len(order) - holdout if size is None else min(size, len(order))
    chosen = x_train[torch.tensor(order[: size + holdout], dtype=torch.long)].clone()
    return chosen[:size], (chosen[size:] if len(chosen) > size else None)


@register_source
class DemoSource:
    name = "demo"
    summary = "the demo model's own train split (the default for `vitqc compile demo`)"

    @classmethod
    def draw(cls, value: str | None, *, size: int | None, holdout: int | None, seed: int, **_: object):
        # the demo's measurements use its test split, so nothing is held out unless asked
        images, held_out = demo_calibration(size, seed, holdout or 0)
        return Calibration(images, held_out, {"source": "demo", "split": "train"})


def demo_eval_batches(batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches over the test split, in split order."""
    if batch_size < 1:
        raise VitqcError(f"batch size {batch_size} is not positive: pass a batch size of at least 1")
    _, _, x_test, y_test = _split_arrays()
    for i in range(0, len(x_test), batch_size):
        yield x_test[i : i + batch_size].clone(), y_test[i : i + batch_size].clone()


@torch.no_grad()
def count_correct(model: nn.Module, batches) -> tuple[int, int]:
    """(top-1 correct, total) of ``model`` over (x, y) batches."""
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(dim=-1) == y).sum())
        total += len(y)
    return correct, total
