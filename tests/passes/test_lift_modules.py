"""lift_modules: functional linears/convs on parameters become nn.Linear / nn.Conv2d calls, sharing the weights."""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from vitqc.capture import capture, max_abs_diff
from vitqc.passes.base import get_pass
from vitqc.passes.lift_modules import lift_modules


def _lifted(model: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, dict[str, nn.Module]]:
    gm = capture(model, x)
    assert lift_modules(gm) > 0
    with torch.no_grad():
        assert max_abs_diff(gm(x), model(x)) <= 1e-5
    called = {str(n.target): gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for node in gm.graph.nodes:  # nothing functional is left
        assert node.target not in (F.linear, F.conv2d, torch.addmm, torch.mm)
    return gm, called


class SwinV2Attention(nn.Module):
    """timm's SwinV2 / BEiT / EVA-02 qkv: ``F.linear(x, self.qkv.weight, cat(q_bias, 0, v_bias))``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24, bias=False)
        self.q_bias = nn.Parameter(torch.randn(8))
        self.v_bias = nn.Parameter(torch.randn(8))
        self.register_buffer("k_bias", torch.zeros(8), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))


def test_swinv2_style_qkv_is_the_qkv_module_plus_its_bias() -> None:
    model = SwinV2Attention()
    gm, called = _lifted(model, torch.randn(2, 5, 8))
    assert called == {"qkv": called["qkv"]} and type(called["qkv"]) is nn.Linear
    assert called["qkv"].weight is model.qkv.weight and called["qkv"].bias is None
    (qkv,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    (user,) = qkv.users
    assert user.target is operator.add  # the computed bias is added after the layer


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4))
        self.b1 = nn.Parameter(torch.randn(6))
        self.in_proj_weight = nn.Parameter(torch.randn(6, 6))
        self.proj = nn.Parameter(torch.randn(6, 3))  # stored in x out: applied as x @ proj
        self.conv_weight = nn.Parameter(torch.randn(4, 3, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.conv_weight, None, 2).flatten(2).transpose(1, 2)  # (B, N, 4)
        y = torch.addmm(self.b1, y.reshape(-1, 4), self.w1.t()).reshape(x.shape[0], -1, 6)
        y = y @ self.in_proj_weight.T
        return y @ self.proj


def test_every_functional_form_gets_a_module_at_a_readable_path() -> None:
    model = Functional()
    _, called = _lifted(model, torch.randn(2, 3, 8, 8))
    assert {p: type(m) for p, m in called.items()} == {
        "conv": nn.Conv2d, "w1_layer": nn.Linear, "in_proj": nn.Linear, "proj_layer": nn.Linear}
    assert called["conv"].weight is model.conv_weight and called["conv"].stride == (2, 2)
    assert called["w1_layer"].weight is model.w1 and called["w1_layer"].bias is model.b1
    assert called["in_proj"].weight is model.in_proj_weight
    assert torch.equal(called["proj_layer"].weight, model.proj.t())  # the one copy: a transposed weight


def test_export_containers_become_the_layers_themselves() -> None:
    """A torch.export graph holds F.linear(x, fc.weight, fc.bias) with `fc` a plain container: it becomes the
    nn.Linear at `fc`, so paths are those of the original model."""
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 4)
    gm = capture(model, x, frontend="export", quiet=True)
    gm = get_pass("canonicalize")()(gm).graph_module
    called = {str(n.target): gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert {p: type(m) for p, m in called.items()} == {"0": nn.Linear, "2": nn.Linear}
    assert all(m.bias is not None for m in called.values())
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)


class ReadsWeightDevice(nn.Module):
    """timm's XCiT positional encoding reads ``self.token_projection.weight.device``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + torch.ones(4, device=self.fc.weight.device, dtype=self.fc.weight.dtype)


def test_reads_of_a_weights_device_read_the_input() -> None:
    gm = capture(ReadsWeightDevice(), torch.randn(2, 4))
    lift_modules(gm)
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)  # nothing refers to fc.weight any more
