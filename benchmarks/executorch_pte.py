"""ExecuTorch (XNNPACK) .pte of vitqc's quantized model vs an fp32 .pte of the same model: latency, size, and
top-1 agreement with vitqc's quantized (integer) program on the CIFAR-10 test set.

    python benchmarks/executorch_pte.py [--model vits14_cifar10|vit_small_patch16_224] [--schemes w8a8,w8a8-token,...]
        [--batch 1] [--limit N] [--runs 20] [--threads 1] [--calib-size 256] [--tag TAG] [--latency-only]
        [--attention vitqc|fp32]
    python benchmarks/executorch_pte.py --time BASELINE.pte OTHER.pte ... [--runs 30] [--tag TAG]

``--time`` re-times .pte files already written (the runs above keep theirs in a printed temp folder), calls
interleaved, each as a ratio to the first: for timing on a quiet machine apart from the long agreement pass.

Both programs are lowered from the same float graph (vitqc's dequantized weights; the fp32 one without
quantization), with a static batch (``--batch``, default 1), and run with ``executorch.runtime``.
timm ``vit_small_patch16_224`` has random weights and random calibration images: latency and size only. Latency: median of ``--runs`` calls after
3 warm-up calls, fp32 and quantized calls interleaved. Agreement: argmax of the quantized .pte against
vitqc's quantized program, image by image, on ``--limit`` test images spread over the classes (default all
10,000). Next to it, the agreement of vitqc's own program computed with float GEMMs (``float_program`` run
eagerly: the same quantizers, fp32 accumulation instead of exact integer sums): how far rounding noise alone
moves the argmax of this model, the floor any float runtime can reach (with ``--attention fp32`` that program
also drops the attention quantizers: what the substitution itself changes). The line printed before lowering
says what XNNPACK runs instead of vitqc's scheme.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vitqc.backends.executorch import ATTENTION

from common import Timer, decode_eval_set, load_timing_model, write_result

# scheme -> (pipeline, options changed). "-token": per-token activations, which XNNPACK's dynamic int8 takes exactly
# at A8 and A4 (see vitqc.backends.executorch._device_act); the minmax pipelines' own activations are per tensor.
TOKEN = {"insert_quantizers__act_granularity": "token"}
SCHEMES = {"w8a8": ("minmax-w8a8", {}), "w4a8": ("minmax-w4a8", {}), "w4a4": ("minmax-w4a4", {}),
           "w8a8-token": ("minmax-w8a8", TOKEN), "w4a8-token": ("minmax-w4a8", TOKEN), "w4a4-token": ("minmax-w4a4", TOKEN),
           # the joint pipelines' models (channel_rescale folded in; "-rescaled": no optimization steps, "-joint": a
           # short run) per token: is the quantized model itself less sensitive to float rounding than min-max's?
           # No (vits14, 2,000 images, batch 8): agreement 97.85 % for both, as min-max's; vitqc with float GEMMs
           # 98.10 / 97.95 % (executorch_pte-vits14-rescaled.json)
           "w8a8-token-rescaled": ("joint-w8a8", {**TOKEN, "joint_optimize__iterations": 0}),
           "w8a8-token-joint": ("joint-w8a8", {**TOKEN, "joint_optimize__iterations": 200, "joint_optimize__batch_size": 8})}


def latency(fp32_method, q_method, x, runs: int) -> tuple[float, float]:
    a, b = [], []
    for _ in range(3):
        fp32_method.execute([x])
        q_method.execute([x])
    for _ in range(runs):
        t = time.perf_counter()
        fp32_method.execute([x])
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        q_method.execute([x])
        b.append(time.perf_counter() - t)
    return 1e3 * statistics.median(a), 1e3 * statistics.median(b)


def time_files(paths: list[str], runs: int, tag: str) -> None:
    from vitqc.backends.executorch import load_pte

    methods = {p: load_pte(p) for p in paths}
    x = torch.randn(*methods[paths[0]].metadata.input_tensor_meta(0).sizes())
    times: dict[str, list[float]] = {p: [] for p in paths}
    for i in range(runs + 3):
        for p, m in methods.items():
            t = time.perf_counter()
            m.execute([x])
            if i >= 3:
                times[p].append(time.perf_counter() - t)
    base = statistics.median(times[paths[0]])
    rows = [{"pte": p, "bytes": Path(p).stat().st_size, "ms": round(1e3 * statistics.median(times[p]), 2),
             "speedup_vs_first": round(base / statistics.median(times[p]), 2)} for p in paths]
    for r in rows:
        print(f"| {r['pte']} | {r['ms']} ms | x{r['speedup_vs_first']} | {r['bytes'] / 1e6:.2f} MB |")
    write_result("executorch_pte", {"timed": rows, "runs": runs, "cores": os.cpu_count(),
                                    "load_avg": os.getloadavg()}, tag)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vits14_cifar10")
    ap.add_argument("--schemes", default="w8a8,w4a8")
    ap.add_argument("--batch", type=int, default=1, help="static batch of both .pte programs")
    ap.add_argument("--limit", type=int, default=None, help="test images (default: all)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the vitqc reference model")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--tag", default="", help="results/executorch_pte[-TAG].json")
    ap.add_argument("--latency-only", action="store_true", help="latency and size only, no agreement pass")
    ap.add_argument("--attention", default="vitqc", choices=ATTENTION,
                    help="attention matmuls on vitqc's codes, or in fp32 (lower_executorch's attention option)")
    ap.add_argument("--time", nargs="+", metavar="PTE", help="only time these .pte files (ratios to the first)")
    args = ap.parse_args()
    if args.time:
        return time_files(args.time, max(args.runs, 20), args.tag)
    torch.set_num_threads(args.threads)
    import vitqc
    from vitqc.backends.executorch import float_program, load_pte, lower_executorch, run_pte, save_pte

    module, calib, data = load_timing_model(args.model, args.calib_size)
    latency_only = args.latency_only or data is None  # random-weight timm models have no eval set
    if data is None:
        test = [(torch.randn(args.batch, *calib[0].shape[1:], generator=torch.Generator().manual_seed(1)), None)]
    else:
        pre, eval_dir = data
        test = decode_eval_set(eval_dir, pre, limit=args.batch if latency_only else args.limit, batch_size=100)
    n_test = 0 if latency_only else sum(len(y) for _, y in test)
    tmp = Path(tempfile.mkdtemp(prefix="vitqc-pte-"))
    print(f".pte files go to {tmp}", flush=True)
    rows = []
    for scheme in args.schemes.split(","):
        with Timer() as tc:
            pipeline, options = SCHEMES[scheme]
            gm = vitqc.compile(copy.deepcopy(module), pipeline, calib, quiet=True, **options).quantized
        print(f"{args.model} {scheme}: compiled in {tc.seconds:.0f}s", flush=True)
        with Timer() as tl:
            fp32 = lower_executorch(gm, fp32=True, batch=args.batch, announce=None)
            quant = lower_executorch(gm, batch=args.batch, attention=args.attention,
                                     announce=lambda line: print(f"  {line}", flush=True))
        fp32_path, q_path = save_pte(fp32, tmp / f"{scheme}-fp32.pte"), save_pte(quant, tmp / f"{scheme}.pte")
        print(f"  lowered both in {tl.seconds:.0f}s: fp32 {fp32.delegates} delegate segments, "
              f"quantized {quant.delegates}", flush=True)
        fp32_m, q_m = load_pte(fp32_path), load_pte(q_path)
        x = test[0][0][:args.batch].contiguous()
        fp_ms, q_ms = latency(fp32_m, q_m, x, args.runs)
        print(f"  latency batch {args.batch}: fp32 .pte {fp_ms:.1f} ms, quantized .pte {q_ms:.1f} ms (x{fp_ms / q_ms:.2f})", flush=True)
        agree = agree_float = right_q = right_pte = right_fp = right_fp32pte = 0
        float_gemm = None if latency_only else float_program(gm, attention=args.attention)[0]
        with Timer() as te, torch.no_grad():
            for xb, yb in ([] if latency_only else test):
                ref = gm(xb).argmax(1)
                agree_float += int((float_gemm(xb).argmax(1) == ref).sum())
                got = run_pte(q_m, xb, batch=args.batch).argmax(1)
                got_fp = run_pte(fp32_m, xb, batch=args.batch).argmax(1)
                agree += int((got == ref).sum())
                right_q += int((ref == yb).sum())
                right_pte += int((got == yb).sum())
                right_fp32pte += int((got_fp == yb).sum())
                right_fp += int((module(xb).argmax(1) == yb).sum())
        row = {"model": args.model, "scheme": scheme, "batch": args.batch, "attention": args.attention, "pipeline": SCHEMES[scheme][0], "options": SCHEMES[scheme][1], "substitution": quant.substitution,
               "fp32_pte_bytes": fp32_path.stat().st_size, "pte_bytes": q_path.stat().st_size,
               "size_ratio": q_path.stat().st_size / fp32_path.stat().st_size,
               "fp32_pte_ms": round(fp_ms, 2), "pte_ms": round(q_ms, 2), "speedup": round(fp_ms / q_ms, 2),
               "delegates_fp32": fp32.delegates, "delegates": quant.delegates, "portable_ops": quant.portable_ops,
               "images": n_test}
        if not latency_only:
            row.update({"agreement_with_vitqc": agree / n_test, "agreement_float_gemm_with_vitqc": agree_float / n_test,
                        "top1_vitqc": right_q / n_test, "top1_pte": right_pte / n_test,
                        "top1_fp32_pte": right_fp32pte / n_test, "top1_fp32_eager": right_fp / n_test,
                        "eval_seconds": round(te.seconds)})
        rows.append(row)
        print(f"  {row}", flush=True)
        write_result("executorch_pte", {"rows": rows, "args": vars(args), "cores": os.cpu_count(),
                                        "load_avg": os.getloadavg()}, args.tag)
    print("\n| model | batch | scheme | .pte ms (fp32 .pte ms) | speedup | size MB (fp32 MB) | size ratio | delegates | "
          "agreement with vitqc | vitqc with float GEMMs vs vitqc | top-1 .pte / vitqc / fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        quality = "– | – | –" if latency_only else (
            f"{r['agreement_with_vitqc']:.2%} ({r['images']} images) | {r['agreement_float_gemm_with_vitqc']:.2%} | "
            f"{r['top1_pte']:.2%} / {r['top1_vitqc']:.2%} / {r['top1_fp32_eager']:.2%}")
        print(f"| {r['model']} | {r['batch']} | {r['scheme']} | {r['pte_ms']} ({r['fp32_pte_ms']}) | {r['speedup']} | "
              f"{r['pte_bytes'] / 1e6:.2f} ({r['fp32_pte_bytes'] / 1e6:.2f}) | {r['size_ratio']:.2f} | {r['delegates']} | "
              f"{quality} |")


if __name__ == "__main__":
    main()
