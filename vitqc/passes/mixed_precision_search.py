"""mixed_precision_search: choose a bit width per layer under a budget by evolutionary search (CLAMP-ViT).

Genes: every quantized linear/conv layer has a weight gene and an input-activation gene; the attention
quantizers of one module (both inputs of q@k^T and attn@v, and the softmax output) share one activation
gene. Layers matching ``fixed`` (head and patch embedding by default, as the uniform pipelines keep them at
8 bit) keep the bits insert_quantizers gave them and do not count in the averages.

Budget: the parameter-weighted average weight bits of the searched layers must not exceed ``weight_bits``
(or, with ``model_mb``, the weight codes of every quantized layer must fit in that many megabytes, scales
not counted), and the average activation bits, weighted by elements per image, must not exceed
``act_bits``. So uniform W4A4 is exactly at budget 4.0/4.0 and is always in the first population: the
search can only return something at least as fit on the search images.

Fitness (lower is better), against the FP model on the first ``images`` calibration images: KL(FP || q) on
logits plus ``contrastive_weight`` times a patch-level contrastive term on the last block's tokens (each
quantized token must be closer to its own FP token than to the image's other FP tokens, InfoNCE as in
CLAMP-ViT). Evaluation is fast: the FP outputs are computed once, and every quantizer's range at every
candidate width is computed once (weights from themselves, activations from FP statistics observed once),
so a candidate costs one forward pass and no data statistics. Candidates are not fine-tuned before scoring;
with ``finalists = K`` the K fittest candidates and uniform are each run through a short ``joint_optimize``
(``finalist_iterations``, same seed and data for all) and the best after it wins (CLAMP-ViT fine-tunes every
candidate briefly; here only the finalists, since a ViT-S candidate costs seconds and a fine-tune minutes).
Why it exists, and why it is off by default: on vits14_cifar10 the searched assignment scored 4.76 against
uniform's 5.81 (5.12 vs 5.68 on 256 held-out images) yet ended 0.7 pp below uniform after 300 joint
iterations (70.07 vs 70.74 % top-1); with 4 finalists the winner also led after 50 joint iterations (4.27 vs
4.44) and ended 1.9 pp below uniform (68.86 %). Neither score, dominated by the patch-contrastive term,
predicts accuracy after the full joint optimization: that is the open problem of this pass. With the current
joint defaults (lr_refine 1e-2) the searched assignment ends above uniform at both seeds measured, by a small
margin: 74.79 vs 74.65 % (seed 0) and 75.15 vs 74.14 % (seed 1). A fitness of KL alone (``contrastive_weight =
0``), which halved uniform's KL before joint optimization (0.78 vs 1.64), ended 1.1 pp below uniform (73.56 %,
seed 0); benchmarks/results/mixed_precision_vits14_cifar10_v5.json.

Evolution: population ``population``, ``generations`` rounds, elitism, tournament selection, uniform
crossover, mutation of ``mutated_genes`` genes per child on average (a fixed probability per gene would
scramble a ViT-S, which has ~100 genes); infeasible children are repaired (random genes lowered until within
budget) and then filled (random genes raised while the budget allows). The first population is uniform,
the sensitivity seeds (below), then half mutants of uniform and half random assignments.

Sensitivity seeds (``sensitivity = true``): random assignments of ~100 genes are almost all worse than uniform,
so a few hundred candidates barely leave it. Instead each gene is moved alone one width down and one up from
uniform and the change of fitness measured (two candidates per gene). The changes do not add up (on
vit_tiny_cifar10 a knapsack over them predicted fitness 0.23 where the assignment measured 0.96, uniform
0.70), so they only order a hill climb: raise the gene whose raise helped most, pay for it by lowering the
genes whose lowering hurt least, keep the move if the measured fitness improves; one candidate per
helpful gene. The climb's accepted assignments start the evolution. Seeded; each generation is checkpointed to the work
directory and ``--resume`` continues from the last finished one with the same result.

The chosen widths are set on the quantizers (ranges initialised by ``init`` at the new width; run
``calibrate`` after), written into the layer table the artifact stores, and shown as a per-layer table.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from vitqc.distributed import is_main
from vitqc.errors import VitqcError
from vitqc.passes.base import CompileContext, PassResult, VitqcPass, graph_property, register_pass
from vitqc.passes.insert_quantizers import bypassed, quantizers
from vitqc.progress import console, progress_bar
from vitqc.quant.modules import QUANT_LAYERS
from vitqc.quant.quantizer import TERNARY_BITS, VALID_BITS, UniformQuantizer
from vitqc.scopes import block_scopes, with_scope_outputs

CHECKPOINT_NAME = "mixed_precision_search.json"


@graph_property("precision_searched")
def is_precision_searched(gm: fx.GraphModule) -> bool:
    """mixed_precision_search has set a bit width per layer."""
    return bool(getattr(gm, "_vitqc_precision_searched", False))


@dataclass
class MixedPrecisionSearchOptions:
    weight_bits: float = 4.0  # budget: average weight bits of the searched layers (parameter-weighted)
    act_bits: float = 4.0  # budget: average activation bits (weighted by elements per image)
    model_mb: float = 0.0  # if > 0: weight-code budget of all quantized layers in MB, instead of weight_bits
    weight_choices: list[float] = field(default_factory=lambda: [3, 4, 6, 8])
    act_choices: list[float] = field(default_factory=lambda: [3, 4, 6, 8])
    fixed: list[str] = field(default_factory=lambda: ["head", "patch_embed"])  # path globs kept as inserted
    population: int = 20
    generations: int = 10
    elite: int = 2
    tournament: int = 3
    mutated_genes: float = 2.0  # genes redrawn per child, on average
    sensitivity: bool = True  # seed the first population from each gene's measured sensitivity (see the docstring)
    finalists: int = 0  # if > 0: re-score this many best candidates and uniform after a short joint_optimize
    finalist_iterations: int = 50
    finalist_batch_size: int = 8
    images: int = 64  # calibration images the fitness is measured on
    batch_size: int = 32
    contrastive_weight: float = 1.0
    temperature: float = 0.1  # of the patch-contrastive InfoNCE
    init: str = "minmax"  # range initialisation of each candidate width: minmax | percentile | mse
    features: list[str] = field(default_factory=lambda: ["blocks.*", "layers.*.blocks.*", "encoder.layers.*", "layers.*"])

    def __post_init__(self) -> None:  # checked when the pipeline is read, before any work
        for label, choices in (("weight_choices", self.weight_choices), ("act_choices", self.act_choices)):
            if not choices:
                raise VitqcError(f"mixed_precision_search.{label} is empty: give bit widths such as [3, 4, 6, 8]")
            bad = [b for b in choices if float(b) not in map(float, VALID_BITS)]
            if bad:
                raise VitqcError(f"mixed_precision_search.{label}: {bad[0]} is not a bit width vitqc quantizes to "
                                 f"({', '.join(f'{b:g}' for b in VALID_BITS)})")
        if TERNARY_BITS in map(float, self.act_choices):
            raise VitqcError("mixed_precision_search.act_choices: activations cannot be ternary; drop 1.58")
        if (self.population < 2 or self.generations < 1 or not 0 <= self.elite < self.population or self.tournament < 1
                or self.mutated_genes < 0):
            raise VitqcError("mixed_precision_search: need population >= 2, generations >= 1, "
                             "0 <= elite < population, tournament >= 1, mutated_genes >= 0")
        if self.init not in ("minmax", "percentile", "mse"):
            raise VitqcError(f"mixed_precision_search.init must be minmax, percentile or mse, not {self.init!r}")


@dataclass
class Gene:
    """One searchable width: ``kind`` 'weight' or 'act', the quantizers it sets, its size for the budget."""

    unit: str
    kind: str
    quantizers: list[UniformQuantizer]
    size: int  # parameters (weight genes) or activation elements per image (act genes)
    choices: list[float]


def _fixed(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or path.startswith(p + ".") for p in patterns)


def _owner_path(quantizer_path: str) -> str:
    return quantizer_path.rpartition(".")[0]


# ------------------------------------------------------------------------------------------- genes
def build_genes(gm: fx.GraphModule, o: MixedPrecisionSearchOptions, act_elements: dict[int, int]) -> list[Gene]:
    genes: list[Gene] = []
    in_layers: set[int] = set()
    for path, layer in gm.named_modules():
        if not isinstance(layer, QUANT_LAYERS):
            continue
        in_layers.add(id(layer.weight_quantizer))
        if layer.input_quantizer is not None:
            in_layers.add(id(layer.input_quantizer))
        if _fixed(path, o.fixed):
            continue
        genes.append(Gene(path, "weight", [layer.weight_quantizer], layer.weight.numel(), sorted(o.weight_choices)))
        if layer.input_quantizer is not None:
            genes.append(Gene(path, "act", [layer.input_quantizer], act_elements[id(layer.input_quantizer)],
                              sorted(o.act_choices)))
    groups: dict[str, list[UniformQuantizer]] = {}
    for qpath, q in quantizers(gm).items():
        if id(q) not in in_layers and not _fixed(_owner_path(qpath), o.fixed):
            groups.setdefault(_owner_path(qpath), []).append(q)
    for owner, qs in groups.items():
        genes.append(Gene(owner, "act", qs, sum(act_elements[id(q)] for q in qs), sorted(o.act_choices)))
    if not genes:
        raise VitqcError("mixed_precision_search found no layer to search: run insert_quantizers first, "
                         "and check mixed_precision_search.fixed does not cover every layer")
    return genes


class Budget:
    """Feasibility of a genome (a tuple of choice indices, one per gene)."""

    def __init__(self, genes: list[Gene], o: MixedPrecisionSearchOptions, fixed_weight_bits: float) -> None:
        self.genes = genes
        w_total = sum(g.size for g in genes if g.kind == "weight")
        if o.model_mb > 0:
            if not w_total:
                raise VitqcError("mixed_precision_search.model_mb: no searched weight layer")
            self.weight_limit = (o.model_mb * 8e6 - fixed_weight_bits) / w_total
        else:
            self.weight_limit = o.weight_bits
        self.act_limit = o.act_bits
        for kind, limit in (("weight", self.weight_limit), ("act", self.act_limit)):
            kinds = [g for g in genes if g.kind == kind]
            if kinds and self.average([0] * len(genes), kind) > limit + 1e-9:
                raise VitqcError(f"mixed_precision_search: even every layer at its smallest width exceeds the "
                                 f"{kind} budget ({limit:.3g} bits on average); raise the budget or add smaller choices")

    def average(self, genome, kind: str) -> float:
        pairs = [(g.size, g.choices[i]) for g, i in zip(self.genes, genome) if g.kind == kind]
        total = sum(s for s, _ in pairs)
        return sum(s * b for s, b in pairs) / total if total else 0.0

    def fits(self, genome) -> bool:
        return (self.average(genome, "weight") <= self.weight_limit + 1e-9
                and self.average(genome, "act") <= self.act_limit + 1e-9)

    def repair_and_fill(self, genome: list[int], rng: random.Random) -> tuple[int, ...]:
        """Lower random genes until the genome fits, then raise random genes while it still fits."""
        genome = list(genome)
        for kind, limit in (("weight", self.weight_limit), ("act", self.act_limit)):
            idx = [i for i, g in enumerate(self.genes) if g.kind == kind]
            while self.average(genome, kind) > limit + 1e-9:
                lowerable = [i for i in idx if genome[i] > 0]
                genome[rng.choice(lowerable)] -= 1
            while True:
                raisable = [i for i in idx if genome[i] + 1 < len(self.genes[i].choices)]
                rng.shuffle(raisable)
                for i in raisable:
                    genome[i] += 1
                    if self.average(genome, kind) <= limit + 1e-9:
                        break
                    genome[i] -= 1
                else:
                    break
        return tuple(genome)


# ------------------------------------------------------------------------------------------- fitness
def patch_contrastive(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE per image: each student token against all teacher tokens of its image, its own as positive."""
    s = F.normalize(student_tokens.float().flatten(1, -2), dim=-1)
    t = F.normalize(teacher_tokens.float().flatten(1, -2), dim=-1)
    logits = s @ t.transpose(1, 2) / temperature  # [B, N, N]
    target = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


class Fitness:
    """Scores genomes against cached FP outputs, with every quantizer's range at every width precomputed."""

    def __init__(self, gm: fx.GraphModule, genes: list[Gene], ctx: CompileContext, o: MixedPrecisionSearchOptions,
                 images: list[torch.Tensor], scope: str | None) -> None:
        self.genes, self.o, self.device = genes, o, ctx.device
        self.images = images
        self.teacher_out = []
        teacher = with_scope_outputs(ctx.reference, [scope] if scope else [], MixedPrecisionSearch.name).to(self.device).eval()
        with torch.no_grad():
            for x in images:
                out, *feats = teacher(x)
                self.teacher_out.append((out.float(), feats[0].float() if feats else None))
        self.student = with_scope_outputs(gm, [scope] if scope else [], MixedPrecisionSearch.name).to(self.device).eval()
        self.ranges: dict[tuple[int, float], dict[str, torch.Tensor]] = {}
        self._precompute_ranges(gm)

    @torch.no_grad()
    def _precompute_ranges(self, gm: fx.GraphModule) -> None:
        weight_of = {id(m.weight_quantizer): m for m in gm.modules() if isinstance(m, QUANT_LAYERS)}
        for gene in self.genes:
            for q in gene.quantizers:
                q.init_method = self.o.init
                original = q.bits
                for b in gene.choices:
                    q.set_bits(b)
                    if id(q) in weight_of:
                        q.init_from_tensor(weight_of[id(q)].effective_weight())
                    else:
                        q.init_from_observed(keep_observations=True)
                    self.ranges[(id(q), b)] = q.qparams()
                q.set_bits(original)
                q.reset_observer()

    def apply(self, genome) -> None:
        for gene, i in zip(self.genes, genome):
            b = gene.choices[i]
            for q in gene.quantizers:
                q.set_bits(b)
                q.load_qparams(self.ranges[(id(q), b)])

    def __call__(self, genome) -> float:
        self.apply(genome)
        return self.score()

    @torch.no_grad()
    def score(self) -> float:
        """Fitness of the graph as it is now (whatever widths and ranges its quantizers hold)."""
        was_training = self.student.training
        self.student.eval()
        total, n = 0.0, 0
        for x, (t_out, t_tok) in zip(self.images, self.teacher_out):
            s_out, *s_feats = self.student(x)
            kl = F.kl_div(F.log_softmax(s_out.float(), -1), F.log_softmax(t_out, -1), reduction="batchmean",
                          log_target=True)
            value = kl
            if t_tok is not None and self.o.contrastive_weight > 0:
                value = value + self.o.contrastive_weight * patch_contrastive(s_feats[0], t_tok, self.o.temperature)
            total += float(value) * len(x)
            n += len(x)
        self.student.train(was_training)
        return total / n


# ------------------------------------------------------------------------------------------- sensitivity seeds
def sensitivity_seeds(genes: list[Gene], budget: Budget, uniform: tuple[int, ...], fitness: "Fitness",
                      quiet: bool = False) -> tuple[list[tuple[int, ...]], int]:
    """Feasible assignments better than ``uniform`` found from one-gene-at-a-time fitness changes (module
    docstring), best first, and the number of candidates scored to find them."""
    base = fitness(uniform)
    moves: list[dict[int, float]] = []  # per gene: choice index -> fitness change (0 at uniform)
    total = sum((u > 0) + (u + 1 < len(g.choices)) for g, u in zip(genes, uniform))
    with progress_bar("sensitivity", total=total, unit="cand", quiet=quiet) as bar:
        for i, (gene, u) in enumerate(zip(genes, uniform)):
            deltas = {u: 0.0}
            for c in (u - 1, u + 1):
                if 0 <= c < len(gene.choices):
                    genome = list(uniform)
                    genome[i] = c
                    deltas[c] = fitness(tuple(genome)) - base
                    bar.advance(1)
            moves.append(deltas)
    # hill climb from uniform: raise the genes whose raise helped most, each paid for by lowering the genes whose
    # lowering hurt least, and keep a move only if the measured fitness improves (the changes do not add up)
    current, current_fit, evaluations = list(uniform), base, total + 1
    changed: set[int] = set()
    ups = sorted((d[u + 1], i) for i, (d, u) in enumerate(zip(moves, uniform)) if u + 1 in d and d[u + 1] < 0)
    seeds = []
    with progress_bar("sensitivity climb", total=len(ups), unit="move", quiet=quiet) as bar:
        for _, i in ups:
            bar.advance(1)
            if i in changed:  # already lowered to pay for another gene
                continue
            trial = list(current)
            trial[i] += 1
            downs = sorted((moves[j][trial[j] - 1], j) for j, g in enumerate(genes)
                           if g.kind == genes[i].kind and j != i and j not in changed and trial[j] - 1 in moves[j])
            lowered = []
            for _, j in downs:
                if budget.fits(trial):
                    break
                trial[j] -= 1
                lowered.append(j)
            if not budget.fits(trial):
                continue
            fit = fitness(tuple(trial))
            evaluations += 1
            if fit < current_fit:
                current, current_fit = trial, fit
                changed |= {i, *lowered}
                seeds.append(tuple(current))
    return seeds[::-1], evaluations


# ------------------------------------------------------------------------------------------- the pass
@register_pass
class MixedPrecisionSearch(VitqcPass):
    name = "mixed_precision_search"
    summary = "choose per-layer weight/activation bits under an average-bits or size budget (evolutionary search)"
    Options = MixedPrecisionSearchOptions
    requires = ("quantized",)
    ensures = ("precision_searched",)

    def call(self, gm: fx.GraphModule, ctx: CompileContext) -> PassResult:
        o = self.options
        if ctx.reference is None:
            raise VitqcError("mixed_precision_search needs the FP reference model (vitqc.compile provides it)")
        started = time.perf_counter()
        gm.to(ctx.device)
        images = torch.cat(ctx.calib_batches())[: o.images].to(ctx.device).split(o.batch_size)
        act_elements = self._observe_activations(gm, images)
        genes = build_genes(gm, o, act_elements)
        searched = {id(q) for g in genes for q in g.quantizers}
        for q in quantizers(gm).values():  # fixed layers' activation quantizers keep their width
            if id(q) in act_elements and id(q) not in searched:
                q.init_method = o.init
                q.init_from_observed()
        fixed_bits = sum(m.weight.numel() * m.weight_quantizer.bits for p, m in gm.named_modules()
                         if isinstance(m, QUANT_LAYERS) and _fixed(p, o.fixed))
        budget = Budget(genes, o, fixed_bits)
        scopes = block_scopes(ctx.reference, o.features)
        fitness = Fitness(gm, genes, ctx, o, list(images), scopes[-1] if scopes else None)

        state = _SearchState.resumed(ctx, o, genes)
        sensitivity_evaluations = 0
        if state is None:
            uniform = _SearchState.uniform_genome(genes, budget)
            seeds: list[tuple[int, ...]] = []
            if o.sensitivity and uniform is not None:
                seeds, sensitivity_evaluations = sensitivity_seeds(genes, budget, uniform, fitness, ctx.quiet)
            state = _SearchState.start(ctx, o, genes, budget, seeds)
        history = state.history
        evaluations = len(state.scores) + sensitivity_evaluations
        with progress_bar(self.name, total=o.generations * o.population, unit="cand",
                          completed=state.generation * o.population, quiet=ctx.quiet) as bar:
            while state.generation < o.generations:
                for genome in state.population:
                    if genome not in state.scores:
                        state.scores[genome] = fitness(genome)
                        evaluations += 1
                    bar.advance(1)
                ranked = sorted(set(state.population), key=lambda g: (state.scores[g], g))
                history.append(state.scores[ranked[0]])
                bar.update(best=history[-1], generation=state.generation + 1)
                state.generation += 1
                if state.generation < o.generations:
                    state.population = self._next_generation(ranked, state, budget, genes)
                state.save(ctx)
        best = min(state.scores, key=lambda g: (state.scores[g], g))
        finalists = self._finalists(gm, ctx, fitness, state, best) if o.finalists > 0 else []
        if finalists:
            best = min(finalists, key=lambda row: (row["fitness_after_joint"], row["genome"]))["genome"]
        fitness.apply(best)
        gm._vitqc_precision_searched = True
        layers = self._assignment(genes, best)
        _update_layer_table(ctx, genes, best)
        uniform = state.uniform
        ctx.record[self.name] = {
            "layers": layers,
            "average_weight_bits": round(budget.average(best, "weight"), 4),
            "average_act_bits": round(budget.average(best, "act"), 4),
            "weight_budget_bits": round(budget.weight_limit, 4), "act_budget_bits": budget.act_limit,
            "weight_mb": round((fixed_bits + sum(g.size * g.choices[i] for g, i in zip(genes, best)
                                                 if g.kind == "weight")) / 8e6, 4),
            "fitness": state.scores[best],
            "uniform_fitness": state.scores.get(uniform) if uniform is not None else None,
            "best_per_generation": history, "evaluations": evaluations,
            "sensitivity_evaluations": sensitivity_evaluations, "images": sum(len(x) for x in images),
            "seconds": round(time.perf_counter() - started, 2), "resumed_from": state.resumed_from,
            "finalists": [{k: v for k, v in row.items() if k != "genome"} | {"uniform": row["genome"] == uniform,
                                                                             "chosen": row["genome"] == best}
                          for row in finalists],
        }
        if not ctx.quiet:
            console.print(assignment_table(ctx.record[self.name]))
        return PassResult(gm, True)

    def _finalists(self, gm: fx.GraphModule, ctx: CompileContext, fitness: "Fitness", state: "_SearchState",
                   best: tuple[int, ...]) -> list[dict]:
        """The ``finalists`` fittest candidates and uniform, each scored after a short joint_optimize from the
        same start (the graph's state is restored after each)."""
        from vitqc.passes.joint_optimize import JointOptimize

        o = self.options
        ranked = sorted(state.scores, key=lambda g: (state.scores[g], g))[: o.finalists]
        if state.uniform is not None and state.uniform not in ranked:
            ranked.append(state.uniform)
        snapshot = {k: v.detach().clone() for k, v in gm.state_dict().items()}
        bits = {id(q): q.bits for g in fitness.genes for q in g.quantizers}
        tune = JointOptimize({"iterations": o.finalist_iterations, "batch_size": o.finalist_batch_size,
                              "checkpoint_every": 10**9})
        rows = []
        with progress_bar("finalists", total=len(ranked), unit="cand", quiet=ctx.quiet) as bar:
            for genome in ranked:
                fitness.apply(genome)
                tune(gm, dataclasses.replace(ctx, record=dict(ctx.record), work_dir=None, resume=False, quiet=True))
                gm._vitqc_joint_optimized = False
                rows.append({"genome": genome, "fitness": state.scores[genome], "fitness_after_joint": fitness.score()})
                gm.load_state_dict(snapshot)
                for g in fitness.genes:
                    for q in g.quantizers:
                        q.set_bits(bits[id(q)])
                bar.advance(1)
        return rows

    @torch.no_grad()
    def _observe_activations(self, gm: fx.GraphModule, images) -> dict[int, int]:
        """Record FP statistics on every activation quantizer (weights bypassed) and the elements each sees
        per image; weight quantizers get a range so the graph can run."""
        weight_qs = {id(m.weight_quantizer) for m in gm.modules() if isinstance(m, QUANT_LAYERS)}
        for m in gm.modules():
            if isinstance(m, QUANT_LAYERS):
                m.weight_quantizer.init_from_tensor(m.effective_weight())
        act_qs = [q for q in quantizers(gm).values() if id(q) not in weight_qs]
        elements: dict[int, int] = {}
        def count(mod: nn.Module, args: tuple) -> None:  # a pre-hook that returns a value replaces the input
            elements.setdefault(id(mod), args[0][0].numel())

        hooks = [q.register_forward_pre_hook(count) for q in act_qs]
        was_training = gm.training
        gm.eval()
        try:
            with bypassed(q for q in quantizers(gm).values() if id(q) in weight_qs):
                for q in act_qs:
                    q.observe(True)
                for x in images:
                    gm(x)
        finally:
            for q in act_qs:
                q.observe(False)
            for h in hooks:
                h.remove()
            gm.train(was_training)
        return elements

    def _next_generation(self, ranked, state: "_SearchState", budget: Budget, genes: list[Gene]) -> list[tuple[int, ...]]:
        o, rng = self.options, state.rng
        nxt = list(ranked[: o.elite])
        tries = 0
        while len(nxt) < o.population:
            a = min(rng.sample(ranked, min(o.tournament, len(ranked))), key=lambda g: (state.scores[g], g))
            b = min(rng.sample(ranked, min(o.tournament, len(ranked))), key=lambda g: (state.scores[g], g))
            child = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
            for i, gene in enumerate(genes):
                if rng.random() < o.mutated_genes / len(genes):
                    child[i] = rng.randrange(len(gene.choices))
            genome = budget.repair_and_fill(child, rng)
            tries += 1
            if genome not in nxt or tries > 50 * o.population:  # prefer distinct candidates
                nxt.append(genome)
        return nxt

    @staticmethod
    def _assignment(genes: list[Gene], genome) -> list[dict]:
        rows: dict[str, dict] = {}
        for gene, i in zip(genes, genome):
            row = rows.setdefault(gene.unit, {"path": gene.unit})
            row[f"{gene.kind}_bits"] = gene.choices[i]
            row["params" if gene.kind == "weight" else "act_elements"] = gene.size
        return list(rows.values())


def _update_layer_table(ctx: CompileContext, genes: list[Gene], genome) -> None:
    """Write the chosen widths into insert_quantizers' layer table (the one the artifact stores)."""
    by_unit: dict[tuple[str, str], float] = {(g.unit, g.kind): g.choices[i] for g, i in zip(genes, genome)}
    for layer in ctx.record.get("insert_quantizers", {}).get("layers", []):
        if layer["kind"] in ("matmul", "softmax"):
            bits = by_unit.get((_owner_path(layer["path"]), "act"))
            if bits is not None:
                layer["act_bits"] = bits
            continue
        for kind in ("weight", "act"):
            bits = by_unit.get((layer["path"], kind))
            if bits is not None:
                layer[f"{kind}_bits"] = bits


def assignment_table(record: dict):
    """Rich table of a search's per-layer widths (from its record, e.g. an artifact's manifest)."""
    from rich.table import Table

    table = Table(title=f"mixed precision: W{record['average_weight_bits']:.3g} A{record['average_act_bits']:.3g} "
                        f"on average (budget W{record['weight_budget_bits']:.3g} A{record['act_budget_bits']:.3g})")
    for col in ("layer", "params", "W bits", "A elements/img", "A bits"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    fmt = lambda v: "" if v is None else f"{v:g}"  # noqa: E731
    for row in record["layers"]:
        table.add_row(row["path"], fmt(row.get("params")), fmt(row.get("weight_bits")), fmt(row.get("act_elements")),
                      fmt(row.get("act_bits")))
    uniform = record.get("uniform_fitness")
    table.caption = (f"fitness {record['fitness']:.4f}" + (f" (uniform: {uniform:.4f})" if uniform is not None else "")
                     + f"; {record['evaluations']} candidates scored on {record['images']} images in {record['seconds']:.1f}s")
    return table


# ------------------------------------------------------------------------------------------- search state
@dataclass
class _SearchState:
    """What a resumed search needs to continue exactly: generation, population, scores and the RNG."""

    generation: int
    population: list[tuple[int, ...]]
    scores: dict[tuple[int, ...], float]
    history: list[float]
    rng: random.Random
    uniform: tuple[int, ...] | None
    signature: str
    resumed_from: int | None = None

    @classmethod
    def resumed(cls, ctx: CompileContext, o: MixedPrecisionSearchOptions, genes: list[Gene]) -> "_SearchState | None":
        """The state of the last finished generation when resuming from a checkpoint, else None."""
        path = cls._path(ctx)
        if not (ctx.resume and path is not None and path.exists()):
            return None
        signature = cls._signature(o, genes)
        data = json.loads(path.read_text())
        if data["signature"] != signature:
            raise VitqcError(f"--resume: {str(path)!r} was written with other mixed_precision_search options or "
                             f"another model; delete it or compile without --resume")
        rng = random.Random()
        rng.setstate(_tuples(data["rng"]))
        return cls(data["generation"], [tuple(g) for g in data["population"]],
                   {tuple(json.loads(k)): v for k, v in data["scores"].items()}, data["history"], rng,
                   tuple(data["uniform"]) if data["uniform"] is not None else None, signature,
                   data["generation"])

    @classmethod
    def start(cls, ctx: CompileContext, o: MixedPrecisionSearchOptions, genes: list[Gene], budget: Budget,
              seeds: list[tuple[int, ...]] = ()) -> "_SearchState":
        """A fresh first generation: uniform, the seeds, then mutants of uniform and random assignments."""
        rng = random.Random(ctx.seed)
        uniform = cls.uniform_genome(genes, budget)
        population = [uniform] if uniform is not None else []
        population += [g for g in dict.fromkeys(seeds) if g not in population][: max(0, o.population - len(population))]
        tries = 0
        while len(population) < o.population:
            if uniform is not None and len(population) % 2 == 1:  # a mutant of uniform: explores near it
                start = [rng.randrange(len(g.choices)) if rng.random() < 2 * o.mutated_genes / len(genes) else u
                         for g, u in zip(genes, uniform)]
            else:  # a random assignment: explores far from it
                start = [rng.randrange(len(g.choices)) for g in genes]
            genome = budget.repair_and_fill(start, rng)
            tries += 1
            if genome not in population or tries > 50 * o.population:  # distinct unless the space is tiny
                population.append(genome)
        return cls(0, population, {}, [], rng, uniform, cls._signature(o, genes))

    @staticmethod
    def uniform_genome(genes: list[Gene], budget: Budget) -> tuple[int, ...] | None:
        """Every gene at the budget's own width, when that width is a choice of every gene."""
        target = {"weight": budget.weight_limit, "act": budget.act_limit}
        genome = []
        for g in genes:
            hits = [i for i, b in enumerate(g.choices) if math.isclose(b, target[g.kind])]
            if not hits:
                return None
            genome.append(hits[0])
        return tuple(genome)

    @staticmethod
    def _signature(o: MixedPrecisionSearchOptions, genes: list[Gene]) -> str:
        opts = {k: v for k, v in vars(o).items()}
        return json.dumps([opts, [(g.unit, g.kind, g.size, g.choices) for g in genes]], sort_keys=True, default=str)

    @staticmethod
    def _path(ctx: CompileContext) -> Path | None:
        return Path(ctx.work_dir) / CHECKPOINT_NAME if ctx.work_dir else None

    def save(self, ctx: CompileContext) -> None:
        path = self._path(ctx)
        if path is None or not is_main():  # under torchrun rank 0 alone writes
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"generation": self.generation, "population": [list(g) for g in self.population],
                "scores": {json.dumps(list(k)): v for k, v in self.scores.items()}, "history": self.history,
                "rng": self.rng.getstate(), "uniform": None if self.uniform is None else list(self.uniform),
                "signature": self.signature}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)


def _tuples(value):
    """JSON turned random.Random's state tuples into lists: turn them back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
