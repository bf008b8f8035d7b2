"""canonicalize's op normalisation: einsum / baddbmm / bmm -> operator.matmul (what insert_quantizers matches)."""
from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from vitqc.capture import capture, max_abs_diff
from vitqc.passes.base import get_pass
from vitqc.passes.canonicalize import reference_copy


class Einsum(nn.Module):
    def __init__(self, equation: str) -> None:
        super().__init__()
        self.equation = equation

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        b = a * 2 + 1
        return torch.einsum(self.equation, a, b)


@pytest.mark.parametrize("equation,shape", [
    ("bhqd,bhkd->bhqk", (2, 3, 5, 4)),   # q @ k^T
    ("bhqk,bhkd->bhqd", (2, 3, 4, 4)),   # attn @ v
    ("bqd,bkd->bqk", (2, 5, 4)),
    ("bhd,bhd->bh", (2, 3, 4)),          # no free index on either side
    ("bnc,bmc->bmn", (2, 4, 3)),         # output in another order
])
def test_two_activation_einsums_become_one_matmul(equation: str, shape: tuple[int, ...]) -> None:
    model, x = Einsum(equation), torch.randn(*shape)
    gm = get_pass("canonicalize")()(capture(model, x)).graph_module
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.einsum not in targets and targets.count(operator.matmul) == 1
    assert max_abs_diff(gm(x), model(x)) <= 1e-5


def test_other_einsums_are_left_alone() -> None:
    model, x = Einsum("bij,bjk->bik"), torch.randn(2, 4, 4)
    model.equation = "...ij,...jk->...ik"
    gm = get_pass("canonicalize")()(capture(model, x)).graph_module
    assert any(n.target is torch.einsum for n in gm.graph.nodes)


class Baddbmm(nn.Module):
    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(a, a, a.transpose(1, 2), beta=0.5, alpha=2.0) + torch.bmm(a, a)


def test_baddbmm_and_bmm() -> None:
    model, x = Baddbmm(), torch.randn(2, 3, 3)
    gm = get_pass("canonicalize")()(capture(model, x)).graph_module
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(operator.matmul) == 2 and torch.baddbmm not in targets and torch.bmm not in targets
    assert max_abs_diff(gm(x), model(x)) <= 1e-5


def test_reference_copy_has_the_canonical_paths_and_keeps_fused_attention() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    captured = capture(layer, x)
    ref = reference_copy(captured)
    canonical = get_pass("canonicalize")()(captured).graph_module
    paths = lambda gm: {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}  # noqa: E731
    assert {"self_attn.in_proj", "self_attn.out_proj"} <= paths(ref) == paths(canonical)
    with torch.no_grad():
        assert max_abs_diff(ref(x), layer(x)) <= 1e-5


def test_reference_copy_computes_what_the_model_computes() -> None:
    from tests.conftest import tiny_vit
    from vitqc.passes.properties import SDPA_TARGETS

    model, x = tiny_vit(), torch.randn(2, 3, 16, 16)
    ref = reference_copy(capture(model, x))
    assert sum(1 for n in ref.graph.nodes if n.op == "call_function" and n.target in SDPA_TARGETS) == 2
    with torch.no_grad():
        assert torch.equal(ref(x), model(x))  # the same kernels: bit for bit


def test_multihead_attention_projections_are_in_the_sqnr_table() -> None:
    import vitqc
    from vitqc.architectures import get
    from vitqc.artifact import export_program
    from vitqc.evaluate import compare

    arch = get("torch_encoder")
    model, x = arch.model(), arch.example(8, seed=3)
    graph = capture(model, x[:1])
    reference = reference_copy(graph)
    gm = vitqc.compile(graph, "minmax-w8a8", [x], quiet=True).quantized
    layers = [layer["path"] for layer in gm.meta["vitqc"]["layers"]
              if layer["kind"] == "QuantLinear"]
    result = compare(export_program(reference, x[:1]).module(), export_program(gm, x[:1]).module(), [x], layers,
                     quiet=True)
    assert {"encoder.layers.0.self_attn.in_proj", "encoder.layers.1.self_attn.out_proj"} <= result.sqnr_db().keys()
    assert result.sqnr_db().keys() == set(layers)
