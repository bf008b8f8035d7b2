"""The evolutionary search's state (generation, population, scores, RNG; checkpointed for --resume with the same
result) and how one generation makes the next."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vitqc.distributed import is_main
from vitqc.errors import VitqcError
from vitqc.passes.base import CompileContext
from vitqc.precision.budget import Budget
from vitqc.precision.genes import Gene

if TYPE_CHECKING:
    from vitqc.passes.mixed_precision_search import MixedPrecisionSearchOptions

__all__ = ["SearchState", "next_generation", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "mixed_precision_search.json"


@dataclass
class SearchState:
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
    def resumed(cls, ctx: CompileContext, o: MixedPrecisionSearchOptions, genes: list[Gene]) -> "SearchState | None":
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
              seeds: list[tuple[int, ...]] = ()) -> "SearchState":
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


def next_generation(ranked, state: "SearchState", budget: Budget, genes: list[Gene],
                    o: MixedPrecisionSearchOptions) -> list[tuple[int, ...]]:
    """Elitism, tournament selection, uniform crossover, mutation; children repaired into the budget."""
    rng = state.rng
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
