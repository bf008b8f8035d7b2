"""Scaling the joint optimizer out (data parallelism) and up (memory and step time vs model size).

    python benchmarks/scaling.py dp --model demo|vit_tiny_cifar10 [--iterations N] [--batch-size B] [--nproc 2]
    python benchmarks/scaling.py memory [--models vit_small_patch16_224,vit_base_patch16_224,vit_large_patch16_224]
                                        [--batch 2] [--steps 2] [--threads 1] [--fp32]
    python benchmarks/scaling.py predict
    python benchmarks/scaling.py step --model M ...      (one measurement in its own process: what `memory` runs)
    python benchmarks/scaling.py time --model M ...      (the settings' step times in one process: what `memory` runs)

``dp`` runs ``vitqc compile MODEL --pipeline joint-w4a4`` twice through the CLI, as a user would: under
``torchrun --standalone --nproc-per-node N`` (gloo on the CPU) and in one process, at the same global batch, one
thread per process, and compares the loss curves in the two manifests, the top-1 of each, and the argmax agreement
of the two quantized programs (results/scaling_dp_<model>.json).

``memory`` runs a few joint steps (W4A4 per token, no augmentation, bf16 autocast where the CPU computes bf16
natively, as on a GPU; ``--fp32`` not) for each model shape with random weights at ``--batch``, plain, with
``activation_checkpointing``, with ``cache_teacher`` and with both, each in its own process: seconds per step
after joint_optimize's warm-up, the resident memory when training starts and its peak while training (sampled
every 10 ms). Then ``predict``: the memory model (below), checked against those CPU peaks and the H200 peaks
measured before (README), predicts batch-32 peak GPU memory for ViT-B/16, ViT-L/16 and ViT-H/14 at 224 px
(results/scaling_memory.json). ``memory --device cuda`` measures the same on a GPU (CUDA max allocated).

The memory model counts its components exactly (device-independent) on the quantized graph of each shape built
with 1 and 2 blocks at full width (the blocks are identical, so N blocks = outside + N x per block):
  static    = teacher weights + student weights + trainable tensors x 4 (values, gradients, Adam's two moments)
              + what the student keeps for backward whatever the batch (fake-quantized weights)
  per image = what the student keeps for backward (counted with saved-tensor hooks, under bf16 autocast) + the
              teacher's outputs the loss reads (logits, block outputs)
  peak(B)   = static + B x per image + B x m x one block's saved activations   (m: transient, fitted: on the CPU
              runs by least squares, for the GPU on the one H200 peak measured first in its process)
With ``activation_checkpointing`` the student keeps each block's input instead of what its blocks save (activations
and fake-quantized weights), plus one block's of those, recomputed in backward; with ``cache_teacher`` the teacher's
outputs for the whole pool (1,024 images assumed for the predictions) are static.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, SHARED, folder_batches, machine, require_shared, write_result

MODELS = ["vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"]
PREDICT = {"ViT-B/16": ("vit_base_patch16_224", 224, 12), "ViT-L/16": ("vit_large_patch16_224", 224, 24),
           "ViT-H/14": ("vit_huge_patch14_224", 224, 32)}
# peaks measured on one H200 (joint_throughput-cuda.json, README), bf16, eager. joint_throughput ran the plain and the
# fused fake-quant path one after the other in one process and did not free the first run's graph (fx graphs hold
# reference cycles) before the second's peak: only the first run of a process is clean.
H200 = [{"model": "vit_small_patch14_dinov2", "img_size": 112, "depth": 12, "batch": 32, "gib": 2.39, "fused": False,
         "clean": "yes: the first run of its process"},
        {"model": "vit_small_patch14_dinov2", "img_size": 112, "depth": 12, "batch": 32, "gib": 2.82, "fused": True,
         "clean": "no: measured after the plain run"},
        {"model": "vit_small_patch16_224", "img_size": 224, "depth": 12, "batch": 32, "gib": 6.37, "fused": False,
         "clean": "unknown: the median of runs 1 and 3"},
        {"model": "vit_small_patch16_224", "img_size": 224, "depth": 12, "batch": 32, "gib": 5.55, "fused": True,
         "clean": "no: runs 2 and 4"}]
CONFIGS = {"plain": {}, "checkpointing": {"activation_checkpointing": True}, "cache": {"cache_teacher": True},
           "both": {"activation_checkpointing": True, "cache_teacher": True}}
CACHE_POOL = 1024
PREDICT_BATCH = 32
GIB = 2**30


# ------------------------------------------------------------------------------------------- data parallel
def run_dp(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="vitqc-dp-"))
    try:
        if args.model == "demo":
            model_args = ["demo"]
        else:
            require_shared()
            saved = work / f"{args.model}.pt"
            subprocess.run([sys.executable, str(SHARED / "tools" / "zoo.py"), args.model, "--save", str(saved)], check=True)
            from common import DATASETS

            test_dir, calib_dir = (SHARED / "assets" / p for p in DATASETS[args.model])
            model_args = [str(saved), "--calib", f"images:{calib_dir}", "--eval-data", str(test_dir)]
            if args.eval_limit:
                model_args += ["--eval-limit", str(args.eval_limit)]
        common = ["compile", *model_args, "--pipeline", args.pipeline, "--seed", "0",
                  "--set", f"joint_optimize.iterations={args.iterations}", "--set", f"joint_optimize.batch_size={args.batch_size}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        runs = {}
        for name, launcher in (("one_process", [sys.executable, "-m", "vitqc.cli.main"]),
                               (f"{args.nproc}_processes", [torchrun, "--standalone", f"--nproc-per-node={args.nproc}",
                                                            "-m", "vitqc.cli.main"])):
            out = work / f"{name}.vitqc"
            started = time.perf_counter()
            proc = subprocess.run([*launcher, *common, "--out", str(out)], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - started
            if proc.returncode != 0:
                sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            print(proc.stdout.strip().splitlines()[-2 if args.model == "demo" else -1])
            runs[name] = {"path": out, "wall_s": round(wall, 1), "stdout_tail": proc.stdout.strip().splitlines()[-3:]}
        compare_dp(args, runs, perturbed_control(args, model_args))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def loss_parting(a: list, b: list) -> dict:
    """How two loss curves ([step, loss] rows at the same steps) part: relative differences, first step over 1e-5."""
    rel = [abs(y[1] - x[1]) / abs(x[1]) for x, y in zip(a, b)]
    assert [x[0] for x in a] == [y[0] for y in b]
    return {"first_step_over_1e-5": next((a[i][0] for i, d in enumerate(rel) if d > 1e-5), None),
            "rel_diff_max": max(rel), "rel_diff_first": rel[0], "rel_diff_last": rel[-1],
            "rel_diff_max_before_parting": max([d for d in rel if d <= 1e-5], default=None)}


def perturbed_control(args: argparse.Namespace, model_args: list[str]) -> dict:
    """The same one-process training twice in this process, once with the teacher's logits scaled by (1 + 1e-7), a
    stand-in for another float summation order: how far such a difference alone parts the loss curves."""
    import torch

    import vitqc
    from vitqc.passes import joint_optimize as jo

    torch.set_num_threads(1)
    if args.model == "demo":
        from vitqc.demo import demo_calibration, load_demo_model

        load, calib = load_demo_model, demo_calibration(size=None, seed=0)
    else:
        from vitqc.data import Preprocess
        from vitqc.models import load_model

        load = lambda: load_model(model_args[0]).module  # noqa: E731
        pre = Preprocess.from_timm(load_model(model_args[0]).data_config)
        calib = folder_batches(model_args[2].removeprefix("images:"), pre)
    sets = [f"joint_optimize.iterations={args.iterations}", f"joint_optimize.batch_size={args.batch_size}"]

    def curve(scale: float) -> list:
        real = jo._Training.__init__

        def init(self, *a, **k):
            real(self, *a, **k)
            loss = self.run_student_loss
            self.run_student_loss = lambda x, t_out, t_feats, scope: loss(x, t_out * scale, t_feats, scope)

        jo._Training.__init__ = init
        try:
            result = vitqc.compile(load(), args.pipeline, calib, quiet=True, seed=0, set=sets)
        finally:
            jo._Training.__init__ = real
        return loss_curve(result.record["joint_optimize"])

    return loss_parting(curve(1.0), curve(1 + 1e-7))


def loss_curve(record: dict) -> list[list[float]]:
    """[step, loss] pairs from joint_optimize's record (its loss history)."""
    history = record["history"]
    return [[step, loss] for step, loss in zip(history["step"], history["loss"])]


def compare_dp(args: argparse.Namespace, runs: dict, control: dict) -> None:
    import torch

    import vitqc

    arts = {name: vitqc.load(r["path"]) for name, r in runs.items()}
    one, many = arts.values()
    rec = {name: a.manifest["record"]["joint_optimize"] for name, a in arts.items()}
    r1, rn = rec.values()
    parting = loss_parting(loss_curve(r1), loss_curve(rn))
    # the two quantized programs' predictions on the eval images
    if args.model == "demo":
        from vitqc.demo import demo_eval_batches

        batches = list(demo_eval_batches())
    else:
        from common import DATASETS, decode_eval_set
        from vitqc.data import Preprocess

        batches = decode_eval_set(SHARED / "assets" / DATASETS[args.model][0],
                                  Preprocess.from_dict(one.manifest["preprocess"]), args.eval_limit)
    with torch.no_grad():
        preds = [torch.cat([a.quantized(x).argmax(-1) for x, _ in batches]) for a in (one, many)]
    agreement = float((preds[0] == preds[1]).float().mean())
    row = {"model": args.model, "pipeline": args.pipeline, "iterations": args.iterations, "batch_size": args.batch_size,
           "nproc": args.nproc, "threads_per_process": 1, "machine": machine(),
           "eval_images": len(preds[0]), "quantized_agreement": agreement, "loss_curves": parting,
           "control_one_process_logits_x_1e-7": control}
    for name, a in arts.items():
        s = a.manifest["summary"]
        row[name] = {"wall_s": runs[name]["wall_s"], "joint_seconds": rec[name]["seconds"],
                     "data_parallel": rec[name].get("data_parallel"), "final": rec[name]["final"],
                     "loss_curve": loss_curve(rec[name]),
                     **({"measured_on": s["measurement"]["on"], "top1": s["measurement"]["quantized_top1"],
                         "fp_top1": s["measurement"]["reference_top1"], "agreement_with_fp": s["measurement"]["agreement"]}
                        if "measurement" in s else {})}
    path = write_result(f"scaling_dp_{args.model}", row)
    names = list(arts)
    print("\n| run | joint wall s | final loss | top-1 % | agreement with FP % |\n|---|---|---|---|---|")
    for name in names:
        r = row[name]
        print(f"| {name} | {r['joint_seconds']} | {r['final']['loss']:.6f} | {100 * r.get('top1', float('nan')):.2f} | "
              f"{100 * r.get('agreement_with_fp', float('nan')):.2f} |")
    for label, p in ((f"{args.nproc} processes vs one", parting), ("one process, logits x (1 + 1e-7), vs as is", control)):
        before = p["rel_diff_max_before_parting"]
        print(f"loss curves, {label}: first logged step {p['rel_diff_first']:.1e} apart (relative); over 1e-5 from step "
              f"{p['first_step_over_1e-5'] or '- (never)'}" + (f" (within {before:.1e} before)" if before else "")
              + f"; at most {p['rel_diff_max']:.2f}, last {p['rel_diff_last']:.2e}")
    print(f"the two quantized models agree on {agreement:.2%} of {len(preds[0])} images ({path.name})")


# ------------------------------------------------------------------------------------------- one step run
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler(threading.Thread):
    """The process's resident memory every ``interval`` seconds while it runs; ``peak`` its maximum."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self.start_rss, self.done = interval, 0, rss(), threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self.done.set()
        self.join()
        self.peak = max(self.peak, rss())
        return self.peak


def run_step(args: argparse.Namespace) -> None:
    import timm
    import torch

    import vitqc
    from common import joint_step_pipeline
    from vitqc.passes import joint_optimize as jo

    torch.set_num_threads(args.threads)
    baseline = rss()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    calib = [torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))]
    options = {"augment": False, "amp_cpu": not args.fp32 and args.device == "cpu", **CONFIGS[args.config]}
    pipe = joint_step_pipeline("w4a4", "token", args.batch, jo.WARMUP_STEPS + args.steps, **options)
    sampler: dict = {}
    real_train = jo._Training.train

    def sampled(self, *a, **k):  # the resident memory while the steps run, apart from building the graph
        sampler["s"] = PeakSampler()
        sampler["s"].start()
        try:
            return real_train(self, *a, **k)
        finally:
            sampler["s"].stop()

    jo._Training.train = sampled
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    r = vitqc.compile(model, pipe, calib, quiet=True, device=args.device).record["joint_optimize"]
    s = sampler["s"]
    gpu = {"cuda_max_allocated_gib": torch.cuda.max_memory_allocated() / GIB, "gpu": torch.cuda.get_device_name()} if cuda else {}
    if not vitqc.distributed.is_main():  # under torchrun: rank 0's line
        return
    print(json.dumps({"world_size": r["world_size"], "final": r["final"], "loss_curve": loss_curve(r), "model": args.model, "img_size": args.img_size, "batch": args.batch, "config": args.config,
                      "device": args.device, **gpu,
                      "autocast": r["autocast"], "threads": args.threads, "steps": args.steps,
                      "s_per_step": (r["seconds"] - r["warmup_seconds"]) / args.steps,
                      "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                      "teacher": r["teacher"], "activation_checkpointing": r["activation_checkpointing"],
                      "rss_baseline_gib": baseline / GIB, "rss_train_start_gib": s.start_rss / GIB,
                      "rss_train_peak_gib": s.peak / GIB,
                      "process_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}), flush=True)


def run_time(args: argparse.Namespace) -> None:
    """Seconds per step of each setting in one process, the settings alternated --repeats times (medians), so
    their ratios are not a shared machine's drift; one quantized graph serves all (joint_optimize runs on it again
    and again: the state it starts from does not change a step's time)."""
    import copy

    import timm
    import torch

    from common import joint_step_pipeline
    from vitqc.capture import capture
    from vitqc.passes.base import CompileContext
    from vitqc.passes.joint_optimize import WARMUP_STEPS, JointOptimize
    from vitqc.pipeline import Pipeline

    import vitqc

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img_size).eval()
    calib = [torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))]
    graph = capture(model, calib[0][:1])
    reference = copy.deepcopy(graph)
    pipe = joint_step_pipeline("w4a4", "token", args.batch, 1)
    gm = vitqc.compile(graph, Pipeline.from_list(pipe.steps[:-1]), calib, quiet=True, reference=reference).quantized
    base = {**pipe.steps[-1].options, "iterations": WARMUP_STEPS + args.steps, "augment": False, "amp_cpu": not args.fp32}
    times: dict[str, list[float]] = {c: [] for c in args.configs.split(",")}
    for _ in range(args.repeats):
        for config in times:
            ctx = CompileContext(calib=calib, reference=reference, seed=0, quiet=True)
            JointOptimize({**base, **CONFIGS[config]})(gm, ctx)
            r = ctx.record["joint_optimize"]
            times[config].append((r["seconds"] - r["warmup_seconds"]) / args.steps)
            gc.collect()  # the run's optimizer state and graphs (held by reference cycles) before the next
    row = {"model": args.model, "img_size": args.img_size, "batch": args.batch, "steps": args.steps,
           "repeats": args.repeats, "threads": args.threads, "autocast": "bf16" if not args.fp32 else None,
           "s_per_step": {c: statistics.median(t) for c, t in times.items()}, "all": times}
    print(json.dumps(row), flush=True)


def run_memory(args: argparse.Namespace) -> None:
    from common import RESULTS

    rows = []
    if args.timing_only:  # the memory rows of an earlier run
        rows = json.loads((RESULTS / "scaling_memory_cpu.json").read_text())["rows"]
    for model in [] if args.timing_only else args.models.split(","):
        for config in args.configs.split(","):
            cmd = [sys.executable, __file__, "step", "--model", model, "--config", config, "--batch", str(args.batch),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--img-size", str(args.img_size),
                   "--device", args.device]
            if args.fp32:
                cmd.append("--fp32")
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if proc.returncode != 0:
                print(f"{model} {config}: failed ({proc.returncode}) {proc.stderr[-500:]}", flush=True)
                rows.append({"model": model, "config": config, "failed": proc.returncode})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            peak = row.get("cuda_max_allocated_gib", row["rss_train_peak_gib"])
            print(f"{model} {config}: {row['s_per_step']:.3f} s/step, peak {peak:.2f} GiB", flush=True)
            write_result(f"scaling_memory_{args.device.split(':')[0]}", {"rows": rows, "machine": machine()})
    if args.device != "cpu":
        return
    timed = []  # step times in one process per model, alternated (the rows' own times are from separate processes)
    for model in args.models.split(","):
        repeats = 1 if "large" in model else args.repeats  # ViT-L: ~25 s a step on one CPU thread
        cmd = [sys.executable, __file__, "time", "--model", model, "--configs", args.configs, "--batch", str(args.batch),
               "--steps", str(args.steps), "--threads", str(args.threads), "--img-size", str(args.img_size),
               "--repeats", str(repeats)] + (["--fp32"] if args.fp32 else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if proc.returncode != 0:
            print(f"{model} timing: failed ({proc.returncode}) {proc.stderr[-500:]}", flush=True)
            continue
        timed.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{model}: " + ", ".join(f"{c} {t:.2f}" for c, t in timed[-1]["s_per_step"].items()) + " s/step", flush=True)
        write_result("scaling_memory_cpu", {"rows": rows, "timed": timed, "machine": machine()})
    predict(args, rows)


# ------------------------------------------------------------------------------------------- memory model
def count_components(model_name: str, img_size: int, depth: int, amp: bool = True, fused: bool = True) -> dict:
    """The memory model's components (bytes) for ``model_name`` built with ``depth`` blocks (random weights)."""
    import copy

    import timm
    import torch

    import vitqc
    from common import joint_step_pipeline
    from vitqc.capture import capture
    from vitqc.pipeline import Pipeline
    from vitqc.passes.joint_optimize import JointOptimizeOptions, trainable_groups
    from vitqc.quant.fused import fused_fake_quant
    from vitqc.scopes import block_scopes, with_scope_outputs

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=img_size, depth=depth).eval()
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    graph = capture(model, x[:1])
    reference = copy.deepcopy(graph)
    pipe = Pipeline.from_list(joint_step_pipeline("w4a4", "token", 2, 1).steps[:-1])  # up to joint_optimize
    gm = vitqc.compile(graph, pipe, [x], quiet=True, reference=reference).quantized
    o = JointOptimizeOptions()
    trainable = [p for g in trainable_groups(gm, o) for p in g["params"]]
    ids = {id(p) for p in trainable}
    for p in gm.parameters():
        p.requires_grad_(id(p) in ids)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    scopes = block_scopes(reference, o.features)
    student, teacher = with_scope_outputs(gm, scopes), with_scope_outputs(reference, scopes)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp)

    def saved(b: int) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
            return t

        with autocast, fused_fake_quant(fused), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            student(x[:b])
        return sum(seen.values())

    with torch.no_grad(), autocast:
        t_out = teacher(x[:1])
    s1, s2 = saved(1), saved(2)
    residual = model.embed_dim * (model.patch_embed.num_patches + model.num_prefix_tokens) * 4  # fp32 block input
    return {"teacher_weights": nbytes([*reference.parameters(), *reference.buffers()]),
            "student_weights": nbytes([p for p in gm.parameters() if id(p) not in ids] + list(gm.buffers())),
            "trainable": nbytes(trainable), "saved_static": s1 - (s2 - s1), "saved_per_image": s2 - s1,
            "teacher_out_per_image": nbytes(t_out), "block_input_per_image": residual}


def components(model_name: str, img_size: int, depth: int, amp: bool = True, fused: bool = True) -> dict:
    """Components of the full ``depth``-block model, from its 1- and 2-block versions (identical blocks)."""
    one, two = (count_components(model_name, img_size, d, amp, fused) for d in (1, 2))
    per_block = {k: two[k] - one[k] for k in one}
    full = {k: one[k] - per_block[k] + depth * per_block[k] for k in one}
    full["block_input_per_image"] = depth * one["block_input_per_image"]
    full["block_saved_per_image"] = per_block["saved_per_image"]
    full["outside_saved_per_image"] = one["saved_per_image"] - per_block["saved_per_image"]
    full["block_saved_static"] = per_block["saved_static"]
    full["outside_saved_static"] = one["saved_static"] - per_block["saved_static"]
    full["depth"] = depth
    return full


def peak_bytes(c: dict, batch: int, m: float, checkpointing: bool = False, cache: int | None = None) -> float:
    static = c["teacher_weights"] + c["student_weights"] + 4 * c["trainable"]
    if checkpointing:  # each block's input kept; its activations (and fake-quantized weights) recomputed one at a time
        static += c["outside_saved_static"] + c["block_saved_static"]
        saved = c["outside_saved_per_image"] + c["block_input_per_image"] + c["block_saved_per_image"]
    else:
        static += c["saved_static"]
        saved = c["saved_per_image"]
    if cache:
        static += cache * c["teacher_out_per_image"]
        teacher = 0
    else:
        teacher = c["teacher_out_per_image"]
    return static + batch * (saved + teacher) + batch * m * c["block_saved_per_image"]


def predict(args: argparse.Namespace, cpu_rows: list[dict] | None = None) -> None:
    """Fit the transient factor m on the CPU runs (``memory``'s, else results/scaling_memory_cpu.json), check the
    model against them and the H200 peaks, and predict batch-32 GPU peaks."""
    import torch

    from common import RESULTS

    torch.set_num_threads(args.threads)
    if cpu_rows is None:
        path = RESULTS / "scaling_memory_cpu.json"
        cpu_rows = json.loads(path.read_text())["rows"] if path.exists() else []
    cpu_rows = [r for r in cpu_rows if "failed" not in r]
    if not cpu_rows:
        sys.exit("no CPU runs to fit the memory model on: run `scaling.py memory` first")
    counted: dict[str, dict] = {}

    def comps(model: str, img: int, depth: int, amp: bool = True, fused: bool = True) -> dict:
        key = f"{model}@{img}" + ("" if amp else " fp32") + ("" if fused else " plain")
        if key not in counted:
            counted[key] = components(model, img, depth, amp, fused)
            print(f"counted {key}: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in counted[key].items()
                                                  if k != "depth"), flush=True)
        return counted[key]

    depths = {"vit_small_patch16_224": 12, "vit_base_patch16_224": 12, "vit_large_patch16_224": 24}

    def cpu_model(r: dict, m: float) -> float:
        c = comps(r["model"], r["img_size"], depths[r["model"]], amp=r["autocast"] == "bf16")
        extra = {"checkpointing": r["activation_checkpointing"], "cache": r["batch"] if r["teacher"] == "cached" else None}
        return r["rss_baseline_gib"] * GIB + peak_bytes(c, r["batch"], m, **extra)

    # least squares over the CPU runs: measured - model(m=0) = m x batch x one block's saved activations
    xs = [r["batch"] * comps(r["model"], r["img_size"], depths[r["model"]], amp=r["autocast"] == "bf16")["block_saved_per_image"]
          for r in cpu_rows]
    ys = [r["rss_train_peak_gib"] * GIB - cpu_model(r, 0.0) for r in cpu_rows]
    m_cpu = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    cpu_checks = [{"model": r["model"], "config": r["config"], "batch": r["batch"],
                   "measured_gib": round(r["rss_train_peak_gib"], 3), "predicted_gib": round(cpu_model(r, m_cpu) / GIB, 3),
                   "error_pct": round(100 * (cpu_model(r, m_cpu) / GIB - r["rss_train_peak_gib"]) / r["rss_train_peak_gib"], 1)}
                  for r in cpu_rows]
    # the GPU's transient (CUDA's caching allocator counts every live temporary of backward, which the CPU's sampled
    # resident memory may miss) from the one clean H200 peak; the others, measured after an earlier run, check it
    clean = next(p for p in H200 if p["clean"].startswith("yes"))
    c = comps(clean["model"], clean["img_size"], clean["depth"], fused=clean["fused"])
    m = (clean["gib"] * GIB - peak_bytes(c, clean["batch"], 0.0)) / (clean["batch"] * c["block_saved_per_image"])
    checks = []
    for p in H200:
        c = comps(p["model"], p["img_size"], p["depth"], fused=p["fused"])
        pred = peak_bytes(c, p["batch"], m) / GIB
        checks.append({**p, "predicted_gib": round(pred, 3), "error_pct": round(100 * (pred - p["gib"]) / p["gib"], 1)})
    predictions = []
    for label, (model, img, depth) in PREDICT.items():
        c = comps(model, img, depth)
        row = {"model": label, "timm": model, "img_size": img, "batch": PREDICT_BATCH,
               "params_m": round(c["teacher_weights"] / 4e6, 1), "trainable_m": round(c["trainable"] / 4e6, 1),
               "static_gib": round(peak_bytes(c, 0, m) / GIB, 2),
               "per_image_mib": round((peak_bytes(c, 1, m) - peak_bytes(c, 0, m)) / 2**20, 1)}
        for config, kw in (("plain", {}), ("checkpointing", {"checkpointing": True}), ("cache", {"cache": CACHE_POOL}),
                           ("both", {"checkpointing": True, "cache": CACHE_POOL})):
            row[f"{config}_gib"] = round(peak_bytes(c, PREDICT_BATCH, m, **kw) / GIB, 2)
        predictions.append(row)
    result = {"transient_factor_m_gpu": round(m, 3), "transient_factor_m_cpu": round(m_cpu, 3),
              "cpu_checks": cpu_checks, "gpu_checks": checks,
              "predictions": predictions, "components": counted, "cache_pool_images": CACHE_POOL, "machine": machine()}
    write_result("scaling_memory", result)
    print(f"\ntransient factor m (blocks of saved activations per image): {m_cpu:.3f} on the CPU (least squares on "
          f"{len(cpu_rows)} runs), {m:.3f} on the GPU (the clean H200 peak)")
    print("| CPU run | batch | measured GiB | model GiB | error |\n|---|---|---|---|---|")
    for ch in cpu_checks:
        print(f"| {ch['model']} {ch['config']} | {ch['batch']} | {ch['measured_gib']:.2f} | {ch['predicted_gib']:.2f} | "
              f"{ch['error_pct']:+.1f} % |")
    print("| H200 peak (bf16, batch 32) | fake-quant | clean | measured GiB | model GiB | error |\n|---|---|---|---|---|---|")
    for ch in checks:
        print(f"| {ch['model']} {ch['img_size']} px | {'fused' if ch['fused'] else 'plain'} | {ch['clean']} | {ch['gib']} | "
              f"{ch['predicted_gib']:.2f} | {ch['error_pct']:+.1f} % |")
    print(f"| model (batch {PREDICT_BATCH}, bf16, fused) | params M | trainable M | static GiB | MiB per image | plain GiB "
          f"| checkpointing GiB | cache ({CACHE_POOL} images) GiB | both GiB |\n|---|---|---|---|---|---|---|---|---|")
    for p in predictions:
        print(f"| {p['model']} | {p['params_m']} | {p['trainable_m']} | {p['static_gib']} | {p['per_image_mib']} | "
              f"{p['plain_gib']} | {p['checkpointing_gib']} | {p['cache_gib']} | {p['both_gib']} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    dp = sub.add_parser("dp")
    dp.add_argument("--model", default="demo", choices=("demo", "vit_tiny_cifar10", "vit_tiny_mnist", "vits14_cifar10"))
    dp.add_argument("--pipeline", default="joint-w4a4")
    dp.add_argument("--iterations", type=int, default=200)
    dp.add_argument("--batch-size", type=int, default=16)
    dp.add_argument("--nproc", type=int, default=2)
    dp.add_argument("--eval-limit", type=int, default=None)
    mem = sub.add_parser("memory")
    mem.add_argument("--models", default=",".join(MODELS))
    mem.add_argument("--timing-only", action="store_true", help="keep the memory rows of results/scaling_memory_cpu.json")
    timer = sub.add_parser("time")
    timer.add_argument("--model", required=True)
    for p in (mem, timer):
        p.add_argument("--configs", default=",".join(CONFIGS))
        p.add_argument("--repeats", type=int, default=2)
    for p in (mem, timer, sub.add_parser("step"), sub.add_parser("predict")):
        p.add_argument("--batch", type=int, default=2)
        p.add_argument("--steps", type=int, default=2)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--img-size", type=int, default=224)
        p.add_argument("--fp32", action="store_true", help="no bf16 autocast on the CPU")
        p.add_argument("--device", default="cpu", help="cuda: peak = CUDA max allocated, bf16 autocast (joint_optimize.amp)")
        if p.prog.endswith("step"):
            p.add_argument("--model", required=True)
            p.add_argument("--config", choices=CONFIGS, default="plain")
    args = ap.parse_args()
    {"dp": run_dp, "step": run_step, "time": run_time, "memory": run_memory, "predict": predict}[args.cmd](args)


if __name__ == "__main__":
    main()
