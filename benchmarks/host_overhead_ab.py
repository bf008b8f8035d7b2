"""Host and dispatch overhead of one joint step: this working tree against an earlier revision.

    python benchmarks/host_overhead_ab.py --base REV [--repeats 3] [--width 48] [--steps 60] [--no-compile]
        [--model vit_small_patch16_224] [--img-size 32] [--batch 2] [--threads 1]

A joint step on a GPU is bound by host and launch overhead (README), which a CPU can measure when the arithmetic
is taken away: timm ``vit_small_patch16_224``'s graph with every width ``--width`` (48: 6 heads of 8), 32 px
images (4 patches), batch 2, W4A4 per token, one thread: the same quantizers, optimizer groups and ops per step
as ViT-S, next to no arithmetic. Each revision runs in its own process (``REV`` checked out in a temporary git
worktree, imported through PYTHONPATH), the two alternated ``--repeats`` times; each process times the steps
after joint_optimize's warm-up, eager and (unless ``--no-compile``) with ``joint_optimize.compile``. Medians and
their ratio go to results/host_overhead_ab.json. ``--width 0`` keeps the model's own widths: with a real shape
(e.g. ``--model vit_small_patch14_dinov2 --img-size 112 --batch 8 --threads 2``) it times the whole step instead.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, joint_step_pipeline, machine, write_result


def child(args: argparse.Namespace, compiled: list[bool]) -> None:
    import copy

    import timm
    import torch

    import vitqc
    from vitqc.passes.joint_optimize import WARMUP_STEPS

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    widths = {"embed_dim": args.width} if args.width else {}
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size, **widths).eval()
    calib = [torch.randn(args.batch, 3, args.img_size, args.img_size)]
    total = args.steps + WARMUP_STEPS
    out = {"vitqc": str(Path(vitqc.__file__).parents[1])}
    for c in compiled:
        pipe = joint_step_pipeline("w4a4", "token", args.batch, total, compile=c)
        gm = vitqc.compile(copy.deepcopy(model), pipe, calib, quiet=True)
        gm = getattr(gm, "quantized", gm)  # a CompileResult; revisions before the library restructure return the graph
        r = gm.meta["vitqc"]["record"]["joint_optimize"]
        out["compiled" if c else "eager"] = 1e3 * (r["seconds"] - r["warmup_seconds"]) / (total - r["warmup_steps"])
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", help="the git revision to compare this working tree with")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width", type=int, default=48, help="every width N, a multiple of the head count (0: the model's own)")
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    modes = [False] if args.no_compile else [False, True]
    if args.child:
        return child(args, modes)
    if not args.base:
        sys.exit("error: --base REV is required (e.g. --base HEAD~3)")
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True)
    if base_rev.returncode:
        sys.exit(f"error: --base {args.base}: not a git revision here ({base_rev.stderr.strip()})")
    base_rev = base_rev.stdout.strip()
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "vitqc"], cwd=ROOT, capture_output=True, text=True).stdout)
    times: dict[str, list[dict]] = {"base": [], "tree": []}
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(worktree), base_rev], cwd=ROOT, check=True)
        try:
            for i in range(args.repeats):
                for name, tree in (("base", worktree), ("tree", ROOT)):
                    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--width", str(args.width),
                           "--steps", str(args.steps), "--model", args.model, "--img-size", str(args.img_size),
                           "--batch", str(args.batch), "--threads", str(args.threads)]
                    cmd += ["--no-compile"] if args.no_compile else []
                    # run from the temporary folder: the working tree's vitqc must not shadow the base's
                    done = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
                    if done.returncode:
                        sys.exit(f"error: the {name} run failed:\n{done.stderr[-2000:]}")
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    if Path(row["vitqc"]).resolve() != Path(tree).resolve():
                        sys.exit(f"error: the {name} run imported vitqc from {row['vitqc']}, not {tree}")
                    times[name].append(row)
                    print(f"run {i + 1}/{args.repeats} {name}: " + ", ".join(
                        f"{m} {row[m]:.1f} ms" for m in ("eager", "compiled") if m in row), flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT)
    result = {"base": base_rev, "tree": head_rev + ("+changes" if dirty else ""), "model": args.model,
              "width": args.width, "img_size": args.img_size, "batch": args.batch, "threads": args.threads, "steps": args.steps, "repeats": args.repeats, "machine": machine(), "modes": {}}
    print(f"\n| step | {base_rev} ms | {result['tree']} ms | speedup |\n|---|---|---|---|")
    for mode in ("eager", "compiled")[:len(modes)]:
        a = statistics.median(r[mode] for r in times["base"])
        b = statistics.median(r[mode] for r in times["tree"])
        result["modes"][mode] = {"base_ms": round(a, 2), "tree_ms": round(b, 2), "speedup": round(a / b, 3),
                                 "base_runs": [round(r[mode], 2) for r in times["base"]],
                                 "tree_runs": [round(r[mode], 2) for r in times["tree"]]}
        print(f"| {mode} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    # one file per shape: the host-overhead proxy keeps its name
    proxy = (args.model, args.width, args.img_size, args.batch) == ("vit_small_patch16_224", 48, 32, 2)
    write_result("host_overhead_ab", result, tag="" if proxy else f"{args.model}-{args.img_size}px-b{args.batch}-w{args.width}")


if __name__ == "__main__":
    main()
