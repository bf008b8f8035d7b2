"""decompose_mha on its own: equality, new Linear modules, requires/ensures, idempotence, unsupported forms."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import fx, nn

from vitqc.capture import capture, max_abs_diff
from vitqc.errors import VitqcError
from vitqc.passes.base import check_property
from vitqc.passes.decompose_mha import DecomposedMultiheadAttention, DecomposeMha

ATOL = 1e-5
E, H, L, S, N = 16, 4, 5, 7, 2


class SelfAttn(nn.Module):
    def __init__(self, batch_first: bool = True, mask: str | None = None, weights: str | None = None,
                 bias: bool = True) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first, bias=bias)
        self.mask, self.weights = mask, weights
        g = torch.Generator().manual_seed(5)
        bool_mask = torch.rand(L, L, generator=g) > 0.6
        bool_mask[:, 0] = False  # no fully masked row (True = masked out in MHA)
        self.register_buffer("bool_mask", bool_mask)
        self.register_buffer("float_mask", torch.randn(N * H, L, L, generator=g))
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(L))

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        kwargs = {}
        if self.mask == "bool":
            kwargs["attn_mask"] = self.bool_mask
        elif self.mask == "float3d":
            kwargs["attn_mask"] = self.float_mask
        elif self.mask == "causal":
            kwargs["attn_mask"], kwargs["is_causal"] = self.causal, True
        elif self.mask == "padding":
            keys = x[..., 0] if self.mha.batch_first else x[..., 0].transpose(0, 1)  # (N, L)
            kwargs["key_padding_mask"] = (keys > 1e9) | (torch.arange(L) >= L - 1)  # last key padded
        if self.weights is None:
            return self.mha(x, x, x, need_weights=False, **kwargs)[0]
        out, w = self.mha(x, x, x, need_weights=True, average_attn_weights=self.weights == "avg", **kwargs)
        return out, w


class CrossAttn(nn.Module):
    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True, kdim=kdim, vdim=kdim)
        self.proj = nn.Linear(E, kdim or E)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        mem = self.proj(memory)
        a = self.mha(x, mem, mem)[0]  # default need_weights=True, weights unused
        b = self.mha(x + 1, mem, mem)[0]  # the same module called twice
        return a + b


def _check(model: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    model.eval()
    gm = capture(model, inputs)
    assert not check_property("no_multihead_attention_modules", gm)
    result = DecomposeMha()(gm)
    assert result.modified
    gm = result.graph_module
    assert check_property("no_multihead_attention_modules", gm)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())
    assert isinstance(gm.get_submodule("mha"), DecomposedMultiheadAttention)
    assert type(gm.get_submodule("mha.out_proj")) is nn.Linear
    for grad in (False, True):  # eager fast path (no grad) and slow path
        with torch.set_grad_enabled(grad):
            assert max_abs_diff(gm(*inputs), model(*inputs)) <= ATOL
    assert DecomposeMha()(gm).modified is False
    return gm


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "bool", "float3d", "causal", "padding"])
def test_self_attention(batch_first: bool, mask: str | None) -> None:
    torch.manual_seed(0)
    x = torch.randn(N, L, E) if batch_first else torch.randn(L, N, E)
    gm = _check(SelfAttn(batch_first=batch_first, mask=mask), x)
    lin = gm.get_submodule("mha.in_proj")
    assert type(lin) is nn.Linear and lin.weight.shape == (3 * E, E)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert targets == ["mha.in_proj", "mha.out_proj"]
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.matmul]
    softmax = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "softmax"]
    assert len(matmuls) == 2 and len(softmax) == 1 and softmax[0].kwargs == {"dim": -1}
    assert {n.meta["vitqc_owner"] for n in matmuls + softmax} == {"mha"}
    assert gm.get_submodule("mha.in_proj").weight is not None
    # parameters are not duplicated
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in SelfAttn().mha.parameters())


@pytest.mark.parametrize("weights", ["avg", "per_head"])
def test_attention_weights(weights: str) -> None:
    torch.manual_seed(0)
    _check(SelfAttn(weights=weights, mask="bool"), torch.randn(N, L, E))


def test_no_bias() -> None:
    torch.manual_seed(0)
    gm = _check(SelfAttn(bias=False), torch.randn(N, L, E))
    assert gm.get_submodule("mha.in_proj").bias is None


@pytest.mark.parametrize("kdim", [None, 12])
def test_cross_attention_separate_projections(kdim: int | None) -> None:
    torch.manual_seed(0)
    gm = _check(CrossAttn(kdim=kdim), torch.randn(N, L, E), torch.randn(N, S, E))
    for name, in_features in (("q_proj", E), ("k_proj", kdim or E), ("v_proj", kdim or E)):
        lin = gm.get_submodule(f"mha.{name}")
        assert type(lin) is nn.Linear and lin.weight.shape == (E, in_features)
    called = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("mha.")]
    assert called.count("mha.q_proj") == 2 and called.count("mha.out_proj") == 2


def test_requires_ensures() -> None:
    assert DecomposeMha.requires == ()
    assert DecomposeMha.ensures == ("no_multihead_attention_modules",)


def test_unsupported_add_bias_kv() -> None:
    model = SelfAttn()
    model.mha = nn.MultiheadAttention(E, H, batch_first=True, add_bias_kv=True)
    with pytest.raises(VitqcError, match="add_bias_kv"):
        DecomposeMha()(capture(model.eval()))


def test_no_mha_is_unmodified() -> None:
    gm = capture(nn.Sequential(nn.Linear(4, 4)).eval())
    assert DecomposeMha()(gm).modified is False
