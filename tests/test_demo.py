"""vitqc.demo: the committed digits ViT, its card, its split and its calibration/eval data."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitqc import demo
from vitqc.data import ImageFolderData, Preprocess, iterate_labeled

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "vitqc" / "assets"


@pytest.fixture(scope="module")
def model():
    return demo.load_demo_model()


@pytest.fixture(scope="module")
def split():
    return demo.demo_split()


def test_card_and_weights_are_committed():
    card = demo.demo_card()
    weights = ASSETS / card["weights"]
    assert weights.is_file() and (ASSETS / demo.CARD_NAME).is_file()
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == card["weights_sha256"]
    assert card["model_kwargs"] == json.loads(json.dumps(demo.MODEL_KWARGS))
    assert card["num_params"] < 150_000
    assert card["split"]["train_size"] + card["split"]["test_size"] == card["dataset"]["num_images"] == 1797
    assert card["training"]["command"].startswith("python tools/train_demo.py")
    assert card["training"]["train_time_s"] > 0


def test_model_loads(model):
    from timm.models.vision_transformer import VisionTransformer

    assert isinstance(model, VisionTransformer) and not model.training
    assert sum(p.numel() for p in model.parameters()) == demo.demo_card()["num_params"]
    out = model(torch.zeros(2, 1, 8, 8))
    assert out.shape == (2, 10)


def test_data_config_is_known(model):
    import timm.data

    pre = Preprocess.from_timm(timm.data.resolve_data_config(model=model))
    assert pre == demo.demo_preprocess()
    assert pre.input_size == (1, 8, 8) and pre.crop_pct == 1.0


def test_accuracy_matches_card(model):
    card = demo.demo_card()["metrics"]
    correct, total = demo.count_correct(model, demo.demo_eval_batches())
    assert total == card["test_total"] == 500
    assert correct == card["test_correct"]
    assert abs(correct / total - card["fp32_test_top1"]) < 1e-9
    assert card["fp32_test_top1"] >= 0.95
    # batch size does not change the answer
    assert demo.count_correct(model, demo.demo_eval_batches(batch_size=64)) == (correct, total)


def test_split_is_deterministic(split):
    card = demo.demo_card()
    _, y = demo.load_digits_01()
    train_idx, test_idx = demo.split_indices(y, card["split"]["test_size"], card["split"]["seed"])
    again = demo.split_indices(y, card["split"]["test_size"], card["split"]["seed"])
    assert np.array_equal(train_idx, again[0]) and np.array_equal(test_idx, again[1])
    assert demo.indices_digest(test_idx) == card["split"]["test_indices_sha256"]
    assert len(train_idx) == card["split"]["train_size"] == 1297 and len(test_idx) == 500
    assert not set(train_idx.tolist()) & set(test_idx.tolist())
    counts = Counter(y[test_idx].tolist())
    assert len(counts) == 10 and min(counts.values()) >= 48 and max(counts.values()) <= 52  # stratified
    other = demo.split_indices(y, 500, card["split"]["seed"] + 1)[1]
    assert not np.array_equal(other, test_idx)

    x_train, y_train, x_test, y_test = split
    assert x_train.shape == (1297, 1, 8, 8) and x_test.shape == (500, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert torch.equal(y_test, torch.tensor(y[test_idx]))
    assert all(torch.equal(a, b) for a, b in zip(split, demo.demo_split()))


def test_normalisation_matches_card(split):
    card = demo.demo_card()
    x01, y = demo.load_digits_01()
    train_idx, _ = demo.split_indices(y, card["split"]["test_size"], card["split"]["seed"])
    mean, std = demo.normalisation_stats(x01[train_idx])
    assert card["preprocess"]["mean"] == [mean] and card["preprocess"]["std"] == [std]
    x_train = split[0]
    assert abs(float(x_train.double().mean())) < 1e-6 and abs(float(x_train.double().std()) - 1) < 1e-3


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(len(x), -1)}


def test_calibration_uses_train_split_only(split):
    x_train, y_train, x_test, _ = split
    chosen, held = demo.demo_calibration(size=100, seed=0)
    assert len(chosen) == 100 and held is None
    rows = _rows(chosen)
    assert len(rows) == 100
    assert rows <= _rows(x_train) and not rows & _rows(x_test)
    # balanced: 10 per class
    label_of = {row: int(label) for row, label in zip(_rows_list(x_train), y_train)}
    assert Counter(label_of[r] for r in _rows_list(chosen)) == {c: 10 for c in range(10)}
    # seeded
    assert torch.equal(chosen, demo.demo_calibration(100, 0)[0])
    assert not torch.equal(chosen, demo.demo_calibration(100, 1)[0])
    assert len(demo.demo_calibration(None, 0)[0]) == 1297
    assert len(demo.demo_calibration(5000, 0)[0]) == 1297
    # held-out images follow the calibration ones in the same order, never the same images
    same, held = demo.demo_calibration(100, 0, holdout=20)
    assert torch.equal(same, chosen) and len(held) == 20 and not _rows(held) & rows


def _rows_list(x: torch.Tensor) -> list[bytes]:
    return [row.numpy().tobytes() for row in x.reshape(len(x), -1)]


def test_image_files_through_preprocess(tmp_path, model):
    """Test digits written as 8-bit PNGs and read back through demo_preprocess() classify as well."""
    x01, y = demo.load_digits_01()
    _, test_idx = demo.split_indices(y, 500, demo.demo_card()["split"]["seed"])
    for k, i in enumerate(test_idx[:200]):
        pixels = np.round(x01[i, 0] * 255).astype(np.uint8)
        path = tmp_path / str(y[i]) / f"{k:03d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(pixels, "L").convert("RGB").save(path)  # RGB on disk: the transform makes it L
    data = ImageFolderData(tmp_path)
    assert data.classes == [str(c) for c in range(10)]
    correct = total = 0
    with torch.no_grad():
        for xb, yb in iterate_labeled(data, demo.demo_preprocess(), batch_size=64, progress=False):
            assert xb.shape[1:] == (1, 8, 8)
            correct += int((model(xb).argmax(-1) == yb).sum())
            total += len(yb)
    assert total == 200 and correct / total >= 0.93


def test_training_script_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("train_demo", REPO / "tools" / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        assert module.main(["--epochs", "1", "--warmup-epochs", "1", "--out-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    card = json.loads((tmp_path / demo.CARD_NAME).read_text())
    assert card["split"] == demo.demo_card()["split"]
    assert card["preprocess"] == demo.demo_card()["preprocess"]
    assert card["training"]["epochs"] == 1 and (tmp_path / demo.WEIGHTS_NAME).is_file()
