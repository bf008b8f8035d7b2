"""The layer table: every op a pipeline quantizes, at which widths. ``insert_quantizers`` fills it, later passes
(mixed precision) change widths in it, and the artifact's manifest stores it as its ``layers`` list."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator

__all__ = ["Layer", "LayerTable", "WEIGHT_KINDS", "ATTENTION_KINDS"]

WEIGHT_KINDS = ("QuantLinear", "QuantConv2d")  # layers with a weight (their class names after insert_quantizers)
ATTENTION_KINDS = ("matmul", "softmax")  # activation-only ops inside attention


@dataclass
class Layer:
    path: str  # module path; for attention ops "<owner>.<node name>"
    kind: str  # QuantLinear | QuantConv2d | matmul | softmax
    weight_bits: float | None = None
    act_bits: float | None = None
    params: int = 0  # weight elements (0 for attention ops)

    @property
    def has_weight(self) -> bool:
        return self.kind in WEIGHT_KINDS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Layer":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LayerTable:
    rows: list[Layer] = field(default_factory=list)

    def add(self, layer: Layer) -> Layer:
        self.rows.append(layer)
        return layer

    def get(self, path: str) -> Layer | None:
        return next((row for row in self.rows if row.path == path), None)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def weight_layers(self) -> list[Layer]:
        return [row for row in self.rows if row.has_weight]

    @property
    def attention_ops(self) -> list[Layer]:
        return [row for row in self.rows if row.kind in ATTENTION_KINDS]

    def to_list(self) -> list[dict[str, Any]]:
        return [row.to_dict() for row in self.rows]

    @classmethod
    def from_list(cls, rows: list[dict[str, Any]]) -> "LayerTable":
        return cls([Layer.from_dict(row) for row in rows])
