"""Seeded, class-balanced choices of images."""
from __future__ import annotations

import random
from collections.abc import Sequence

from vitqc.errors import VitqcError

__all__ = ["balanced_order", "spread_indices"]


def balanced_order(labels: Sequence[int], seed: int) -> list[int]:
    """All indices of ``labels`` in a seeded order that is balanced across labels.

    Each label's indices are shuffled, the label order is shuffled, then indices are taken round-robin
    (one per label per round), so any prefix of the order is as balanced as the classes allow.
    """
    rng = random.Random(seed)
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(int(label), []).append(index)
    keys = sorted(groups)
    for key in keys:
        rng.shuffle(groups[key])
    rng.shuffle(keys)
    order: list[int] = []
    for round_ in range(max((len(g) for g in groups.values()), default=0)):
        for key in keys:
            if round_ < len(groups[key]):
                order.append(groups[key][round_])
    return order


def spread_indices(n: int, limit: int | None) -> list[int]:
    """``limit`` indices evenly spread over range(n) (every k-th); all of them when limit is None/>= n."""
    if limit is None or limit >= n:
        return list(range(n))
    if limit < 1:
        raise VitqcError(f"limit {limit} is not positive: pass a limit of at least 1")
    return [(i * n) // limit for i in range(limit)]
