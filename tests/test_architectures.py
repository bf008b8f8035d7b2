"""Every architecture family of vitqc/architectures.py compiles to a program whose linears and attention matmuls
all run in integer arithmetic (issue 21: no silent floating-point holes, whatever the front end)."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitqc
from vitqc.architectures import get, names
from vitqc.hf import HFImageModel, is_hf_model
from vitqc.quant.modules import IntLinear, IntMatmul

_FLOAT_MATMULS = (operator.matmul, torch.matmul, torch.bmm, torch.mm, torch.einsum, torch.baddbmm, F.linear)


def linear_weight_elements(model: nn.Module) -> int:
    """Elements of every linear weight of the model, counted on the model itself (not on any graph):
    ``nn.Linear`` weights and ``nn.MultiheadAttention``'s input projections; for a torch.export program (whose
    modules are plain containers), its 2-D parameters named ``weight``."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.weight.numel()
        elif isinstance(module, nn.MultiheadAttention):
            total += sum(p.numel() for n, p in module.named_parameters(recurse=False) if n.endswith("proj_weight"))
    if total == 0:
        total = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n.endswith("weight"))
    return total


def _fp(model: nn.Module) -> nn.Module:
    return HFImageModel(model) if is_hf_model(model) else model


@pytest.mark.parametrize("name", names(unit_test=True))
def test_every_linear_and_attention_matmul_runs_in_integer_arithmetic(name: str) -> None:
    arch = get(name)
    model = arch.model()
    x = arch.example(2, seed=1)
    gm = vitqc.compile(model, "minmax-w8a8", [arch.example(8, seed=2)], quiet=True, strict=True).quantized
    record = gm.meta["vitqc"]["record"]
    # the matmuls of two activations insert_quantizers found in the canonical graph
    expected_matmuls = sum(1 for layer in gm.meta["vitqc"]["layers"] if layer["kind"] == "matmul")

    linears = [m for m in gm.modules() if isinstance(m, IntLinear)]
    assert linears and all(m.integer_input for m in linears)
    assert sum(m.weight_codes.numel() for m in linears) == linear_weight_elements(model)
    matmuls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), IntMatmul)]
    assert len(matmuls) == expected_matmuls > 0
    for node in gm.graph.nodes:  # nothing linear or matmul-like is left in floating point
        assert not (node.op == "call_function" and node.target in _FLOAT_MATMULS), node.format_node()
        assert not (node.op == "call_method" and node.target in ("matmul", "bmm", "mm")), node.format_node()
        if node.op == "call_module":
            assert not isinstance(gm.get_submodule(node.target), nn.Linear), node.target

    coverage = record["coverage"]
    assert coverage["linear"]["integer"] == coverage["linear"]["present"] == len(linears)
    assert coverage["matmul"]["integer"] == coverage["matmul"]["present"] == expected_matmuls
    assert coverage["float_layers"] == []
    assert record["capture"]["frontend"] in ("fx", "export")

    # and it still computes the model: W8A8 stays close to FP on other images
    with torch.no_grad():
        want, got = _fp(model)(x), gm(x)
    assert float((got - want).norm() / want.norm()) < 0.25
