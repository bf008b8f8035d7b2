"""Packed backend: latency vs fp32 eager in the same process, size on disk, and agreement with the artifact.

    python benchmarks/backend_latency.py [--models vits14_cifar10,vit_small_patch16_224] [--batches 1,8]
        [--schemes w8a8,w4a8,w4a4,t158a8] [--runs 20] [--threads 1] [--compile] [--agreement N] [--device cuda]

Latency: median of ``--runs`` timed calls after 3 warm-up calls, each scheme's calls interleaved with the
baseline's calls on the same input (so both medians see the same machine load); ratio = baseline median /
scheme median. The baseline is fp32 eager on the CPU and bf16 eager with ``--device cuda`` (fp32 eager is
then a row of its own). Rows: ``packed`` (``packed.module()``, the default: weights unpacked once at load, int8 in
memory; results files before issue 25 call it ``packed-load``), ``packed-call`` (unpacked inside every call; was
``packed``), ``artifact`` (the materialized integer program the artifact exports), ``fake-quant`` (the
graph before materialize: dequantized values, float GEMMs) and, with ``--compile``, ``packed+inductor``
(``torch.compile`` of the packed program: fuses the quantize/unpack/dequantize elementwise ops; compile time
printed). ``vit_small_patch16_224`` has random weights (timing only) and random calibration images.

Size: the saved packed program (``.pt2``) in bytes per parameter of the whole model, and the quantized layers'
weight storage (packed codes + per-channel scale/zero-point/correction) per weight against the limit bits/8.

Agreement (``--agreement N``, vits14_cifar10): packed vs the artifact's exported integer program on N CIFAR-10
test images (bit-identical?, max relative logit difference, argmax agreement), next to the argmax agreement
of that program with the fake-quant graph it came from: what float accumulation alone changes.
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

from common import Timer, cpu_model, decode_eval_set, load_timing_model, without, write_result

SCHEMES = {
    "w8a8": ("minmax-w8a8", 8, "2bit"),
    "w4a8": ("minmax-w4a8", 4, "2bit"),
    "w4a4": ("minmax-w4a4", 4, "2bit"),
    "t158a8": ("canonicalize,insert_quantizers{weight_bits=1.58,act_bits=8,keep={head=8,patch_embed=8}},"
               "calibrate,materialize", 1.58, "2bit"),
    "t158a8-base3": ("canonicalize,insert_quantizers{weight_bits=1.58,act_bits=8,keep={head=8,patch_embed=8}},"
                     "calibrate,materialize", 1.58, "base3"),
}


def interleaved(baseline, candidate, x, runs: int, sync=lambda: None) -> tuple[float, float]:
    """Medians (ms) of baseline and candidate, timed alternately after 3 warm-up calls each (``sync`` waits
    for the GPU before each clock read)."""
    a, b = [], []
    with torch.no_grad():
        for _ in range(3):
            baseline(x)
            candidate(x)
        sync()
        for _ in range(runs):
            t = time.perf_counter()
            baseline(x)
            sync()
            a.append(time.perf_counter() - t)
            t = time.perf_counter()
            candidate(x)
            sync()
            b.append(time.perf_counter() - t)
    return 1e3 * statistics.median(a), 1e3 * statistics.median(b)


def sizes(packed, path: Path, n_params: int) -> dict:
    from vitqc.backends.packed import save_packed

    save_packed(packed, path)
    s = packed.manifest["summary"]
    return {"file_bytes": path.stat().st_size, "file_bytes_per_param": path.stat().st_size / n_params,
            "weight_bytes_per_weight": (s["packed_bytes"] + s["per_channel_bytes"]) / s["weight_params"],
            "packed_only_bytes_per_weight": s["packed_bytes"] / s["weight_params"]}


def limit_bytes_per_weight(packed) -> float:
    """bits/8 per weight + one fp32 scale per output channel, with each layer at its own bit width."""
    total = sum(l["weight_params"] * l["weight_bits"] / 8 + 4 * l["shape"][0]
                for l in packed.manifest["layers"] if l["kind"] != "matmul")
    return total / packed.manifest["summary"]["weight_params"]


@torch.no_grad()
def agreement(artifact_program, packed_module, fake_quant, test) -> dict:
    """Packed vs the artifact's integer program (the goal: equal), and that program vs the fake-quant graph
    it was materialized from (float accumulation of dequantized values: the flips rounding alone causes)."""
    rel_max, agree, agree_fq, n, equal = 0.0, 0, 0, 0, True
    for x, _ in test:
        ref = artifact_program(x)
        got = packed_module(x)
        equal = equal and torch.equal(got, ref)
        rel_max = max(rel_max, float((got - ref).abs().max() / ref.abs().max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        agree_fq += int((fake_quant(x).argmax(1) == ref.argmax(1)).sum())
        n += len(x)
    return {"images": n, "packed_vs_artifact_max_rel": rel_max, "packed_vs_artifact_argmax_agreement": agree / n,
            "packed_vs_artifact_bit_identical": equal, "artifact_vs_fakequant_argmax_agreement": agree_fq / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vits14_cifar10,vit_small_patch16_224")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--schemes", default="w8a8,w4a8,w4a4,t158a8,t158a8-base3")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) of the packed program")
    ap.add_argument("--agreement", type=int, default=0, help="vits14_cifar10: packed vs the artifact program on N test images")
    ap.add_argument("--no-fakequant", action="store_true", help="skip timing the fake-quant graph and the artifact's program")
    ap.add_argument("--tag", default="", help="results/backend_latency[-TAG].json")
    ap.add_argument("--sizes-only", action="store_true", help="lower and save, no timing")
    ap.add_argument("--device", default="cpu", help="cuda: lower the packed program on the GPU and time it against "
                    "bf16 eager there (sizes and agreement are measured on the CPU runs only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import vitqc
    from vitqc.backends.packed import lower_packed

    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
               "torch": torch.__version__, "load_avg_start": os.getloadavg()}
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if gpu:
        machine["gpu"] = torch.cuda.get_device_name(device)
    print(f"machine: {machine}", flush=True)
    rows, sizes_rows, agree_rows = [], [], []
    tmp = Path(tempfile.mkdtemp(prefix="vitqc-bench-"))
    for model_name in args.models.split(","):
        model, calib, data = load_timing_model(model_name, args.calib_size)
        n_params = sum(p.numel() for p in model.parameters())
        shape = calib[0].shape[1:]
        # the baseline: fp32 eager on the CPU, bf16 eager on a GPU (where fp32 eager is timed as a variant)
        fp32_eager = copy.deepcopy(model).to(device)
        if gpu:
            bf16 = copy.deepcopy(model).to(device, torch.bfloat16)
            baseline_name, baseline = "bf16 eager", (lambda x: bf16(x.to(torch.bfloat16)))
        else:
            baseline_name, baseline = "fp32 eager", fp32_eager
        for scheme in args.schemes.split(","):
            pipeline, bits, ternary = SCHEMES[scheme]
            with Timer() as tc:  # the fake-quant graph, then its materialized (integer) program
                fake = vitqc.compile(copy.deepcopy(model), without(pipeline, "materialize"), calib, quiet=True).quantized
                gm = vitqc.compile(copy.deepcopy(fake), "materialize", quiet=True, example=calib[0][:1]).quantized
            with Timer() as tl:
                packed = lower_packed(gm.to(device), calib[0][:1].to(device), ternary=ternary)
            print(f"{model_name} {scheme}: compile {tc.seconds:.0f}s, lower {tl.seconds:.0f}s", flush=True)
            if not gpu:
                size = sizes(packed, tmp / f"{model_name}-{scheme}.pt2", n_params)
                size.update({"model": model_name, "scheme": scheme, "bits": bits,
                             "limit_bytes_per_weight": limit_bytes_per_weight(packed), "params": n_params})
                sizes_rows.append(size)
            variants = {"fp32 eager": fp32_eager} if gpu else {}
            variants.update({"packed-call": packed.module("call"), "packed": packed.module()})
            if not args.no_fakequant:
                variants["fake-quant"] = fake.to(device)
                variants["artifact"] = gm
            if args.compile:
                with Timer() as tcc:
                    compiled = packed.module("call", compile=True)
                    with torch.no_grad():
                        for b in args.batches.split(","):
                            compiled(torch.randn(int(b), *shape, device=device))
                print(f"  torch.compile: {tcc.seconds:.0f}s", flush=True)
                variants["packed+inductor"] = compiled
            for b in ([] if args.sizes_only else (int(v) for v in args.batches.split(","))):
                x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(b)).to(device)
                for variant, module in variants.items():
                    base_ms, ms = interleaved(baseline, module, x, args.runs, sync)
                    row = {"model": model_name, "batch": b, "scheme": scheme, "variant": variant, "device": str(device),
                           "ms": round(ms, 2), "baseline": baseline_name, "baseline_ms": round(base_ms, 2),
                           "speedup": round(base_ms / ms, 2)}
                    rows.append(row)
                    print(f"  batch {b} {variant:16s} {ms:9.2f} ms  {baseline_name} {base_ms:9.2f} ms  "
                          f"x{base_ms / ms:.2f}", flush=True)
            if args.agreement and not gpu and data is not None and model_name == "vits14_cifar10":
                pre, eval_dir = data
                test = decode_eval_set(eval_dir, pre, limit=args.agreement, batch_size=100)
                from vitqc.artifact import export_program

                with Timer() as ta:
                    a = agreement(export_program(gm, calib[0][:1]).module(), packed.module("load"), fake, test)
                a.update({"model": model_name, "scheme": scheme, "seconds": round(ta.seconds)})
                agree_rows.append(a)
                print(f"  agreement: {a}", flush=True)
            write_result("backend_latency", {"machine": machine, "args": vars(args), "latency": rows,
                                             "sizes": sizes_rows, "agreement": agree_rows}, args.tag)
    machine["load_avg_end"] = os.getloadavg()
    write_result("backend_latency", {"machine": machine, "args": vars(args), "latency": rows, "sizes": sizes_rows,
                                     "agreement": agree_rows}, args.tag)
    print(f"\nmachine: {machine}\n")
    print("| model | device | batch | scheme | variant | median ms | baseline | baseline ms | speedup |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['device']} | {r['batch']} | {r['scheme']} | {r['variant']} | {r['ms']} | "
              f"{r['baseline']} | {r['baseline_ms']} | {r['speedup']} |")
    print("\n| model | scheme | file B/param | weight B/weight (codes + per-channel) | codes only | limit bits/8 + scales |")
    print("|---|---|---|---|---|---|")
    for s in sizes_rows:
        print(f"| {s['model']} | {s['scheme']} | {s['file_bytes_per_param']:.3f} | {s['weight_bytes_per_weight']:.3f} | "
              f"{s['packed_only_bytes_per_weight']:.3f} | {s['limit_bytes_per_weight']:.3f} |")
    if agree_rows:
        print("\n| model | scheme | images | packed vs artifact: bit-identical / max rel / argmax | "
              "artifact vs fake-quant graph: argmax |")
        print("|---|---|---|---|---|")
        for a in agree_rows:
            print(f"| {a['model']} | {a['scheme']} | {a['images']} | {a['packed_vs_artifact_bit_identical']} / "
                  f"{a['packed_vs_artifact_max_rel']:.2e} / {a['packed_vs_artifact_argmax_agreement']:.2%} | "
                  f"{a['artifact_vs_fakequant_argmax_agreement']:.2%} |")


if __name__ == "__main__":
    main()
