"""decompose_sdpa on its own: equality, canonical forms, requires/ensures, idempotence."""
from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from vitqc.capture import capture, max_abs_diff
from vitqc.errors import PassCheckFailed
from vitqc.passes.base import check_property, get_pass
from vitqc.passes.decompose_sdpa import DecomposeSdpa, attention_mask_bias
from vitqc.passes.properties import SDPA_TARGETS

ATOL = 1e-5


class Attn(nn.Module):
    """q, k, v from one Linear, then sdpa with the given options."""

    def __init__(self, dim: int = 16, heads: int = 2, kv_heads: int | None = None, mask: str | None = None,
                 is_causal: bool = False, scale: float | None = None, positional: bool = False,
                 seq: int = 5) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads or heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.kv_heads * self.head_dim)
        self.mask_kind, self.is_causal, self.scale, self.positional = mask, is_causal, scale, positional
        g = torch.Generator().manual_seed(3)
        if mask in ("bool", "computed_bool"):
            m = torch.rand(seq, seq, generator=g) > 0.3
            m[:, 0] = True  # no fully masked row
            self.register_buffer("mask", m)
        elif mask == "float":
            self.register_buffer("mask", torch.randn(1, heads, seq, seq, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        mask = self.mask if self.mask_kind else None
        if self.mask_kind == "computed_bool":  # a mask node whose dtype is only known at run time
            mask = mask.logical_and(x[0, :, :1] > -1e9)
        if self.positional:
            out = F.scaled_dot_product_attention(q, k, v, mask, 0.0, self.is_causal, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1 if self.training else 0.0,
                                                 is_causal=self.is_causal, scale=self.scale,
                                                 enable_gqa=self.kv_heads != self.heads)
        return out.transpose(1, 2).reshape(b, n, c)


class Net(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.attn = Attn(**kwargs)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x))


CASES = {
    "plain": {},
    "bool_mask": {"mask": "bool"},
    "float_mask": {"mask": "float"},
    "computed_bool_mask": {"mask": "computed_bool"},
    "causal": {"is_causal": True},
    "scale": {"scale": 0.3},
    "positional": {"mask": "float", "positional": True},
    "gqa": {"heads": 4, "kv_heads": 2},
}


def _sdpa_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS]


@pytest.mark.parametrize("with_example", [True, False], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", list(CASES))
def test_equal_to_eager(case: str, with_example: bool) -> None:
    torch.manual_seed(0)
    model = Net(**CASES[case]).eval()
    x = torch.randn(2, 5, 16)
    gm = capture(model, x if with_example else None)
    assert len(_sdpa_nodes(gm)) == 1
    assert not check_property("no_fused_attention", gm)
    result = DecomposeSdpa()(gm)
    assert result.modified
    gm = result.graph_module
    assert check_property("no_fused_attention", gm)
    assert not _sdpa_nodes(gm)
    with torch.no_grad():
        assert max_abs_diff(gm(x), model(x)) <= ATOL
    # canonical forms: operator.matmul -> call_method softmax(dim=-1) -> operator.matmul
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.matmul]
    softmax = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "softmax"]
    assert len(matmuls) == 2 and len(softmax) == 1
    assert softmax[0].kwargs == {"dim": -1}
    assert matmuls[1].args[0] is softmax[0]
    assert all(n.meta["vitqc_owner"] == "attn" for n in matmuls + softmax)
    # idempotent
    again = DecomposeSdpa()(gm)
    assert again.modified is False


def test_static_scale_and_mask_forms() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    gm = DecomposeSdpa()(capture(Net(mask="bool").eval(), x)).graph_module
    mul = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.mul)
    assert mul.args[1] == pytest.approx(1 / math.sqrt(8))  # head dim known from the example: a constant
    assert any(n.op == "call_method" and n.target == "masked_fill" for n in gm.graph.nodes)
    assert not any(n.op == "call_method" and n.target == "size" for n in gm.graph.nodes)
    gm = DecomposeSdpa()(capture(Net(mask="float").eval(), x)).graph_module
    assert not any(n.op == "call_method" and n.target == "masked_fill" for n in gm.graph.nodes)
    # without an example: the scale comes from q.size(-1) at run time, an unknown-dtype mask via the helper
    gm = DecomposeSdpa()(capture(Net(mask="computed_bool").eval())).graph_module
    assert any(n.op == "call_method" and n.target == "size" for n in gm.graph.nodes)
    assert any(n.op == "call_function" and n.target is attention_mask_bias for n in gm.graph.nodes)


def test_requires_ensures() -> None:
    assert DecomposeSdpa.requires == ()
    assert DecomposeSdpa.ensures == ("no_fused_attention",)

    class NeedsNoFused(DecomposeSdpa):
        name = "needs_no_fused_test"
        requires = ("no_fused_attention",)

    gm = capture(Net().eval())
    with pytest.raises(PassCheckFailed, match="decompose_sdpa"):
        NeedsNoFused()(gm)  # the hint names the pass that provides the property
    NeedsNoFused()(get_pass("decompose_sdpa")()(gm).graph_module)


def test_no_sdpa_is_unmodified() -> None:
    gm = capture(nn.Sequential(nn.Linear(4, 4)).eval())
    assert DecomposeSdpa()(gm).modified is False
