"""Measuring a quantized model against its FP reference: top-1, argmax agreement, per-layer SQNR.

Both models are ``torch.export`` programs (what the artifact holds) or any module whose graph nodes carry
``nn_module_stack`` metadata. A layer's output is the last node computed inside that module's scope, so the
FP and quantized programs are compared at the same module paths however differently their insides look.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import fx, nn

from vitqc.progress import progress_bar
from vitqc.scopes import last_nodes

__all__ = ["LayerTaps", "Comparison", "compare", "top1"]


class LayerTaps(fx.Interpreter):
    """Run a graph module and keep the output of each module path in ``paths``."""

    def __init__(self, module: fx.GraphModule, paths: Iterable[str]) -> None:
        super().__init__(module)
        wanted = set(paths)
        last = last_nodes(module.graph, wanted, ops=("call_function",))  # exported programs: aten calls only
        self.tap_of = {node: path for path, node in last.items()}
        self.missing = sorted(wanted - set(last))
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):  # noqa: D102
        out = super().run_node(n)
        path = self.tap_of.get(n)
        if path is not None and isinstance(out, torch.Tensor):
            self.values[path] = out
        return out

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.values = {}
        out = self.run(x)
        return out, self.values


@dataclass
class Comparison:
    images: int = 0
    labeled: int = 0
    reference_correct: int = 0
    quantized_correct: int = 0
    agree: int = 0
    signal: dict[str, float] = field(default_factory=dict)
    noise: dict[str, float] = field(default_factory=dict)

    @property
    def reference_top1(self) -> float | None:
        return self.reference_correct / self.labeled if self.labeled else None

    @property
    def quantized_top1(self) -> float | None:
        return self.quantized_correct / self.labeled if self.labeled else None

    @property
    def agreement(self) -> float:
        return self.agree / self.images if self.images else float("nan")

    def sqnr_db(self) -> dict[str, float]:
        return {p: (10 * math.log10(self.signal[p] / self.noise[p]) if self.noise[p] > 0 else float("inf"))
                for p in self.signal}

    def to_dict(self) -> dict:
        return {"images": self.images, "labeled": self.labeled, "reference_top1": self.reference_top1,
                "quantized_top1": self.quantized_top1, "agreement": self.agreement,
                "sqnr_db": {k: (round(v, 3) if math.isfinite(v) else None) for k, v in self.sqnr_db().items()}}


def _batches(data: Iterable) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    for item in data:
        if isinstance(item, (tuple, list)):
            yield item[0], item[1]
        else:
            yield item, None


@torch.no_grad()
def compare(reference: nn.Module, quantized: nn.Module, data: Iterable, layer_paths: Iterable[str] = (),
            total: int | None = None, quiet: bool = False) -> Comparison:
    """Run both models over ``data`` (batches, or (batch, labels) pairs) and accumulate the comparison."""
    paths = list(layer_paths)
    ref_taps = LayerTaps(reference, paths) if paths and isinstance(reference, fx.GraphModule) else None
    q_taps = LayerTaps(quantized, paths) if paths and isinstance(quantized, fx.GraphModule) else None
    result = Comparison()
    with progress_bar("compare", total=total, unit="img", quiet=quiet) as bar:
        for x, y in _batches(data):
            if ref_taps and q_taps:
                ref_out, ref_vals = ref_taps(x)
                q_out, q_vals = q_taps(x)
                for path in ref_vals.keys() & q_vals.keys():
                    r, q = ref_vals[path].double(), q_vals[path].double()
                    result.signal[path] = result.signal.get(path, 0.0) + float((r * r).sum())
                    result.noise[path] = result.noise.get(path, 0.0) + float(((r - q) ** 2).sum())
            else:
                ref_out, q_out = reference(x), quantized(x)
            ref_pred, q_pred = ref_out.argmax(-1), q_out.argmax(-1)
            result.images += len(x)
            result.agree += int((ref_pred == q_pred).sum())
            if y is not None:
                result.labeled += len(y)
                result.reference_correct += int((ref_pred == y).sum())
                result.quantized_correct += int((q_pred == y).sum())
            bar.advance(len(x))
    # keep the table in graph order
    result.signal = {p: result.signal[p] for p in paths if p in result.signal}
    result.noise = {p: result.noise[p] for p in paths if p in result.noise}
    return result


@torch.no_grad()
def top1(model: nn.Module, data: Iterable, total: int | None = None, quiet: bool = False) -> float:
    right = seen = 0
    with progress_bar("eval", total=total, unit="img", quiet=quiet) as bar:
        for x, y in _batches(data):
            right += int((model(x).argmax(-1) == y).sum())
            seen += len(x)
            bar.advance(len(x))
    return right / seen if seen else float("nan")
