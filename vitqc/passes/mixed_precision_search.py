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
Neither the fitness before joint optimization nor the finalists' score after a short one predicts accuracy
after the full joint optimization well: that is the open problem of this pass (measured: docs/findings.md,
"Mixed precision"; benchmarks/results/mixed_precision_vits14_cifar10_v*.json).

Evolution: population ``population``, ``generations`` rounds, elitism, tournament selection, uniform
crossover, mutation of ``mutated_genes`` genes per child on average (a fixed probability per gene would
scramble a ViT-S, which has ~100 genes); infeasible children are repaired (random genes lowered until within
budget) and then filled (random genes raised while the budget allows). The first population is uniform,
the sensitivity seeds (below), then half mutants of uniform and half random assignments.

Sensitivity seeds (``sensitivity = true``): random assignments of ~100 genes are almost all worse than uniform,
so a few hundred candidates barely leave it. Instead each gene is moved alone one width down and one up from
uniform and the change of fitness measured (two candidates per gene). The changes do not add up
(docs/findings.md), so they only order a hill climb: raise the gene whose raise helped most, pay for it by lowering the
genes whose lowering hurt least, keep the move if the measured fitness improves; one candidate per
helpful gene. The climb's accepted assignments start the evolution. Seeded; each generation is checkpointed to the work
directory and ``--resume`` continues from the last finished one with the same result.

The chosen widths are set on the quantizers (ranges initialised by ``init`` at the new width; run
``calibrate`` after), written into the layer table the artifact stores, and shown as a per-layer table.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from vitqc.errors import VitqcError
from vitqc.passes.base import APPLIED, CompileContext, PassResult, VitqcPass, applied, graph_property, register_pass
from vitqc.passes.insert_quantizers import bypassed, quantizers
from vitqc.console import out, progress_bar
from vitqc.precision.budget import Budget
from vitqc.precision.evolution import SearchState, next_generation
from vitqc.precision.fitness import Fitness, sensitivity_seeds
from vitqc.precision.genes import Gene, build_genes, is_fixed, owner_path
from vitqc.precision.table import assignment_table
from vitqc.quant.modules import QUANT_LAYERS
from vitqc.quant.quantizer import TERNARY_BITS, VALID_BITS
from vitqc.scopes import block_scopes


@graph_property("precision_searched")
def is_precision_searched(gm: fx.GraphModule) -> bool:
    """mixed_precision_search has set a bit width per layer."""
    return applied(gm, "mixed_precision_search")


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
        images = ctx.calib_images()[: o.images].to(ctx.device).split(o.batch_size)
        act_elements = self._observe_activations(gm, images)
        genes = build_genes(gm, o, act_elements)
        searched = {id(q) for g in genes for q in g.quantizers}
        for q in quantizers(gm).values():  # fixed layers' activation quantizers keep their width
            if id(q) in act_elements and id(q) not in searched:
                q.init_method = o.init
                q.init_from_observed()
        fixed_bits = sum(m.weight.numel() * m.weight_quantizer.bits for p, m in gm.named_modules()
                         if isinstance(m, QUANT_LAYERS) and is_fixed(p, o.fixed))
        budget = Budget(genes, o, fixed_bits)
        scopes = block_scopes(ctx.reference, o.features)
        fitness = Fitness(gm, genes, ctx, o, list(images), scopes[-1] if scopes else None)

        state = SearchState.resumed(ctx, o, genes)
        sensitivity_evaluations = 0
        if state is None:
            uniform = SearchState.uniform_genome(genes, budget)
            seeds: list[tuple[int, ...]] = []
            if o.sensitivity and uniform is not None:
                seeds, sensitivity_evaluations = sensitivity_seeds(genes, budget, uniform, fitness, ctx.quiet)
            state = SearchState.start(ctx, o, genes, budget, seeds)
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
                    state.population = next_generation(ranked, state, budget, genes, o)
                state.save(ctx)
        best = min(state.scores, key=lambda g: (state.scores[g], g))
        finalists = self._finalists(gm, ctx, fitness, state, best) if o.finalists > 0 else []
        if finalists:
            best = min(finalists, key=lambda row: (row["fitness_after_joint"], row["genome"]))["genome"]
        fitness.apply(best)
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
            out.print(assignment_table(ctx.record[self.name]))
        return PassResult(gm, True)

    def _finalists(self, gm: fx.GraphModule, ctx: CompileContext, fitness: "Fitness", state: "SearchState",
                   best: tuple[int, ...]) -> list[dict]:
        """The ``finalists`` fittest candidates and uniform, each scored after a short joint_optimize from the
        same start (the graph's state is restored after each)."""
        from vitqc.passes.joint_optimize import JointOptimize

        o = self.options
        ranked = sorted(state.scores, key=lambda g: (state.scores[g], g))[: o.finalists]
        if state.uniform is not None and state.uniform not in ranked:
            ranked.append(state.uniform)
        snapshot = {k: v.detach().clone() for k, v in gm.state_dict().items()}
        history = list(gm.meta.get(APPLIED, []))
        bits = {id(q): q.bits for g in fitness.genes for q in g.quantizers}
        # the pipeline's own joint_optimize options (--set included), shortened to the finalists' budget
        tune = JointOptimize({**ctx.step_options("joint_optimize"), "iterations": o.finalist_iterations,
                              "batch_size": o.finalist_batch_size, "checkpoint_every": 10**9})
        rows = []
        with progress_bar("finalists", total=len(ranked), unit="cand", quiet=ctx.quiet) as bar:
            for genome in ranked:
                fitness.apply(genome)
                tune(gm, dataclasses.replace(ctx, record=dict(ctx.record), work_dir=None, resume=False, quiet=True))
                gm.meta[APPLIED] = list(history)  # a trial: the graph is put back as it was
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

    @staticmethod
    def _assignment(genes: list[Gene], genome) -> list[dict]:
        rows: dict[str, dict] = {}
        for gene, i in zip(genes, genome):
            row = rows.setdefault(gene.unit, {"path": gene.unit})
            row[f"{gene.kind}_bits"] = gene.choices[i]
            row["params" if gene.kind == "weight" else "act_elements"] = gene.size
        return list(rows.values())


def _update_layer_table(ctx: CompileContext, genes: list[Gene], genome) -> None:
    """Write the chosen widths into the layer table (the one the artifact stores)."""
    by_unit: dict[tuple[str, str], float] = {(g.unit, g.kind): g.choices[i] for g, i in zip(genes, genome)}
    for layer in ctx.layers:
        if not layer.has_weight:
            bits = by_unit.get((owner_path(layer.path), "act"))
            if bits is not None:
                layer.act_bits = bits
            continue
        for kind in ("weight", "act"):
            bits = by_unit.get((layer.path, kind))
            if bits is not None:
                setattr(layer, f"{kind}_bits", bits)
