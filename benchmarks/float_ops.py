"""What vitqc's reproducible float ops cost in PyTorch: GELU and LayerNorm as a materialized program defines them
(``vitqc.quant.rational_gelu``, ``vitqc.quant.pairwise_layer_norm``) against ATen's kernels, at ViT shapes.

    python benchmarks/float_ops.py [--runs 30] [--threads 1] [--tag TAG]

Per shape: medians of ``--runs`` calls, the variants interleaved (same machine load), and whether each vitqc form
gives the values its exported program gives (``rational_gelu_fast`` is how a program run in PyTorch computes
``rational_gelu``). Shapes: rows = batch 8 x tokens (ViT-S/16 at 224 px: 197; vits14_cifar10 at 112 px: 65),
GELU over the MLP width 1536, LayerNorm over 384.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from common import cpu_model, interleaved_ms, write_result

SHAPES = {"vit_small_patch16_224 b8": 8 * 197, "vits14_cifar10 b8": 8 * 65}


def timed(fns: dict, runs: int) -> dict[str, float]:
    """Median ms of each callable, called in turn ``runs`` times after 3 warm-up rounds (to the microsecond)."""
    return {k: round(v, 3) for k, v in interleaved_ms(fns, runs).items()}


def main() -> None:
    from vitqc.quant.pairwise_layer_norm import pairwise_layer_norm
    from vitqc.quant.rational_gelu import rational_gelu, rational_gelu_fast

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with torch.no_grad():
        for label, n in SHAPES.items():
            g = torch.Generator().manual_seed(0)
            h, x = torch.randn(n, 1536, generator=g) * 2, torch.randn(n, 384, generator=g) * 3
            w, b = torch.rand(384, generator=g) + 0.5, torch.randn(384, generator=g)
            ms = timed({"gelu aten": lambda: F.gelu(h), "gelu vitqc (exported ops)": lambda: rational_gelu(h),
                        "gelu vitqc (in place, as run in PyTorch)": lambda: rational_gelu_fast(h),
                        "layer_norm aten": lambda: F.layer_norm(x, (384,), w, b, 1e-6),
                        "layer_norm vitqc": lambda: pairwise_layer_norm(x, w, b, 1e-6)}, args.runs)
            row = {"shape": label, "rows": n, "ms": ms,
                   "gelu_fast_equal": bool(torch.equal(rational_gelu_fast(h), rational_gelu(h))),
                   "gelu_ratio_vs_aten": round(ms["gelu vitqc (in place, as run in PyTorch)"] / ms["gelu aten"], 2),
                   "layer_norm_ratio_vs_aten": round(ms["layer_norm vitqc"] / ms["layer_norm aten"], 2)}
            rows.append(row)
            print(row, flush=True)
    write_result("float_ops", {"rows": rows, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
                               "load_avg": os.getloadavg()}, args.tag)


if __name__ == "__main__":
    main()
