"""Genes of the mixed-precision search: one searchable width per weight layer, per layer input and per
attention module (its matmul inputs and softmax output share one)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import fx

from vitqc.errors import VitqcError
from vitqc.passes.insert_quantizers import quantizers
from vitqc.quant.modules import QUANT_LAYERS
from vitqc.quant.quantizer import UniformQuantizer

if TYPE_CHECKING:
    from vitqc.passes.mixed_precision_search import MixedPrecisionSearchOptions

__all__ = ["Gene", "build_genes", "is_fixed", "owner_path"]


@dataclass
class Gene:
    """One searchable width: ``kind`` 'weight' or 'act', the quantizers it sets, its size for the budget."""

    unit: str
    kind: str
    quantizers: list[UniformQuantizer]
    size: int  # parameters (weight genes) or activation elements per image (act genes)
    choices: list[float]


def is_fixed(path: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or path.startswith(p + ".") for p in patterns)


def owner_path(quantizer_path: str) -> str:
    return quantizer_path.rpartition(".")[0]


def build_genes(gm: fx.GraphModule, o: MixedPrecisionSearchOptions, act_elements: dict[int, int]) -> list[Gene]:
    genes: list[Gene] = []
    in_layers: set[int] = set()
    for path, layer in gm.named_modules():
        if not isinstance(layer, QUANT_LAYERS):
            continue
        in_layers.add(id(layer.weight_quantizer))
        if layer.input_quantizer is not None:
            in_layers.add(id(layer.input_quantizer))
        if is_fixed(path, o.fixed):
            continue
        genes.append(Gene(path, "weight", [layer.weight_quantizer], layer.weight.numel(), sorted(o.weight_choices)))
        if layer.input_quantizer is not None:
            genes.append(Gene(path, "act", [layer.input_quantizer], act_elements[id(layer.input_quantizer)],
                              sorted(o.act_choices)))
    groups: dict[str, list[UniformQuantizer]] = {}
    for qpath, q in quantizers(gm).items():
        if id(q) not in in_layers and not is_fixed(owner_path(qpath), o.fixed):
            groups.setdefault(owner_path(qpath), []).append(q)
    for owner, qs in groups.items():
        genes.append(Gene(owner, "act", qs, sum(act_elements[id(q)] for q in qs), sorted(o.act_choices)))
    if not genes:
        raise VitqcError("mixed_precision_search found no layer to search: run insert_quantizers first, "
                         "and check mixed_precision_search.fixed does not cover every layer")
    return genes
