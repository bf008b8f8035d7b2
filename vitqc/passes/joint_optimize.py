"""joint_optimize: optimize every quantization parameter of the whole model at once against the FP model.

Teacher = the FP graph (``ctx.reference``), student = the quantized graph. No labels: the loss is
KL(teacher || student) on logits plus a normalised MSE between the outputs of each block
(``||s - t||^2 / ||t||^2`` per image), plus the weight-refinement penalty. Because all layers are trained
together, an error one block cannot fix is compensated by the others (``mode = "blockwise"`` runs the same
optimizer one block at a time with the same total budget, for comparison).

Trained: quantizer steps (Adam learning rate relative to each step's initial size, since weight and
activation steps differ by orders of magnitude), zero points, per-token clip ratios, channel_rescale
factors (log space) and weight_refine offsets. FP weights, biases and norms stay fixed.

Calibration images are augmented (random flip and shifted crop) so a few hundred images do not overfit.
Checkpoints are written every ``checkpoint_every`` steps to the work directory; with resume the run
continues from the last one and ends where an uninterrupted run would (same seed, CPU). A non-finite loss
stops the run, keeping the last good checkpoint. bf16 autocast is used on CUDA (``amp``), and
``activation_checkpointing`` recomputes each block's activations in backward instead of storing them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

from vitqc.errors import VitqcError
from vitqc.optim import GroupedAdam
from vitqc.passes.base import CompileContext, PassResult, VitqcPass, applied, graph_property, register_pass
from vitqc.passes.insert_quantizers import quantizers
from vitqc.passes.weight_refine import RefinementPenalty
from vitqc.console import progress_bar
from vitqc.quant.modules import QUANT_LAYERS, ChannelFactors
from vitqc.scopes import block_scopes, node_scopes, with_scope_outputs

CHECKPOINT_NAME = "joint_optimize.ckpt"
WARMUP_STEPS = 3  # steps timed apart in the record (they carry torch.compile's compile)


@graph_property("optimized")
def is_optimized(gm: fx.GraphModule) -> bool:
    """joint_optimize has run on this graph."""
    return applied(gm, "joint_optimize")


@dataclass
class JointOptimizeOptions:
    iterations: int = 2000
    batch_size: int = 32
    lr_quant: float = 1e-3  # relative to each step's initial magnitude
    lr_zero_point: float = 1e-2  # in integer levels
    lr_rescale: float = 1e-3  # on log factors
    # refinement offsets, in steps. 1e-2, not 1e-3: at 1e-3 Adam moves an offset ~0.15 step in 300 cosine
    # iterations, too little to re-round anything (vits14 W4A4, 300x8: 71.75 -> 75.75 % top-1;
    # benchmarks/results/joint_tuning_vits14.json)
    lr_refine: float = 1e-2
    kl_weight: float = 1.0
    feature_weight: float = 1.0
    temperature: float = 1.0
    features: list[str] = field(default_factory=lambda: ["blocks.*", "layers.*.blocks.*", "encoder.layers.*", "layers.*"])
    augment: bool = True
    mode: Literal["joint", "blockwise"] = "joint"
    checkpoint_every: int = 200
    amp: bool = True  # bf16 autocast on CUDA
    # bf16 autocast on a CPU too, where it computes bf16 natively (AVX-512 BF16 / AMX): its GEMMs, most of a CPU
    # step, run ~2.3x faster. Measured (2-core AMD EPYC, vits14 joint-w4a4 300 x 8, 1 thread, 2,000 test images):
    # 342 s instead of 488 s, 75.30 % vs 74.80 % top-1; joint-w3a3 354 s vs 516 s, 56.00 vs 53.60 %. Off by
    # default: the README's CPU figures are float32.
    amp_cpu: bool = False
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    # torch.compile (inductor) the teacher and student forwards (and so the student's backward): eager, one
    # step dispatches ~7k small kernels (vits14 W4A4; joint_throughput.py --count-ops), which bounds a GPU step
    # by host and launch overhead, not arithmetic.
    # The first steps pay the compile. Measured: 1.6x the steps/s on a 2-core CPU (vits14 shape, batch 2); on
    # a GPU not yet (eager: 5.4 it/s for ViT-S at batch 32 on an H200, the same at 112 px as at 224: launch-bound).
    compile: bool = False
    # torch.compile's mode. "reduce-overhead" replays teacher and student (forward and backward) as CUDA graphs:
    # one launch each instead of one per kernel, for a step bound by launches. UNMEASURED on a GPU so far (no
    # GPU lent since it was written); on a CPU it is the same as "default".
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # cyclic generation (CLAMP-ViT): with a data-free --calib source, the iterations run in datafree_rounds + 1
    # parts, and before each later part the source adds datafree_images images on which the student still
    # disagrees with the FP model (vitqc.calib.cyclic)
    datafree_rounds: int = 0
    datafree_images: int = 16
    limits: ClassVar[dict[str, str]] = {
        "iterations": ">= 0", "batch_size": ">= 1", "lr_quant": ">= 0", "lr_zero_point": ">= 0", "lr_rescale": ">= 0",
        "lr_refine": ">= 0", "kl_weight": ">= 0", "feature_weight": ">= 0", "temperature": "> 0",
        "checkpoint_every": ">= 1", "datafree_rounds": ">= 0", "datafree_images": ">= 1"}

    def __post_init__(self) -> None:
        if self.compile_mode != "default" and not self.compile:
            raise VitqcError(f"joint_optimize.compile_mode={self.compile_mode!r} needs joint_optimize.compile=true")


def _autocast(o: JointOptimizeOptions, device: torch.device) -> bool:
    """Whether teacher and student run under bf16 autocast (``amp`` on CUDA, ``amp_cpu`` on a CPU)."""
    if device.type == "cuda":
        return o.amp
    if device.type == "cpu" and o.amp_cpu:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise VitqcError("joint_optimize.amp_cpu: this CPU has no native bf16 (AVX-512 BF16 or AMX), where bf16 is "
                             "slower than float32; leave amp_cpu off")
        return True
    return False


# ------------------------------------------------------------------------------------------- memory
class _Checkpointed(nn.Module):
    """Runs ``inner`` under torch.utils.checkpoint: its activations are recomputed in backward, not stored."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        return checkpoint(self.inner, *args, use_reentrant=False)


def checkpointed_blocks(gm: fx.GraphModule, blocks: list[str]) -> fx.GraphModule:
    """``gm`` split into one submodule per block (and one per stretch between blocks) with every block's
    submodule checkpointed. Modules and parameters stay shared with ``gm``; outputs are unchanged."""
    if not blocks:
        raise VitqcError("joint_optimize.activation_checkpointing: found no blocks to checkpoint; "
                         "set joint_optimize.features to the block paths (e.g. ['blocks.*'])")
    index = {b: i for i, b in enumerate(blocks)}
    seen = 0

    def partition(node: fx.Node) -> int:
        # block i -> 2i+1; anything outside the blocks -> the even partition after the blocks seen so far
        nonlocal seen
        hits = [index[s] for s in node_scopes(node) if s in index]
        if hits:
            seen = max(seen, hits[0] + 1)
            return 2 * hits[0] + 1
        return 2 * seen

    split = split_module(gm, gm, partition, keep_original_order=True)
    for name, child in list(split.named_children()):
        if name.startswith("submod_") and int(name.split("_")[1]) % 2 == 1:
            setattr(split, name, _Checkpointed(child))
    return split


# ------------------------------------------------------------------------------------------- data
def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a crop shifted by up to 1/8 of the size (reflect padding)."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


# ------------------------------------------------------------------------------------------- parameters
def trainable_groups(gm: nn.Module, o: JointOptimizeOptions) -> list[dict]:
    """Adam parameter groups; every group carries ``names`` (for checkpoints and block-wise staging)."""
    groups: list[dict] = []
    names = {id(p): n for n, p in gm.named_parameters(remove_duplicate=True)}
    seen: set[int] = set()

    def add(p: nn.Parameter | None, lr: float) -> None:
        if p is None or not isinstance(p, nn.Parameter) or id(p) in seen or id(p) not in names:
            return
        seen.add(id(p))
        groups.append({"params": [p], "lr": lr, "names": [names[id(p)]]})

    for q in quantizers(gm).values():
        scale = getattr(q, "scale", None)
        if isinstance(scale, nn.Parameter):
            add(scale, o.lr_quant * float(scale.detach().abs().mean().clamp_min(1e-8)))
        zp = getattr(q, "zero_point", None)
        if isinstance(zp, nn.Parameter):
            add(zp, o.lr_zero_point)
        clip = getattr(q, "clip_ratio", None)
        if isinstance(clip, nn.Parameter):
            add(clip, o.lr_quant)
    for m in gm.modules():
        if isinstance(m, ChannelFactors):
            add(m.log_factors, o.lr_rescale)
        if isinstance(m, QUANT_LAYERS) and m.refinement is not None:
            add(m.refinement, o.lr_refine)
    return groups


# ------------------------------------------------------------------------------------------- the pass
@register_pass
class JointOptimize(VitqcPass):
    name = "joint_optimize"
    summary = "optimize all quantizer steps, rescaling factors and refinements at once by distilling the FP model"
    Options = JointOptimizeOptions
    requires = ("calibrated",)
    ensures = ("optimized",)

    def call(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        o = self.options
        if ctx.reference is None:
            raise VitqcError("joint_optimize needs the FP reference model (vitqc.compile provides it)")
        device = ctx.device
        images = torch.cat(ctx.calib_batches()).to(device)
        scopes = block_scopes(ctx.reference, o.features) if o.feature_weight > 0 else []
        teacher = with_scope_outputs(ctx.reference, scopes, self.name).to(device).eval()
        student = with_scope_outputs(gm, scopes, self.name).to(device)
        if o.activation_checkpointing:
            student = checkpointed_blocks(student, block_scopes(ctx.reference, o.features))
        for p in teacher.parameters():
            p.requires_grad_(False)

        def student_loss(x, t_out, t_feats, stage_scope):
            s_out, *s_feats = student(x)
            return self._loss(t_out, s_out, t_feats, s_feats, scopes, stage_scope)

        run_teacher, run_student_loss = teacher, student_loss
        if o.compile:
            # the loss is compiled with the student: its ~100 kernels forward and ~150 backward join its graphs
            run_teacher, run_student_loss = (torch.compile(f, dynamic=False, mode=o.compile_mode)
                                             for f in (teacher, student_loss))
        # CUDA graphs (compile modes "reduce-overhead", "max-autotune") are told where each step begins, so a
        # replay may reuse the previous step's output memory
        graphs = o.compile and o.compile_mode in ("reduce-overhead", "max-autotune") and device.type == "cuda"
        groups = trainable_groups(gm, o)
        trainable = {id(p) for g in groups for p in g["params"]}
        for p in gm.parameters():
            if id(p) not in trainable:
                p.requires_grad_(False)
        if not groups:
            raise VitqcError("joint_optimize found nothing to train: run insert_quantizers and calibrate first")
        stages = self._stages(groups, scopes)
        penalty = RefinementPenalty(gm, self._refine_weight(ctx))
        ckpt = Path(ctx.work_dir) / CHECKPOINT_NAME if ctx.work_dir else None
        state = _RunState.start(groups, o, ctx.seed)
        if ctx.resume and ckpt is not None and ckpt.exists():
            state.load(ckpt, gm, o)
        started, first_loss, last, warmup_seconds = time.perf_counter(), None, {}, None
        history: dict[str, list[float]] = {"step": []}  # the loss curve, at most ~500 points (vitqc report)
        log_every = max(1, o.iterations // 500)
        rounds = None
        if o.datafree_rounds:
            from vitqc.calib.cyclic import DatafreeRounds

            rounds = DatafreeRounds.for_context(ctx, o.datafree_rounds, o.datafree_images, o.iterations)
            resumed = state.step > 0
        autocast = _autocast(o, device)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast)
        student.train()
        with progress_bar(self.name, total=o.iterations, unit="it", completed=state.step, quiet=ctx.quiet) as bar:
            while state.step < o.iterations:
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                if rounds is not None:
                    images = rounds.images_at(state.step, gm, images, resumed)
                stage_index = min(state.step * len(stages) // o.iterations, len(stages) - 1)
                stage_groups, stage_scope = stages[stage_index]
                idx = torch.randint(0, len(images), (o.batch_size,), generator=state.gen)
                x = images[idx.to(images.device)]
                if o.augment:
                    x = augment(x, state.gen)
                with torch.no_grad(), amp:
                    t_out, *t_feats = run_teacher(x)
                with amp:
                    loss, parts = run_student_loss(x, t_out, t_feats, stage_scope)
                state.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if penalty:  # its value before the update, as the loss's; its gradient added analytically
                    parts["refine"] = penalty.value()
                    penalty.add_grad()
                for i, g in enumerate(state.optimizer.param_groups):  # other stages' parameters stay put
                    if i not in stage_groups:
                        for p in g["params"]:
                            p.grad = None
                state.optimizer.step()
                state.scheduler.step()
                # the step's one device sync, after all of it is queued: the logged values and the finite check
                last = dict(zip(parts, torch.stack([v.detach().float() for v in parts.values()]).tolist()))
                if penalty:
                    last["loss"] += penalty.weight * last["refine"]
                if not math.isfinite(last["loss"]):  # the model is spoiled; the checkpoint on disk is not
                    where = (f"; the last good checkpoint is kept at {ckpt}" if ckpt is not None and ckpt.exists()
                             else "; no checkpoint had been written yet")
                    raise VitqcError(f"joint_optimize: the loss became {last['loss']} at step {state.step}{where}; "
                                     f"lower the learning rates (e.g. --set joint_optimize.lr_quant=1e-4)")
                state.step += 1
                if state.step == min(WARMUP_STEPS, o.iterations):
                    warmup_seconds = time.perf_counter() - started
                first_loss = first_loss if first_loss is not None else last["loss"]
                if state.step % log_every == 0 or state.step == o.iterations:
                    history["step"].append(state.step)
                    for key, value in last.items():
                        history.setdefault(key, []).append(round(value, 6))
                bar.advance(1)
                bar.update(loss=last["loss"], **{k: v for k, v in last.items() if k != "loss"})
                if ckpt is not None and (state.step % o.checkpoint_every == 0 or state.step == o.iterations):
                    state.save(ckpt, gm, o)
        student.eval()
        seconds = time.perf_counter() - started
        ctx.record[self.name] = {"iterations": o.iterations, "batch_size": o.batch_size, "mode": o.mode,
                                 "feature_scopes": scopes, "trainable_tensors": len(groups),
                                 "first_loss": first_loss, "final": last, "history": history,
                                 "seconds": round(seconds, 2),
                                 "resumed_from": state.resumed_from, "device": str(device),
                                 "autocast": "bf16" if autocast else None,
                                 # the first steps (torch.compile, allocator and kernel warm-up) on their own
                                 "warmup_steps": WARMUP_STEPS, "warmup_seconds": warmup_seconds and round(warmup_seconds, 3)}
        if rounds is not None:
            ctx.record[self.name]["datafree_rounds"] = rounds.record
        return PassResult(gm, True)

    def _stages(self, groups: list[dict], scopes: list[str]) -> list[tuple[set[int], str | None]]:
        """joint: one stage over everything. blockwise: one stage per block (its own parameters, its own
        feature loss), then one for what lies outside the blocks (patch embedding, head) on the logits."""
        if self.options.mode == "joint" or not scopes:
            return [(set(range(len(groups))), None)]
        stages = []
        claimed: set[int] = set()
        for scope in scopes:
            mine = {i for i, g in enumerate(groups) if g["names"][0].startswith(scope + ".")}
            claimed |= mine
            if mine:
                stages.append((mine, scope))
        rest = set(range(len(groups))) - claimed
        if rest:
            stages.append((rest, None))
        return stages

    def _refine_weight(self, ctx: CompileContext) -> float:
        info = ctx.record.get("weight_refine")
        return float(info["regularization"]) if info else 0.0

    def _loss(self, t_out, s_out, t_feats, s_feats, scopes, stage_scope):
        """(what backward differentiates, the parts to log) without the refinement penalty: the loop adds its value
        to the logged ``loss`` and its gradient analytically (RefinementPenalty)."""
        o = self.options
        parts: dict[str, torch.Tensor] = {}
        if stage_scope is None:
            temp = o.temperature
            parts["kl"] = F.kl_div(F.log_softmax(s_out.float() / temp, -1), F.log_softmax(t_out.float() / temp, -1),
                                   reduction="batchmean", log_target=True) * temp * temp
        pairs = list(zip(scopes, t_feats, s_feats))
        if stage_scope is not None:
            pairs = [p for p in pairs if p[0] == stage_scope]
        if pairs and o.feature_weight > 0:
            terms = []
            for _, t, s in pairs:
                t, s = t.float().flatten(1), s.float().flatten(1)
                terms.append(((s - t).pow(2).sum(1) / t.pow(2).sum(1).clamp_min(1e-8)).mean())
            parts["feat"] = torch.stack(terms).mean()
        loss = o.kl_weight * parts.get("kl", 0.0) + o.feature_weight * parts.get("feat", 0.0)
        parts["loss"] = loss.detach()
        return loss, parts


@dataclass
class _RunState:
    """Everything a resumed run needs to continue exactly: step, optimizer, schedule and the data RNG."""

    step: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    names: list[str]
    resumed_from: int | None = None

    @classmethod
    def start(cls, groups: list[dict], o: JointOptimizeOptions, seed: int) -> "_RunState":
        # one parameter per group (each its own learning rate), all updated by one multi-tensor step
        optimizer = GroupedAdam([{k: v for k, v in g.items() if k != "names"} for g in groups])
        total = max(1, o.iterations)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        gen = torch.Generator().manual_seed(seed)
        return cls(0, optimizer, scheduler, gen, [g["names"][0] for g in groups])

    def save(self, path: Path, gm: nn.Module, o: JointOptimizeOptions) -> None:
        params = dict(gm.named_parameters(remove_duplicate=True))
        payload = {"step": self.step, "options": dataclasses.asdict(o),
                   "params": {n: params[n].detach().cpu().clone() for n in self.names},
                   "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                   "generator": self.gen.get_state()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def load(self, path: Path, gm: nn.Module, o: JointOptimizeOptions) -> None:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise VitqcError(f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to start over") from None
        mine, theirs = dataclasses.asdict(o), payload.get("options", {})
        changed = sorted(k for k in mine if k not in ("checkpoint_every",) and mine[k] != theirs.get(k))
        if changed:
            raise VitqcError(f"checkpoint {path} was made with other joint_optimize options ({changed[0]}); "
                             f"use the same options to resume, or delete it to start over")
        params = dict(gm.named_parameters(remove_duplicate=True))
        if sorted(payload["params"]) != sorted(self.names):
            raise VitqcError(f"checkpoint {path} does not match this graph's parameters; delete it to start over")
        with torch.no_grad():
            for name, value in payload["params"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.gen.set_state(payload["generator"])
        self.step = self.resumed_from = int(payload["step"])
