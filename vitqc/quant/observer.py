"""What an activation quantizer records while calibration images pass: running min/max and a bounded, roughly
uniform subsample of the values (per tensor), channel columns (per channel) or token rows (per token)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Observer", "as_units"]


def as_units(x: Tensor, granularity: str, ch_axis: int) -> tuple[Tensor, int]:
    """``x`` as sampling units along the returned dim: values, channel columns or token rows."""
    if granularity == "tensor":
        return x.reshape(-1), 0
    if granularity == "channel":
        axis = ch_axis if ch_axis >= 0 else ch_axis + x.dim()
        return x.movedim(axis, 0).reshape(x.shape[axis], -1), 1
    return x.reshape(-1, x.shape[-1]), 0


class Observer:
    """Statistics of the values a quantizer sees. Plain state (not in any state_dict); ``start()`` discards it
    and restarts the subsample's random stream, so what a calibration records does not depend on how often the
    quantizer observed before (e.g. during a search)."""

    def __init__(self, granularity: str, ch_axis: int, max_samples: int, seed: int) -> None:
        self.granularity, self.ch_axis, self.max_samples, self.seed = granularity, ch_axis, max_samples, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.reset()

    def reset(self) -> None:
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.samples: Tensor | None = None  # tensor: [k]; channel: [C, k]; token: [k, D]
        self.seen = 0  # units (values / channel columns / token rows) seen so far

    def start(self) -> None:
        self.reset()
        self.generator.manual_seed(self.seed)

    @property
    def empty(self) -> bool:
        return self.samples is None or self.lo is None or self.hi is None

    def _pick(self, t: Tensor, k: int, dim: int) -> Tensor:
        n = t.shape[dim]
        if n <= k:
            return t
        if n <= 8 * k:
            idx = torch.randperm(n, generator=self.generator)[:k]
        else:  # randperm of a huge activation costs memory; with replacement is fine for n >> k
            idx = torch.randint(n, (k,), generator=self.generator)
        return t.index_select(dim, idx.to(t.device))

    @torch.no_grad()
    def record(self, x: Tensor) -> None:
        x = x.detach().float()
        if x.numel() == 0:
            return
        units, udim = as_units(x, self.granularity, self.ch_axis)
        if self.granularity == "channel":
            mn, mx = units.amin(1), units.amax(1)
            if self.lo is not None and self.lo.shape != mn.shape:
                raise RuntimeError(f"observed {mn.numel()} channels, previously {self.lo.numel()}")
        else:
            mn, mx = x.amin(), x.amax()
        self.lo = mn if self.lo is None else torch.minimum(self.lo, mn)
        self.hi = mx if self.hi is None else torch.maximum(self.hi, mx)

        # Bounded, approximately uniform subsample over all batches: the budget is split between the
        # old sample and this batch in proportion to how many units each stands for.
        per_unit = 1 if self.granularity == "tensor" else units.numel() // units.shape[udim]
        cap = max(1, self.max_samples // max(per_unit, 1))
        n_new = units.shape[udim]
        total = self.seen + n_new
        if self.samples is None:
            merged = self._pick(units, cap, udim)
        elif total <= cap:
            merged = torch.cat([self.samples, units], udim)
        else:
            k_new = max(1, round(cap * n_new / total))
            old = self._pick(self.samples, cap - k_new, udim)
            merged = torch.cat([old, self._pick(units, cap - old.shape[udim], udim)], udim)
        self.samples = merged
        self.seen = total
