"""vitqc.data.sampling: seeded class-balanced orders."""
from __future__ import annotations

from vitqc.data import balanced_order


def test_balanced_order():
    labels = [0] * 5 + [1] * 2 + [2] * 1
    order = balanced_order(labels, seed=1)
    assert sorted(order) == list(range(8))
    assert sorted(labels[i] for i in order[:3]) == [0, 1, 2]
    assert sorted(labels[i] for i in order[3:5]) == [0, 1]
    assert order == balanced_order(labels, seed=1)

