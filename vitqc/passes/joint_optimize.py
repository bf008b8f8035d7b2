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
``activation_checkpointing`` recomputes each block's activations in backward instead of storing them. The teacher
runs in inference mode (no_grad when compiled); with ``cache_teacher`` (no augmentation) its outputs for every
calibration image are computed once and looked up.

Under ``torchrun`` (:mod:`vitqc.distributed`) the run is data-parallel: every rank draws the same global batch
(``batch_size``) from the same generator and computes its own slice of it; the gradients, scaled by each slice's
share, are summed over ranks in a few flat all-reduces, so every rank takes the step one process would take on
the whole batch (up to float summation order). Module states and the calibration pool are rank 0's; rank 0
alone writes checkpoints, which do not depend on the number of ranks (resume with any).

With a data-free calibration source and ``datafree_rounds`` (CLAMP-ViT's cyclic generation,
:mod:`vitqc.calib.cyclic`), the iterations run in ``datafree_rounds + 1`` parts and the source adds images the
student still disagrees on before each later part.
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

from vitqc import distributed as dist
from vitqc.errors import VitqcError
from vitqc.optim import GroupedAdam
from vitqc.passes.base import CompileContext, PassResult, VitqcPass, applied, graph_property, register_pass
from vitqc.passes.insert_quantizers import quantizers
from vitqc.passes.weight_refine import RefinementPenalty
from vitqc.console import Bar, progress_bar, warn
from vitqc.quant.modules import QUANT_LAYERS, ChannelFactors
from vitqc.scopes import block_scopes, node_scopes, with_scope_outputs

CHECKPOINT_NAME = "joint_optimize.ckpt"
WARMUP_STEPS = 3  # steps timed apart in the record (they carry torch.compile's compile)
CURVE_POINTS = 500  # the record's loss history (vitqc report): every part of the loss at about this many steps


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
    # refinement offsets, in steps; 1e-3 moves an offset too little in a few hundred iterations to re-round
    # anything (docs/findings.md, "Joint optimization")
    lr_refine: float = 1e-2
    kl_weight: float = 1.0
    feature_weight: float = 1.0
    temperature: float = 1.0
    features: list[str] = field(default_factory=lambda: ["blocks.*", "layers.*.blocks.*", "encoder.layers.*", "layers.*"])
    augment: bool = True
    mode: Literal["joint", "blockwise"] = "joint"
    checkpoint_every: int = 200
    amp: bool = True  # bf16 autocast on CUDA
    # bf16 autocast on a CPU too, where it computes bf16 natively (AVX-512 BF16 / AMX): faster GEMMs, no loss
    # measured (docs/findings.md). Off by default: the README's CPU figures are float32.
    amp_cpu: bool = False
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    # torch.compile (inductor) the teacher and student forwards (and so the student's backward): eager, one
    # step dispatches thousands of small kernels, which bounds a GPU step by host and launch overhead, not
    # arithmetic. The first steps pay the compile (docs/findings.md).
    compile: bool = False
    # torch.compile's mode. "reduce-overhead" replays teacher and student (forward and backward) as CUDA graphs:
    # one launch each instead of one per kernel, for a step bound by launches. UNMEASURED on a GPU so far (no
    # GPU lent since it was written); on a CPU it is the same as "default".
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # compute the teacher's outputs (logits and block outputs) for every calibration image once and look them up
    # each step instead of running the teacher: a fixed set only (augment = false). Skipped, and said so, when they
    # would take more than cache_teacher_mb on the training device (benchmarks/scaling.py measures both).
    cache_teacher: bool = False
    cache_teacher_mb: float = 4096
    # cyclic generation (CLAMP-ViT): with a data-free --calib source, the iterations run in datafree_rounds + 1
    # parts, and before each later part the source adds datafree_images images on which the student still
    # disagrees with the FP model (vitqc.calib.cyclic)
    datafree_rounds: int = 0
    datafree_images: int = 16
    limits: ClassVar[dict[str, str]] = {
        "iterations": ">= 0", "batch_size": ">= 1", "lr_quant": ">= 0", "lr_zero_point": ">= 0", "lr_rescale": ">= 0",
        "lr_refine": ">= 0", "kl_weight": ">= 0", "feature_weight": ">= 0", "temperature": "> 0",
        "checkpoint_every": ">= 1", "cache_teacher_mb": ">= 0", "datafree_rounds": ">= 0", "datafree_images": ">= 1"}

    def __post_init__(self) -> None:
        if self.compile_mode != "default" and not self.compile:
            raise VitqcError(f"joint_optimize.compile_mode={self.compile_mode!r} needs joint_optimize.compile=true")
        if self.cache_teacher and self.augment:
            raise VitqcError("joint_optimize.cache_teacher needs a fixed calibration set: set joint_optimize.augment=false "
                             "(augmented images differ every step)")


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
@dataclass
class Draw:
    """One step's global batch: which pool images, and how each is augmented (``flip`` None: not augmented)."""

    index: torch.Tensor
    flip: torch.Tensor | None = None
    dy: list[int] | None = None
    dx: list[int] | None = None


def draw_batch(gen: torch.Generator, pool_size: int, batch_size: int, augment_size: int | None) -> Draw:
    """The global batch of a step and its augmentation (for images ``augment_size`` high; None: none), drawn from
    ``gen`` the same way whatever the number of ranks, each of which then takes its slice: the data order is a
    function of the step alone, so a run resumes with any number of ranks."""
    index = torch.randint(0, pool_size, (batch_size,), generator=gen)
    if augment_size is None:
        return Draw(index)
    return Draw(index, *augment_params(batch_size, augment_size, gen))


def augment_params(b: int, h: int, gen: torch.Generator) -> tuple[torch.Tensor, list[int], list[int]]:
    """For ``b`` images ``h`` high: which to flip, and each crop's offsets (up to 1/8 of the size)."""
    flip = torch.rand(b, generator=gen) < 0.5
    pad = max(1, h // 8)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen).tolist()
    return flip, dy, dx


def apply_augment(x: torch.Tensor, flip: torch.Tensor, dy: list[int], dx: list[int]) -> torch.Tensor:
    """Flip the images ``flip`` marks, then crop each at its offsets from a reflect-padded copy (same size)."""
    b, _, h, w = x.shape
    x = torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def batch_images(pool: torch.Tensor, draw: Draw, lo: int, hi: int) -> torch.Tensor:
    """Images ``lo:hi`` of the drawn global batch, augmented as drawn."""
    x = pool[draw.index[lo:hi].to(pool.device)]
    if draw.flip is not None:
        x = apply_augment(x, draw.flip[lo:hi], draw.dy[lo:hi], draw.dx[lo:hi])
    return x


class TeacherCache:
    """The teacher's outputs (logits, then each block's output) for every image of a fixed pool, computed once
    without autograd (under the step's autocast, so bf16 on GPU) and looked up by pool index."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        self.outputs = outputs

    @classmethod
    def build(cls, teacher, pool: torch.Tensor, chunk: int, amp, budget_mb: float) -> tuple["TeacherCache | None", dict]:
        """(the cache, or None when it would exceed ``budget_mb``; what was decided, for the record)."""
        with torch.no_grad(), amp:  # not inference mode: a compiled loss saves the teacher's outputs for backward
            first = teacher(pool[:chunk])
            per_image = sum(t[0].numel() * t.element_size() for t in first)
            mb = per_image * len(pool) / 2**20
            info = {"images": len(pool), "mb": round(mb, 1), "budget_mb": budget_mb}
            if mb > budget_mb:
                return None, {**info, "used": False}
            outputs = [torch.empty((len(pool), *t.shape[1:]), dtype=t.dtype, device=t.device) for t in first]
            for start in range(0, len(pool), chunk):
                values = first if start == 0 else teacher(pool[start:start + chunk])
                for out, v in zip(outputs, values):
                    out[start:start + len(v)] = v
        return cls(outputs), {**info, "used": True}

    def lookup(self, index: torch.Tensor) -> list[torch.Tensor]:
        index = index.to(self.outputs[0].device)
        return [o[index] for o in self.outputs]


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


def batch_sized_steps(gm: nn.Module) -> list[nn.Parameter]:
    """The learnable steps and clip ratios of the quantizers whose input holds the batch (activations, not
    weights): LSQ scales their gradient by 1/sqrt(elements of the input) (UniformQuantizer.forward), so a rank
    that sees b of the batch's B images gets sqrt(B/b) times its share of it; data-parallel runs correct that."""
    weight_qs = {id(m.weight_quantizer) for m in gm.modules() if isinstance(m, QUANT_LAYERS)}
    found = []
    for q in quantizers(gm).values():
        if id(q) in weight_qs:
            continue
        for name in ("scale", "clip_ratio"):
            p = getattr(q, name, None)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                found.append(p)
    return found


# ------------------------------------------------------------------------------------------- the pass
@register_pass
class JointOptimize(VitqcPass):
    name = "joint_optimize"
    summary = "optimize all quantizer steps, rescaling factors and refinements at once by distilling the FP model"
    Options = JointOptimizeOptions
    requires = ("calibrated",)
    ensures = ("optimized",)

    def call(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        if ctx.reference is None:
            raise VitqcError("joint_optimize needs the FP reference model (vitqc.compile provides it)")
        o = self.options
        training = _Training(self, gm, ctx)
        images = ctx.calib_images().to(ctx.device)
        rounds = None
        if o.datafree_rounds:
            from vitqc.calib.cyclic import DatafreeRounds

            rounds = DatafreeRounds.for_context(ctx, o.datafree_rounds, o.datafree_images, o.iterations)
        resumed = training.state.step > 0
        with progress_bar(self.name, total=o.iterations, unit="it", completed=training.state.step,
                          quiet=ctx.quiet) as bar:
            # one train() call per part; before each, the rounds due by then join the pool (generated against the
            # student, or read back from the work directory when resuming past them)
            for until in ([] if rounds is None else rounds.starts) + [o.iterations]:
                if rounds is not None:
                    images = rounds.images_at(training.state.step, gm, images, resumed)
                training.train(images, until, bar)
        ctx.record[self.name] = training.record()
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


def module_state(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``module`` (what data-parallel ranks must agree on)."""
    return [*module.parameters(), *module.buffers()]


def _check_same_graph(gm: fx.GraphModule) -> None:
    """Every rank quantized the graph alike (tensor names and shapes, every quantizer's width), so rank 0's states
    fit every rank's graph: a choice that differs by rank (e.g. a mixed-precision search on nondeterministic
    kernels) stops the run on every rank with one line instead of training a mixture."""
    mine = ([(n, tuple(t.shape)) for n, t in gm.state_dict().items()]
            + [(n, float(q.bits)) for n, q in quantizers(gm).items()])
    theirs = dist.broadcast_tree(mine)
    if dist.all_sum(int(mine != theirs)):
        raise VitqcError("joint_optimize: the ranks built different quantized graphs (tensor shapes or bit widths "
                         "differ from rank 0's); make the passes before it deterministic, e.g. run "
                         "mixed_precision_search in one process and pass its widths to the pipeline")


LOGGED = ("kl", "feat", "loss")  # the parts of the loss a step logs; summed over ranks with a failure count


class _Training:
    """One joint optimization of ``gm`` against ``ctx.reference``: teacher, student, optimizer state and, under
    torchrun, this rank's slice of every batch and the gradient reducer. :meth:`train` runs steps over a pool of
    calibration images: the pass calls it once; rounds that renew the pool can call it once per round."""

    def __init__(self, owner: "JointOptimize", gm: fx.GraphModule, ctx: CompileContext) -> None:
        o = self.o = owner.options
        self.owner, self.gm, self.ctx, self.device = owner, gm, ctx, ctx.device
        self.world, self.rank = dist.world_size(), dist.rank()
        if o.batch_size < self.world:
            raise VitqcError(f"joint_optimize.batch_size={o.batch_size} is smaller than the {self.world} processes; "
                             f"each takes a share of every batch: raise it to at least {self.world}")
        if self.world > 1 and not dist.init_from_env(dist.backend_for(self.device)):  # (vitqc.compile did already)
            raise VitqcError(f"WORLD_SIZE={self.world} but torch.distributed is unavailable here: run one process")
        # this rank's slice of every global batch, and its share of the batch's mean loss
        self.lo, self.hi = self.rank * o.batch_size // self.world, (self.rank + 1) * o.batch_size // self.world
        self.share = (self.hi - self.lo) / o.batch_size
        self.pool_differed = None
        if self.world > 1:  # start from rank 0's states (and train on its images), whatever each rank loaded
            _check_same_graph(gm)
            dist.broadcast_(module_state(gm) + module_state(ctx.reference))
        self.scopes = scopes = block_scopes(ctx.reference, o.features) if o.feature_weight > 0 else []
        self.teacher = with_scope_outputs(ctx.reference, scopes, owner.name).to(self.device).eval()
        self.student = with_scope_outputs(gm, scopes, owner.name).to(self.device)
        if o.activation_checkpointing:
            self.student = checkpointed_blocks(self.student, block_scopes(ctx.reference, o.features))
        for p in self.teacher.parameters():
            p.requires_grad_(False)

        def student_loss(x, t_out, t_feats, stage_scope):
            s_out, *s_feats = self.student(x)
            return owner._loss(t_out, s_out, t_feats, s_feats, scopes, stage_scope)

        self.run_teacher, self.run_student_loss = self.teacher, student_loss
        if o.compile:
            # the loss is compiled with the student: its ~100 kernels forward and ~150 backward join its graphs
            self.run_teacher, self.run_student_loss = (torch.compile(f, dynamic=False, mode=o.compile_mode)
                                                       for f in (self.teacher, student_loss))
        # CUDA graphs (compile modes "reduce-overhead", "max-autotune") are told where each step begins, so a
        # replay may reuse the previous step's output memory
        self.graphs = o.compile and o.compile_mode in ("reduce-overhead", "max-autotune") and self.device.type == "cuda"
        # the teacher builds no autograd graph: inference mode, or no_grad under compile, whose loss graph saves the
        # teacher's outputs for its backward (inference tensors cannot be saved)
        self.teacher_mode = torch.no_grad if o.compile else torch.inference_mode
        self.groups = groups = trainable_groups(gm, o)
        trainable = {id(p) for g in groups for p in g["params"]}
        for p in gm.parameters():
            if id(p) not in trainable:
                p.requires_grad_(False)
        if not groups:
            raise VitqcError("joint_optimize found nothing to train: run insert_quantizers and calibrate first")
        self.stages = owner._stages(groups, scopes)
        self.penalty = RefinementPenalty(gm, owner._refine_weight(ctx))
        self.ckpt = Path(ctx.work_dir) / CHECKPOINT_NAME if ctx.work_dir else None
        self.state = _RunState.start(groups, o, ctx.seed)
        if ctx.resume and self.ckpt is not None:
            self.state.resume(self.ckpt, gm, o)
        self.reducer = dist.GradientReducer([p for g in groups for p in g["params"]]) if self.world > 1 else None
        self.lsq_fix = math.sqrt(self.share)  # this rank's sqrt(b / B) for batch_sized_steps
        self.batch_sized = [p for p in batch_sized_steps(gm) if id(p) in trainable] if self.world > 1 else []
        self.autocast = _autocast(o, self.device)
        self.amp = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)
        self.first_loss, self.last, self.warmup_seconds, self.cache_info = None, {}, None, None
        self.history: dict[str, list[float]] = {"step": []}  # every logged part at about CURVE_POINTS steps
        self.started = time.perf_counter()

    def _rank0_pool(self, images: torch.Tensor) -> torch.Tensor:
        """Rank 0's calibration images on every rank (each loaded the same seeded pool; a rank whose copy differs,
        e.g. another machine's folder, is said and overruled)."""
        shape = dist.broadcast_tree(tuple(images.shape))
        same_shape = tuple(images.shape) == tuple(shape)
        pool = images.clone() if same_shape else torch.empty(shape, dtype=images.dtype, device=images.device)
        dist.broadcast_([pool])
        self.pool_differed = dist.all_sum(int(not (same_shape and torch.equal(pool, images))))
        if self.pool_differed:
            warn(f"joint_optimize: {self.pool_differed} of {self.world} ranks loaded other calibration images than "
                 f"rank 0; all train on rank 0's {len(pool)}")
        return pool

    def train(self, pool: torch.Tensor, until: int, bar: Bar) -> None:
        """Steps over ``pool`` (images on the training device; rank 0's under torchrun) until the run has taken
        ``until`` steps, checkpointing every ``checkpoint_every`` (rank 0)."""
        o, state = self.o, self.state
        if self.world > 1:
            pool = self._rank0_pool(pool)
        cache = None
        if o.cache_teacher:
            cache, self.cache_info = TeacherCache.build(self.teacher, pool, o.batch_size, self.amp, o.cache_teacher_mb)
            if cache is None:
                warn(f"joint_optimize: the teacher's outputs for {len(pool)} images need {self.cache_info['mb']:g} MB, "
                     f"over cache_teacher_mb={o.cache_teacher_mb:g}; the teacher runs every step instead")
        self.student.train()
        while state.step < until:
            self.last = self.step(pool, cache)
            state.step += 1
            if state.step == min(WARMUP_STEPS, o.iterations):
                self.warmup_seconds = time.perf_counter() - self.started
            self.first_loss = self.first_loss if self.first_loss is not None else self.last["loss"]
            if state.step % max(1, o.iterations // CURVE_POINTS) == 0 or state.step == o.iterations:
                self.history["step"].append(state.step)
                for key, value in self.last.items():
                    self.history.setdefault(key, []).append(round(value, 6))
            bar.advance(1)
            bar.update(loss=self.last["loss"], **{k: v for k, v in self.last.items() if k != "loss"})
            if (self.ckpt is not None and dist.is_main()
                    and (state.step % o.checkpoint_every == 0 or state.step == o.iterations)):
                state.save(self.ckpt, self.gm, o)
        self.student.eval()

    def step(self, pool: torch.Tensor, cache: TeacherCache | None) -> dict[str, float]:
        """One optimizer step on the next global batch; returns the logged values (the batch's, over all ranks)."""
        o, state = self.o, self.state
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        stage_index = min(state.step * len(self.stages) // o.iterations, len(self.stages) - 1)
        stage_groups, stage_scope = self.stages[stage_index]
        draw = draw_batch(state.gen, len(pool), o.batch_size, pool.shape[-2] if o.augment else None)
        try:
            x = batch_images(pool, draw, self.lo, self.hi)
            if cache is not None:
                t_out, *t_feats = cache.lookup(draw.index[self.lo:self.hi])
            else:
                with self.teacher_mode(), self.amp:
                    t_out, *t_feats = self.run_teacher(x)
            with self.amp:
                loss, parts = self.run_student_loss(x, t_out, t_feats, stage_scope)
            if self.reducer is None:
                state.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            else:
                self.reducer.bind()
                (loss * self.share).backward()  # the ranks' gradients then sum to the whole batch's
                if self.batch_sized:  # LSQ's 1/sqrt(elements) as for the whole batch (batch_sized_steps)
                    torch._foreach_mul_([p.grad for p in self.batch_sized], self.lsq_fix)
        except Exception:
            if self.reducer is None:
                raise
            self.reducer.bind()  # zeros: the other ranks learn of the failure from the count, then stop
            self.reducer.all_reduce(torch.tensor([0.0] * len(LOGGED) + [1.0], device=self.device))
            raise
        failed = None
        if self.reducer is not None:
            zero = torch.zeros((), device=self.device)
            local = [parts[k].detach().float() * self.share if k in parts else zero for k in LOGGED]
            summed = self.reducer.all_reduce(torch.stack([*local, zero]))
            parts = {k: summed[i] for i, k in enumerate(LOGGED) if k in parts}
            failed = summed[-1]
        if self.penalty:  # its value before the update, as the loss's; its gradient added analytically
            parts["refine"] = self.penalty.value()
            self.penalty.add_grad()
        for i, g in enumerate(state.optimizer.param_groups):  # other stages' parameters stay put
            if i not in stage_groups:
                for p in g["params"]:
                    p.grad = None
        state.optimizer.step()
        state.scheduler.step()
        # the step's one device sync, after all of it is queued: the logged values and the finite check
        values = [v.detach().float() for v in parts.values()] + ([failed] if failed is not None else [])
        listed = torch.stack(values).tolist()
        if failed is not None and (n_failed := listed.pop()) > 0:
            raise VitqcError(f"joint_optimize stopped at step {state.step}: {n_failed:.0f} of {self.world} ranks "
                             f"failed (each prints its own error)")
        last = dict(zip(parts, listed))
        if self.penalty:
            last["loss"] += self.penalty.weight * last["refine"]
        if not math.isfinite(last["loss"]):  # the model is spoiled; the checkpoint on disk is not
            where = (f"; the last good checkpoint is kept at {self.ckpt}" if self.ckpt is not None and self.ckpt.exists()
                     else "; no checkpoint had been written yet")
            raise VitqcError(f"joint_optimize: the loss became {last['loss']} at step {state.step}{where}; "
                             f"lower the learning rates (e.g. --set joint_optimize.lr_quant=1e-4)")
        return last

    def record(self) -> dict:
        o = self.o
        seconds = time.perf_counter() - self.started
        record = {"iterations": o.iterations, "batch_size": o.batch_size, "mode": o.mode,
                  "feature_scopes": self.scopes, "trainable_tensors": len(self.groups),
                  "first_loss": self.first_loss, "final": self.last, "history": self.history,
                  "seconds": round(seconds, 2),
                  "resumed_from": self.state.resumed_from, "device": str(self.device),
                  "autocast": "bf16" if self.autocast else None,
                  # the first steps (torch.compile, allocator and kernel warm-up) on their own
                  "warmup_steps": WARMUP_STEPS,
                  "warmup_seconds": self.warmup_seconds and round(self.warmup_seconds, 3),
                  # what ran, for memory: the teacher in inference mode (or looked up), the student's blocks
                  # recomputed in backward or not
                  "teacher": ("cached" if self.cache_info and self.cache_info["used"]
                              else "no_grad" if self.o.compile else "inference_mode"),
                  "cache_teacher": self.cache_info, "activation_checkpointing": o.activation_checkpointing,
                  "world_size": self.world}
        if self.reducer is not None:
            record["data_parallel"] = {
                "batch_per_rank": [(r + 1) * o.batch_size // self.world - r * o.batch_size // self.world
                                   for r in range(self.world)],
                "backend": torch.distributed.get_backend(), "gradient_buckets": len(self.reducer.buckets),
                "gradient_mb": round(self.reducer.nbytes / 2**20, 2), "ranks_with_other_calibration": self.pool_differed}
        return record


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

    def resume(self, path: Path, gm: nn.Module, o: JointOptimizeOptions) -> None:
        """Continue from the checkpoint at ``path`` when there is one: rank 0 reads it, every rank gets it."""
        box: dict = {"payload": None, "error": None}
        if dist.is_main() and path.exists():
            try:
                box["payload"] = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                box["error"] = f"checkpoint {path} is unreadable ({type(exc).__name__}); delete it to start over"
        box = dist.broadcast_tree(box)
        if box["error"]:
            raise VitqcError(box["error"])
        if box["payload"] is not None:
            self.load(box["payload"], path, gm, o)

    def load(self, payload: dict, path: Path, gm: nn.Module, o: JointOptimizeOptions) -> None:
        """Take the state of a checkpoint's ``payload`` (read from ``path``)."""
        # an option added since the checkpoint was written counts as at its default
        mine, theirs = dataclasses.asdict(o), {**dataclasses.asdict(JointOptimizeOptions()), **payload.get("options", {})}
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
