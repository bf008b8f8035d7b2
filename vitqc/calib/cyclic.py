"""Cyclic generation <-> quantization (CLAMP-ViT; PSAQ-ViT v2's adaptive teacher-student).

``joint_optimize.datafree_rounds = R`` splits the joint optimization into R + 1 equal parts. The first trains
on the images the data-free ``--calib`` source made; before each later part, the source generates
``datafree_images`` more, optimized against the student as it is at that moment: each new image must still
be read as its class by the FP model (within the source's own constraints: class target, patch-contrastive
loss and image priors for ``inversion``; the diffusion model itself for ``prompts`` / ``learned-prompts``)
while KL(FP || student) on it grows. They are appended to the pool, so later steps train where the student
still disagrees with the FP model. Each source says how in its ``generate_disagreement(labels, indices,
student)``.

:class:`DatafreeRounds` is what joint_optimize drives: ``images_at(step, student, images)`` returns the pool
to sample from at ``step``. Round images are kept in the work directory, so a resumed compile continues
with the very images the interrupted one generated (regenerating them would need the student of that time).
Under ``torchrun`` the ranks share a round's classes as calibration generation does (rank r makes the items of
the classes c with ``c % world == r``, :func:`vitqc.calib.distributed.shard_classes`) and every rank then holds
all of the round's images, in the round's order.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitqc.calib import Source, plan_items
from vitqc.calib.features import forward, normalise
from vitqc.calib.inversion import frozen, kl_disagreement
from vitqc.calib.distributed import shard_classes
from vitqc.distributed import all_gather_objects, broadcast_tree, is_main, world_size
from vitqc.errors import VitqcError

ROUND_FILE = "datafree_round{}.pt"


def round_starts(iterations: int, rounds: int) -> list[int]:
    """The steps at which rounds 1..rounds generate: the starts of the last ``rounds`` of ``rounds + 1`` equal parts."""
    return [r * iterations // (rounds + 1) for r in range(1, rounds + 1)]


def round_items(source: Source, pool_size: int, per_round: int, round_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, indices) of round ``round_index``'s new items: class-balanced (classes in a seeded order per
    round), with indices past those of the initial pool and of earlier rounds, so every item's noise is new."""
    n = source.num_classes
    offset = math.ceil(pool_size / n) + (round_index - 1) * math.ceil(per_round / n)
    items = plan_items(range(n), math.ceil(per_round / n), seed=source.seed + round_index, limit=per_round)
    return (torch.tensor([c for c, _ in items], dtype=torch.long),
            torch.tensor([offset + i for _, i in items], dtype=torch.long))


@torch.no_grad()
def mean_disagreement(source: Source, student: nn.Module, images: torch.Tensor, batch_size: int = 32) -> float:
    """Mean KL(FP || student) over normalised ``images``."""
    total = 0.0
    for x in images.split(batch_size):
        x = x.to(source.device)
        total += float(kl_disagreement(forward(source.model, x, want_patches=False).logits, student(x))) * len(x)
    return total / max(len(images), 1)


class DatafreeRounds:
    """The data-free rounds of one joint_optimize run (see the module doc)."""

    def __init__(self, source: Source | None, rounds: int, per_round: int, iterations: int,
                 work_dir: str | None = None, quiet: bool = False):
        self.source, self.rounds, self.per_round = source, rounds, per_round
        self.starts = round_starts(iterations, rounds) if source is not None else []
        self.done = 0
        self.work_dir = Path(work_dir) if work_dir else None
        self.quiet = quiet
        self.record: list[dict[str, Any]] = []
        if source is not None and not hasattr(source, "generate_disagreement"):
            raise VitqcError(f"joint_optimize.datafree_rounds: --calib {source.name} cannot generate against the "
                             f"student; use --calib inversion, prompts or learned-prompts, or datafree_rounds=0")

    @classmethod
    def for_context(cls, ctx, rounds: int, per_round: int, iterations: int) -> "DatafreeRounds":
        """The rounds for a compile; without a data-free source it says so in one line and does nothing."""
        source = getattr(ctx, "calib_source", None)
        if source is None:
            from vitqc.console import warn

            warn(f"joint_optimize.datafree_rounds={rounds}: the calibration images come from no data-free source "
                 f"(--calib images:DIR or Python tensors), so no rounds are generated")
        return cls(source, rounds, per_round, iterations, ctx.work_dir, ctx.quiet)

    def _path(self, round_index: int) -> Path | None:
        return self.work_dir / ROUND_FILE.format(round_index) if self.work_dir else None

    def images_at(self, step: int, student: nn.Module, images: torch.Tensor, resumed: bool = False) -> torch.Tensor:
        """The pool for ``step``: ``images`` with every round due by then appended (generated now, or read back
        from the work directory when ``resumed`` and the round happened before the interruption)."""
        while self.done < len(self.starts) and step >= self.starts[self.done]:
            self.done += 1
            path = self._path(self.done)
            if resumed and step > self.starts[self.done - 1]:
                # rank 0 reads the work directory (only it need see it) and every rank gets its images
                found = is_main() and path is not None and path.exists()
                new = broadcast_tree(torch.load(path, map_location="cpu", weights_only=True) if found else None)
                if new is None:
                    raise VitqcError(f"cannot resume: the images of data-free round {self.done} are not in the work "
                                     f"directory; start the compile over (without --resume)")
                self.record.append({"round": self.done, "step": self.starts[self.done - 1], "images": len(new),
                                    "read_back": True})
            else:
                new = self._generate(self.done, images, student)
                if path is not None and is_main():  # under torchrun rank 0 alone writes
                    path.parent.mkdir(parents=True, exist_ok=True)
                    torch.save(new, path.with_name(path.name + ".tmp"))
                    path.with_name(path.name + ".tmp").replace(path)
            images = torch.cat([images, new.to(images.device, images.dtype)])
        return images

    def _generate(self, round_index: int, pool: torch.Tensor, student: nn.Module) -> torch.Tensor:
        from vitqc.console import err

        source = self.source
        labels, indices = round_items(source, len(pool), self.per_round, round_index)
        mine_classes = set(shard_classes(sorted(set(labels.tolist()))))
        mine = [i for i, c in enumerate(labels.tolist()) if c in mine_classes]
        if not self.quiet:
            share = f" ({world_size()} ranks share its classes)" if world_size() > 1 else ""
            err.print(f"joint_optimize: data-free round {round_index}/{self.rounds}: {source.name} generates "
                      f"{len(labels)} images against the student{share}", highlight=False, soft_wrap=True)
        was_training = student.training
        started = time.perf_counter()
        try:
            images01 = source.generate_disagreement(labels[mine], indices[mine], student).cpu() if mine else None
        finally:
            student.train(was_training)
        parts = [part for part in all_gather_objects((mine, images01)) if part[0]]
        order = torch.tensor([i for positions, _ in parts for i in positions])
        images01 = torch.cat([images for _, images in parts])[torch.argsort(order)]
        seconds = time.perf_counter() - started
        new = normalise(images01, source.preprocess)
        with frozen(student, source.device):  # how much more the student disagrees on them than on the pool
            kl_new, kl_pool = (mean_disagreement(source, student, x) for x in (new, pool))
        self.record.append({"round": round_index, "step": self.starts[round_index - 1], "images": len(new),
                            "generated_by_this_rank": len(mine), "seconds": round(seconds, 2),
                            "kl_new_images": round(kl_new, 5), "kl_pool": round(kl_pool, 5)})
        return new
