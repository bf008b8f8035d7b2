"""Measuring a quantized model against its FP reference: top-1, argmax agreement, per-layer SQNR.

Both models are ``torch.export`` programs (what the artifact holds) or any module whose graph nodes carry
``nn_module_stack`` metadata. A layer's output is the last node computed inside that module's scope, so the
FP and quantized programs are compared at the same module paths however differently their insides look.
"""
from __future__ import annotations

import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import fx, nn

from vitqc.console import progress_bar, warn
from vitqc.scopes import last_nodes

__all__ = ["LayerTaps", "Comparison", "compare", "top1", "evaluate"]


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
    non_finite: int = 0  # images whose quantized logits hold NaN or inf
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
        return {"images": self.images, "labeled": self.labeled, "non_finite": self.non_finite, "reference_top1": self.reference_top1,
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
            result.non_finite += _count_non_finite(q_out)
            result.images += len(x)
            result.agree += int((ref_pred == q_pred).sum())
            if y is not None:
                result.labeled += len(y)
                result.reference_correct += int((ref_pred == y).sum())
                result.quantized_correct += int((q_pred == y).sum())
            bar.advance(len(x))
    _warn_non_finite(result.non_finite, result.images, "quantized model")
    # keep the table in graph order
    result.signal = {p: result.signal[p] for p in paths if p in result.signal}
    result.noise = {p: result.noise[p] for p in paths if p in result.noise}
    return result


@torch.no_grad()
def top1(model: nn.Module, data: Iterable, total: int | None = None, quiet: bool = False) -> float:
    right = seen = bad = 0
    with progress_bar("eval", total=total, unit="img", quiet=quiet) as bar:
        for x, y in _batches(data):
            logits = model(x)
            bad += _count_non_finite(logits)
            right += int((logits.argmax(-1) == y).sum())
            seen += len(x)
            bar.advance(len(x))
    _warn_non_finite(bad, seen, "model")
    return right / seen if seen else float("nan")


def _count_non_finite(logits: torch.Tensor) -> int:
    return int((~torch.isfinite(logits)).reshape(len(logits), -1).any(-1).sum())


def _warn_non_finite(bad: int, images: int, who: str) -> None:
    if bad:
        warn(f"the {who}'s logits are NaN or inf on {bad} of {images} images: its top-1 there is meaningless "
             f"(broken weights or an overflow)")


def evaluate(target: str | Path | nn.Module, data: str | Path, *, limit: int | None = None, batch_size: int = 64,
             preprocess=None, quiet: bool = False, **model_options) -> dict:
    """Top-1 of ``target`` on an ImageFolder ``data``; for an artifact also agreement with its FP program and
    per-layer SQNR. ``target``: an artifact or packed export (recognised by content), a model spec
    (``timm:NAME``, ``FILE.pt`` ... with ``model_options``), or an nn.Module (with ``preprocess``)."""
    from vitqc.artifact import identify, load_artifact
    from vitqc.data import ImageFolderData, iterate_labeled
    from vitqc.errors import VitqcError

    dataset = ImageFolderData(data, require_classes=True)
    total = min(limit, len(dataset.samples)) if limit else len(dataset.samples)
    kind = identify(target) if isinstance(target, (str, Path)) else None
    if kind is None and str(target).endswith(".vitqc"):
        kind = "vitqc"  # not recognisable, but named as an artifact: say what is wrong with it
    result: dict = {"model": str(target) if kind or isinstance(target, (str, Path)) else type(target).__qualname__}
    if kind in ("artifact", "vitqc"):
        art = load_artifact(target)
        batches = iterate_labeled(dataset, preprocess or art.preprocess, batch_size=batch_size, limit=limit,
                                  progress=not quiet)
        if art.reference_program is None:
            result.update(quantized_top1=top1(art.quantized, batches, total=total, quiet=quiet), images=total)
        else:
            cmp = compare(art.reference, art.quantized, batches, art.layer_paths, total=total, quiet=quiet)
            result.update(pipeline=art.manifest["pipeline"]["name"], **cmp.to_dict())
        result["kind"] = "artifact"
    else:
        if kind == "packed":
            from vitqc.backends.packed import load_packed

            packed = load_packed(target)
            module, own = packed.module(), packed.preprocess
        elif kind == "pte":
            raise VitqcError(f"{target} is an ExecuTorch program: run it with executorch.runtime (vitqc eval reads "
                             f"artifacts, packed exports and models)")
        elif isinstance(target, nn.Module):
            module, own = target, None
        else:
            from vitqc.models import load_model_and_preprocess

            loaded, own = load_model_and_preprocess(str(target), **model_options)
            module = loaded.module
        preprocess = preprocess or own
        if preprocess is None:
            raise VitqcError(f"{target!s} carries no data config: give --img-size (and --mean/--std if it normalises)")
        batches = iterate_labeled(dataset, preprocess, batch_size=batch_size, limit=limit, progress=not quiet)
        result.update(kind=kind or "model", top1=top1(module, batches, total=total, quiet=quiet), images=total)
    result["skipped_unreadable"] = dataset.skipped
    return result
