"""The torch.export front end: ATen programs become vitqc's torch-level fx form (vitqc/from_export.py)."""
from __future__ import annotations

import io
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitqc.capture import capture, max_abs_diff
from vitqc.errors import TraceFailure
from vitqc.from_export import export_model, graph_from_exported, is_exported_module
from vitqc.passes.base import get_pass


class _ManyOps(nn.Module):
    """One of each op family a ViT uses, written the way models write them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, 4)
        self.norm = nn.LayerNorm(16)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        q, k, v = self.qkv(self.norm(x)).reshape(x.shape[0], -1, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v)
        b = torch.einsum("bhqd,bhkd->bhqk", q, k).softmax(-1) @ v
        y = self.proj((a + b).transpose(1, 2).reshape(x.shape[0], -1, 16))
        return F.gelu(F.dropout(y, 0.1, training=False))[:, 1:].mean(1)


def _exported(model: nn.Module, x: torch.Tensor, decompose: bool = False) -> nn.Module:
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
    if decompose:  # core ATen: addmm / bmm / convolution / native_layer_norm / _softmax
        program = program.run_decompositions()
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer).module()


@pytest.mark.parametrize("decompose", [False, True], ids=["export", "core-aten"])
def test_exported_programs_become_the_canonical_graph(decompose: bool) -> None:
    torch.manual_seed(0)
    model, x = _ManyOps().eval(), torch.randn(2, 3, 16, 16)
    program = _exported(model, x, decompose)
    assert is_exported_module(program)
    gm = capture(program, x, quiet=True)
    assert gm.meta["vitqc"]["frontend"] == "export"
    gm = get_pass("canonicalize")()(gm).graph_module
    layers = {str(n.target): type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    weights = {p: gm.get_submodule(p).weight for p, t in layers.items() if t in (nn.Linear, nn.Conv2d)}
    # each weight of the model is applied by exactly one nn.Linear / nn.Conv2d call (core ATen's mm + bias add
    # becomes a Linear at proj.weight_layer, its bias added after)
    assert sorted(tuple(w.shape) for w in weights.values()) == sorted(
        tuple(p.shape) for n, p in model.named_parameters() if p.dim() >= 2 and n.endswith("weight"))
    assert ("proj" in weights) != decompose and "qkv" in weights and "embed" in weights
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.matmul]
    softmaxes = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "softmax"]
    assert len(matmuls) == 4 and len(softmaxes) == 2  # sdpa decomposed, einsum lowered
    for n in gm.graph.nodes:  # no ATen weight op, no dropout is left
        assert n.target not in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default, torch.ops.aten.addmm.default,
                                torch.ops.aten.convolution.default, torch.ops.aten.dropout.default, F.dropout)
    with torch.no_grad():
        for batch in (x, x[:1], torch.randn(5, 3, 16, 16)):
            assert max_abs_diff(gm(batch), model(batch)) <= 1e-5
    if not decompose:
        assert {n.meta["vitqc_owner"] for n in matmuls} == {""}
        assert "norm" in layers and layers["norm"] is nn.LayerNorm


def test_the_graph_is_a_plain_graph_module_with_module_paths() -> None:
    torch.manual_seed(0)
    model, x = _ManyOps().eval(), torch.randn(2, 3, 16, 16)
    gm = graph_from_exported(export_model(model, x))
    assert not hasattr(gm, "_in_spec") and "_guards_fn" not in dict(gm.named_children())
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"} >= {"qkv.weight", "embed.weight", "cls"}
    linear = next(n for n in gm.graph.nodes if n.target is F.linear)
    assert [entry[0] for entry in linear.meta["nn_module_stack"].values()][-1] in ("qkv", "proj")


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc(x)
        return y, y.softmax(-1)


def test_a_program_with_several_outputs_uses_the_first_and_says_so(capsys) -> None:
    model, x = _TwoOutputs().eval(), torch.randn(2, 4)
    gm = graph_from_exported(export_model(model, x), "the program")
    assert "returns 2 values; vitqc uses the first" in capsys.readouterr().err
    with torch.no_grad():
        assert max_abs_diff(gm(x), model(x)[0]) == 0


def test_a_program_of_two_inputs_is_refused() -> None:
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    x = torch.randn(2, 3)
    program = torch.export.export(Two(), (x, x)).module()
    with pytest.raises(TraceFailure, match="takes 2 inputs"):
        graph_from_exported(program)
