"""The budget of the mixed-precision search: parameter-weighted average weight bits (or a model size) and
element-weighted average activation bits; repair and fill keep a genome within it."""
from __future__ import annotations

import random
from typing import TYPE_CHECKING

from vitqc.errors import VitqcError
from vitqc.precision.genes import Gene

if TYPE_CHECKING:
    from vitqc.passes.mixed_precision_search import MixedPrecisionSearchOptions

__all__ = ["Budget"]


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
