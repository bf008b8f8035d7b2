"""Coverage across architectures: does every linear weight and attention matmul of each ViT family run quantized?

    python benchmarks/coverage.py [--archs vit,hf_swin,...] [--calib 32] [--heldout 64] [--threads 1]
    python benchmarks/coverage.py --table      # the README's table, from benchmarks/results/coverage.json

Every architecture of ``vitqc/architectures.py`` (timm, transformers, torchvision, ``nn.TransformerEncoder``,
a ``.pt2`` program), small, random weights; transformers models go through ``save_pretrained`` and
``hf:DIR`` as a user's would. Each is compiled with ``minmax-w8a8 --strict`` (``vitqc.compile``) on ``--calib``
Gaussian-noise images (the model's input space) and measured as ``vitqc compile`` measures (the artifact's
torch.export programs of the quantized and the FP reference graph) on ``--heldout`` other noise images: argmax
agreement, the worst per-layer SQNR (weight layers' outputs) and the output's SQNR.
Random weights and noise inputs: agreement here says that the program computes the model, not how accurate a
trained model stays. Per row: the capture front end and why, linear weights quantized (share of weight
elements), attention matmuls integer / present, convolutions, every layer left in floating point with its
reason, compile seconds. Results: benchmarks/results/coverage.json (table in the README).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine, write_result  # noqa: E402


def _model(arch, workdir: Path):
    """The model as a user would hand it over (transformers: save_pretrained, then hf:DIR)."""
    model = arch.model()
    if arch.source != "hf":
        return model, {"form": arch.source}
    from vitqc.models import load_model

    path = workdir / arch.name
    model.save_pretrained(path)
    loaded = load_model(f"hf:{path}", model_kwargs=arch.load_kwargs)
    return loaded.module, loaded.source


def _sqnr(signal: float, noise: float) -> float:
    return 10 * math.log10(signal / noise) if noise > 0 else float("inf")


def measure(arch, calib_images: int, heldout_images: int, workdir: Path) -> dict:
    import vitqc
    from vitqc.artifact import export_program
    from vitqc.capture import capture
    from vitqc.evaluate import compare
    from vitqc.passes.canonicalize import reference_copy

    model, source = _model(arch, workdir)
    calib = [arch.example(calib_images, seed=10)]
    heldout = list(arch.example(heldout_images, seed=20).split(16))
    start = time.perf_counter()
    graph = capture(model, calib[0][:2], quiet=True)
    reference = reference_copy(graph)
    gm = vitqc.compile(graph, "minmax-w8a8", calib, quiet=True, strict=True).quantized
    seconds = time.perf_counter() - start
    record = gm.meta["vitqc"]["record"]
    layers = [layer["path"] for layer in gm.meta["vitqc"]["layers"]
              if layer["kind"] in ("QuantLinear", "QuantConv2d")]
    # measured as `vitqc compile` measures: on the torch.export programs the artifact holds
    q_program = export_program(gm, calib[0][:1]).module()
    ref_program = export_program(reference, calib[0][:1]).module()
    result = compare(ref_program, q_program, heldout, layers, quiet=True)
    with torch.no_grad():
        want = torch.cat([reference(x) for x in heldout]).double()
        got = torch.cat([gm(x) for x in heldout]).double()
    sqnr = result.sqnr_db()
    worst = min(sqnr, key=sqnr.get) if sqnr else None
    cov = record["coverage"]
    return {
        "family": arch.family, "source": arch.source, "loaded_as": source.get("form"),
        "attn_implementation": source.get("attn_implementation"),
        "frontend": record["capture"]["frontend"], "frontend_reason": record["capture"]["frontend_reason"],
        "linear_layers": [cov["linear"]["quantized"], cov["linear"]["present"]],
        "linear_weights_quantized": cov["linear_fraction"],
        "linear_weights": cov["linear"]["params"],
        "attention_matmuls_integer": [cov["matmul"]["integer"], cov["matmul"]["present"]],
        "convs": [cov["conv"]["quantized"], cov["conv"]["present"], cov["conv"]["integer"]],
        "float_layers": cov["float_layers"],
        "heldout_agreement": result.agreement,
        "worst_layer_sqnr_db": None if worst is None else round(sqnr[worst], 2), "worst_layer": worst,
        "output_sqnr_db": round(_sqnr(float((want ** 2).sum()), float(((want - got) ** 2).sum())), 2),
        "compile_s": round(seconds, 2),
    }


def table(payload: dict) -> str:
    """The README's markdown table of a results file."""
    lines = ["| architecture | front end | linear weights quantized | attention matmuls integer | held-out agreement | "
             "worst layer SQNR dB | compile s |", "|---|---|---|---|---|---|---|"]
    for row in payload["rows"].values():
        if "error" in row:
            lines.append(f"| {row['family']} | failed: {row['error']} | | | | | |")
            continue
        front = row["frontend"] + ("" if row["frontend"] == "fx" or row["source"] in ("hf", "pt2") else " (fallback)")
        left = f" ({len(row['float_layers'])} FP: see results)" if row["float_layers"] else ""
        lines.append(f"| {row['family']} | {front} | {row['linear_weights_quantized']:.0%} "
                     f"({row['linear_layers'][0]}/{row['linear_layers'][1]}){left} | "
                     f"{row['attention_matmuls_integer'][0]}/{row['attention_matmuls_integer'][1]} | "
                     f"{row['heldout_agreement']:.1%} | {row['worst_layer_sqnr_db']:.1f} | {row['compile_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    from vitqc.architectures import ARCHITECTURES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(ARCHITECTURES))
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="coverage")
    ap.add_argument("--table", action="store_true", help="print the README table of results/OUT.json and stop")
    args = ap.parse_args()
    if args.table:
        from common import RESULTS

        print(table(json.loads((RESULTS / f"{args.out}.json").read_text())))
        return
    torch.set_num_threads(args.threads)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        measure(ARCHITECTURES["vit"], 2, 2, Path(tmp))  # warm-up: imports and first calls are not compile time
        for name in args.archs.split(","):
            try:
                row = measure(ARCHITECTURES[name], args.calib, args.heldout, Path(tmp))
            except Exception as e:  # a row that fails says why; the others still run
                row = {"family": ARCHITECTURES[name].family, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
                traceback.print_exc()
            rows[name] = row
            if "error" in row:
                print(f"{name:24s} FAILED {row['error']}", flush=True)
            else:
                print(f"{name:24s} {row['frontend']:6s} linear {row['linear_weights_quantized']:7.2%} "
                      f"({row['linear_layers'][0]}/{row['linear_layers'][1]})  matmuls "
                      f"{row['attention_matmuls_integer'][0]}/{row['attention_matmuls_integer'][1]}  agreement "
                      f"{row['heldout_agreement']:.3f}  worst {row['worst_layer_sqnr_db']} dB  "
                      f"out {row['output_sqnr_db']} dB  {row['compile_s']:.1f}s", flush=True)
    payload = {"pipeline": "minmax-w8a8 --strict", "calib_images": args.calib, "heldout_images": args.heldout,
               "inputs": "standard-normal noise in the model's input space (calibration and held-out draws differ)",
               "machine": machine(), "rows": rows}
    print(write_result(args.out, payload))


if __name__ == "__main__":
    main()
