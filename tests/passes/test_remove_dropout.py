"""remove_dropout on its own: equality, requires/ensures, dead submodules, idempotence."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

from vitqc.capture import capture, max_abs_diff
from vitqc.passes.base import check_property
from vitqc.passes.properties import DROPOUT_FUNCTIONS
from vitqc.passes.remove_dropout import DROPOUT_MODULES, RemoveDropout


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)
        self.drop2d = nn.Dropout2d(0.2)
        self.ident = nn.Identity()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.fc1(x))
        x = F.dropout(x, p=0.3, training=self.training)
        x = torch.dropout(x, 0.1, False)
        x = self.ident(x)
        x = self.drop2d(x[:, :, None, None])[:, :, 0, 0]
        return self.fc2(F.dropout(input=x, p=0.1, training=False))


def _dropout_like(gm) -> int:
    count = 0
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), DROPOUT_MODULES):
            count += 1
        if n.op == "call_function" and n.target in DROPOUT_FUNCTIONS:
            count += 1
    return count


def test_removes_modules_and_functions() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 8)
    gm = capture(model, x)
    assert _dropout_like(gm) == 6
    assert not check_property("no_dropout", gm)
    result = RemoveDropout()(gm)
    assert result.modified
    gm = result.graph_module
    assert _dropout_like(gm) == 0
    assert check_property("no_dropout", gm)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc1", "fc2"]
    names = {name for name, _ in gm.named_modules()}
    assert not names & {"drop", "drop2d", "ident"}  # dead submodules are deleted
    with torch.no_grad():
        assert max_abs_diff(gm(x), model(x)) <= 1e-6
    assert RemoveDropout()(gm).modified is False


def test_timm_vit_with_dropout_rates() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1).eval()
    x = torch.randn(2, 3, 32, 32)
    gm = RemoveDropout()(capture(model, x)).graph_module
    assert check_property("no_dropout", gm)
    with torch.no_grad():
        assert max_abs_diff(gm(x), model(x)) <= 1e-6


def test_requires_ensures() -> None:
    assert RemoveDropout.requires == ()
    assert RemoveDropout.ensures == ("no_dropout",)
    gm = capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval())
    assert check_property("no_dropout", gm)
    assert RemoveDropout()(gm).modified is False
