"""Fitness of a mixed-precision candidate (lower is better): KL(FP || quantized) on logits plus a
patch-contrastive term on the last block's tokens, against FP outputs cached once; and the sensitivity seeds
that start the search."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import fx

from vitqc.console import progress_bar
from vitqc.passes.base import CompileContext
from vitqc.precision.budget import Budget
from vitqc.precision.genes import Gene
from vitqc.quant.modules import QUANT_LAYERS
from vitqc.scopes import with_scope_outputs

if TYPE_CHECKING:
    from vitqc.passes.mixed_precision_search import MixedPrecisionSearchOptions

__all__ = ["Fitness", "patch_contrastive", "sensitivity_seeds"]


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
                 images: list[torch.Tensor], scope: str | None, who: str = "mixed_precision_search") -> None:
        self.genes, self.o, self.device = genes, o, ctx.device
        self.images = images
        self.teacher_out = []
        teacher = with_scope_outputs(ctx.reference, [scope] if scope else [], who).to(self.device).eval()
        with torch.no_grad():
            for x in images:
                out, *feats = teacher(x)
                self.teacher_out.append((out.float(), feats[0].float() if feats else None))
        self.student = with_scope_outputs(gm, [scope] if scope else [], who).to(self.device).eval()
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
