"""Train the embedded demo ViT on scikit-learn's digits and write its weights and model card.

    python tools/train_demo.py                       # writes vitqc/assets/demo_digits.{safetensors,json}
    python tools/train_demo.py --out-dir /tmp/demo   # anywhere else

CPU only, seeded, a couple of minutes at most. The split, scaling and normalisation come from
``vitqc.demo`` so the package evaluates exactly what was trained. No test-set model selection: the
model after the last epoch is the one saved, and its test accuracy is measured once, after reloading
the written weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vitqc import demo  # noqa: E402
from vitqc.data import Preprocess  # noqa: E402


def shift_batch(x01: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image by a random (dy, dx) in [-max_shift, max_shift]^2, filling with 0 (background)."""
    b, c, h, w = x01.shape
    padded = F.pad(x01, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = dy[:, None] + torch.arange(h)[None, :]  # (b, h)
    cols = dx[:, None] + torch.arange(w)[None, :]  # (b, w)
    n = torch.arange(b)[:, None, None]
    out = padded[:, 0][n, rows[:, :, None], cols[:, None, :]]  # (b, h, w); digits are one channel
    return out[:, None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="training seed (init, shuffling, augmentation)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=REPO / "vitqc" / "assets")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)

    x01, y = demo.load_digits_01()
    train_idx, test_idx = demo.split_indices(y, demo.TEST_SIZE, demo.SPLIT_SEED)
    mean, std = demo.normalisation_stats(x01[train_idx])
    x_train01 = torch.tensor(x01[train_idx], dtype=torch.float32)
    y_train = torch.tensor(y[train_idx])
    print(f"split: {len(train_idx)} train / {len(test_idx)} test (seed {demo.SPLIT_SEED}); "
          f"train pixel mean {mean:.6f} std {std:.6f}")

    model = demo.build_model(demo.MODEL_KWARGS)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: VisionTransformer {demo.MODEL_KWARGS} ({n_params:,} parameters)")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    steps_per_epoch = math.ceil(len(x_train01) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup = args.warmup_epochs * steps_per_epoch

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train01), generator=generator)
        loss_sum = correct = 0.0
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb = (shift_batch(x_train01[idx], generator) - mean) / std
            yb = y_train[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(-1) == yb).sum())
        if epoch % 10 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:4d}/{args.epochs}  loss {loss_sum / len(perm):.4f}  "
                  f"train acc (augmented) {correct / len(perm):.4f}  {time.perf_counter() - start:6.1f}s")
    train_time = time.perf_counter() - start
    model.eval()

    # Write weights, then reload them and measure exactly what ships.
    from safetensors.torch import load_file, save_file

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = args.out_dir / demo.WEIGHTS_NAME
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(weights_path), metadata={"format": "pt"})
    weights_path.chmod(0o644)  # safetensors creates the file owner-only
    reloaded = demo.build_model(demo.MODEL_KWARGS, load_file(str(weights_path)))

    x_test = demo.normalise(x01[test_idx], mean, std)
    y_test = torch.tensor(y[test_idx])
    batches = [(x_test[i : i + 256], y_test[i : i + 256]) for i in range(0, len(x_test), 256)]
    test_correct, test_total = demo.count_correct(reloaded, batches)
    top1 = test_correct / test_total
    print(f"FP32 test top-1: {test_correct}/{test_total} = {top1:.4f}  (training {train_time:.1f}s)")

    preprocess = Preprocess(
        input_size=(1, 8, 8), mean=(mean,), std=(std,), interpolation="bicubic", crop_pct=1.0, crop_mode="center"
    )
    import hashlib

    import timm

    card = {
        "name": "vitqc_demo_digits",
        "description": "Small ViT trained by vitqc on scikit-learn's digits (8x8 grey, 10 classes); "
        "the default model for demos and tests.",
        "architecture": "timm.models.vision_transformer.VisionTransformer",
        "model_kwargs": demo.MODEL_KWARGS,
        "num_params": n_params,
        "weights": demo.WEIGHTS_NAME,
        "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        "preprocess": preprocess.to_dict(),
        "dataset": {
            "name": "sklearn.datasets.load_digits",
            "num_images": int(len(y)),
            "pixel_values": "integers 0..16",
            "scaling": "x / 16 -> [0, 1], then (x - mean) / std with the train split's pixel mean/std",
            "classes": list(range(10)),
        },
        "split": {
            "seed": demo.SPLIT_SEED,
            "method": "vitqc.demo.split_indices: stratified, per-class np.random.RandomState(seed) permutation",
            "train_size": int(len(train_idx)),
            "test_size": int(len(test_idx)),
            "test_indices_sha256": demo.indices_digest(test_idx),
        },
        "training": {
            "command": " ".join(["python", "tools/train_demo.py", *argv]),
            "seed": args.seed,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": "AdamW",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "schedule": f"linear warmup {args.warmup_epochs} epochs, then cosine to 0 (per step)",
            "label_smoothing": args.label_smoothing,
            "augmentation": "random shift by -1..+1 px in x and y (zero background fill)",
            "device": "cpu",
            "threads": args.threads,
            "train_time_s": round(train_time, 1),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
        },
        "metrics": {
            "fp32_test_top1": top1,
            "test_correct": test_correct,
            "test_total": test_total,
            "eval": "vitqc.demo.count_correct over the test split in batches of 256",
        },
    }
    card_path = args.out_dir / demo.CARD_NAME
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {weights_path} and {card_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
