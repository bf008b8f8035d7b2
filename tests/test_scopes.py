"""Block scopes: by path pattern, else by structure (one attention per block)."""
from __future__ import annotations

import torch
from torch import nn

from tests.conftest import tiny_vit
from vitqc.capture import capture
from vitqc.passes.canonicalize import reference_copy
from vitqc.scopes import attention_scopes, block_scopes

PATTERNS = ["blocks.*", "layers.*.blocks.*", "encoder.layers.*", "layers.*"]


class _Stack(nn.Module):
    """Blocks at paths no pattern knows (transformers' `vit.layers.N`, PVT's `stages.N.blocks.M`)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Module()
        self.body.stack = nn.ModuleList(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
                                        for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.body.stack:
            x = block(x)
        return self.head(x.mean(1))


def test_blocks_are_found_by_structure_when_no_pattern_matches() -> None:
    gm = reference_copy(capture(_Stack().eval(), torch.randn(2, 5, 8)))
    assert block_scopes(gm, PATTERNS) == ["body.stack.0", "body.stack.1", "body.stack.2"]


def test_a_matching_pattern_still_decides() -> None:
    gm = reference_copy(capture(tiny_vit(), torch.randn(2, 3, 16, 16)))  # fused attention: sdpa calls
    assert block_scopes(gm, PATTERNS) == ["blocks.0", "blocks.1"] == attention_scopes(gm)
