"""Accuracy of the min-max baselines vs FP and vs the standard toolkit (torchao PT2E + XNNPACKQuantizer).

    python benchmarks/accuracy_minmax.py [--models vit_tiny_cifar10,...] [--limit N] [--calib-size N]

Full test sets by default. Calibration: ../shared/assets/data/cifar10/calib (1,000 images) for the CIFAR-10
models, ../shared/assets/data/mnist/calib (the 1,000 MNIST digits not in mnist/test) for vit_tiny_mnist.
The PT2E baseline is XNNPACK's static per-channel W8A8 (symmetric int8 weights per channel, int8 activations
per tensor) on the same calibration images, in two forms: XNNPACK's global config (which also quantizes
residual adds and layer-scale multiplications) and linear-only (matmul inputs only).
"""
from __future__ import annotations

import argparse
import copy

import torch

from common import Timer, decode_eval_set, folder_batches, load_reference_model, require_shared, top1, write_result

PIPELINES = ("minmax-w8a8", "minmax-w4a4")
PT2E = ("pt2e-xnnpack-w8a8", "pt2e-xnnpack-w8a8-linear-only")


def pt2e_xnnpack(module, calib, linear_only: bool):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True)
    quantizer = XNNPACKQuantizer()
    if linear_only:
        quantizer.set_operator_type(torch.ops.aten.linear.default, config)
    else:
        quantizer.set_global(config)
    example = calib[0][:2]  # two images: batch 1 would be specialised to a constant
    batch = torch.export.Dim("batch", min=1, max=4096)
    graph = torch.export.export(copy.deepcopy(module).eval(), (example,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for b in calib:
            prepared(b)
    return convert_pt2e(prepared)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vit_tiny_cifar10,vit_tiny_mnist,vits14_cifar10")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on N test images (default: all)")
    ap.add_argument("--calib-size", type=int, default=None, help="calibration images (default: all 1,000)")
    ap.add_argument("--result", default="accuracy_minmax", help="name of the JSON file in benchmarks/results")
    ap.add_argument("--methods", default="all", help="comma-separated subset of: " + ",".join(PIPELINES + PT2E))
    args = ap.parse_args()
    require_shared()
    import vitqc
    rows = []
    for name in args.models.split(","):
        module, pre, eval_dir, calib_dir, card = load_reference_model(name)
        calib = folder_batches(calib_dir, pre, args.calib_size)
        test = decode_eval_set(eval_dir, pre, limit=args.limit)
        n = sum(len(y) for _, y in test)
        with Timer() as t:
            fp = top1(module, test)
        row = {"model": name, "images": n, "calib_images": sum(len(b) for b in calib), "fp32": fp,
               "card_fp32": card["fp32_top1"], "seconds": {"fp32": round(t.seconds, 1)}}
        print(f"{name}: FP32 {fp:.4f} on {n} images ({t.seconds:.0f}s)", flush=True)
        wanted = set(PIPELINES + PT2E) if args.methods == "all" else set(args.methods.split(","))
        for pipeline in (p for p in PIPELINES if p in wanted):
            with Timer() as tc:
                q = vitqc.compile(copy.deepcopy(module), pipeline, calib, quiet=True).quantized
            with Timer() as te:
                row[pipeline] = top1(q, test)
            row["seconds"][pipeline] = {"compile": round(tc.seconds, 1), "eval": round(te.seconds, 1)}
            print(f"{name}: {pipeline} {row[pipeline]:.4f} ({tc.seconds:.0f}s + {te.seconds:.0f}s)", flush=True)
        for label, linear_only in ((l, o) for l, o in zip(PT2E, (False, True)) if l in wanted):
            with Timer() as tc:
                q = pt2e_xnnpack(module, calib, linear_only)
            with Timer() as te:
                row[label] = top1(q, test)
            row["seconds"][label] = {"compile": round(tc.seconds, 1), "eval": round(te.seconds, 1)}
            print(f"{name}: {label} {row[label]:.4f} ({tc.seconds:.0f}s + {te.seconds:.0f}s)", flush=True)
        rows.append(row)
        write_result(args.result, {"rows": rows, "limit": args.limit})
    cols = ["fp32", *(c for c in PIPELINES + PT2E if all(c in r for r in rows))]
    print("\n| model | images | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{100 * r[c]:.2f}" + ("" if c == "fp32" else f" ({100 * (r[c] - r['fp32']):+.2f})") for c in cols]
        print(f"| {r['model']} | {r['images']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
