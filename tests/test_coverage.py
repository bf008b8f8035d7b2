"""Coverage: what runs quantized, what the rules left in floating point, and what vitqc did not recognise."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vitqc
from tests.conftest import run_cli, tiny_vit
from vitqc.capture import register_leaf_module
from vitqc.coverage import measure
from vitqc.errors import VitqcError


def _compile(model: nn.Module, x: torch.Tensor, pipeline: str = "minmax-w8a8", **kwargs):
    return vitqc.compile(model, pipeline, [x], quiet=True, **kwargs).quantized


def test_a_vit_is_fully_covered_and_the_counts_add_up() -> None:
    gm = _compile(tiny_vit(), torch.randn(8, 3, 16, 16))
    cov = gm.meta["vitqc"]["record"]["coverage"]
    assert cov["linear"] == {"present": 9, "asked": 9, "quantized": 9, "integer": 9, "params": cov["linear"]["params"],
                             "asked_params": cov["linear"]["params"], "quantized_params": cov["linear"]["params"]}
    assert cov["linear"]["params"] == sum(m.weight.numel() for m in tiny_vit().modules() if isinstance(m, nn.Linear))
    assert cov["matmul"]["integer"] == cov["matmul"]["present"] == 4
    assert cov["conv"]["integer"] == 1 and cov["float_layers"] == [] and cov["linear_fraction"] == 1.0


def test_rules_are_reasons_and_not_warnings(capsys) -> None:
    x = torch.randn(8, 3, 16, 16)
    gm = vitqc.compile(tiny_vit(), "minmax-w8a8", [x], insert_quantizers__skip=["head", "blocks.1.attn"],
                       insert_quantizers__conv=False).quantized
    err = capsys.readouterr().err
    assert "not recognised" not in err and "coverage: linear layers 6/9 quantized" in err
    cov = measure(gm, gm.meta["vitqc"]["record"])
    reasons = {(f.path, f.reason) for f in cov.float_layers}
    assert ("head", "insert_quantizers.skip 'head'") in reasons
    assert ("blocks.1.attn.qkv", "insert_quantizers.skip 'blocks.1.attn'") in reasons
    assert ("patch_embed.proj", "insert_quantizers.conv = false") in reasons
    assert sum(f.kind == "matmul" for f in cov.float_layers) == 2 and all(f.recognised for f in cov.float_layers)
    assert cov.linear.asked == 6 == cov.linear.quantized and cov.unrecognised == []


class _Whole(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


register_leaf_module(_Whole)


class _Holes(nn.Module):
    """A leaf kept whole by the user, and a weight computed from a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Whole()
        self.w = nn.Parameter(torch.randn(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.linear(self.inner(x), self.w * 0.5)
        return self.head(x)


def test_what_is_not_recognised_is_one_loud_line(capsys) -> None:
    x = torch.randn(8, 16)
    gm = vitqc.compile(_Holes(), "minmax-w8a8", [x]).quantized
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and err[0].startswith("warning: 2 layers/matmuls are not recognised") and "--strict" in err[0]
    cov = measure(gm, gm.meta["vitqc"]["record"])
    holes = {f.path: f.reason for f in cov.unrecognised}
    assert holes["inner.fc"].startswith("not recognised: inside _Whole at inner, kept whole as a leaf module")
    assert "with a weight from w" in holes["linear"]
    assert cov.linear.present == 3 and cov.linear.quantized == 1 and cov.linear.asked == 3
    assert cov.linear.params == 3 * 16 * 16 - 16 * 12 and cov.linear.quantized_params == 64


def test_strict_makes_it_an_error() -> None:
    with pytest.raises(VitqcError, match="--strict: 2 layers/matmuls are not recognised"):
        vitqc.compile(_Holes(), "minmax-w8a8", [torch.randn(8, 16)], quiet=True, strict=True).quantized


def test_cli_strict_exits_non_zero_and_writes_nothing(tmp_path, capsys) -> None:
    factory = tmp_path / "holes.py"
    factory.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Holes(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.w = nn.Parameter(torch.randn(10, 3 * 8 * 8))\n"
        "    def forward(self, x):\n"
        "        return torch.nn.functional.linear(x.flatten(1), self.w * 2)\n\n"
        "def build():\n    return Holes()\n")
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 20, 200 - i * 30)).save(images / f"{i}.png")
    out = tmp_path / "holes.vitqc"
    code, _, err = run_cli(["compile", f"{factory}:build", "--pipeline", "minmax-w8a8", "--calib", f"images:{images}",
                            "--img-size", "8", "--out", out, "--strict"], capsys)
    assert code == 2 and "--strict: 1 layers/matmuls are not recognised" in err and not out.exists()
    assert not list(tmp_path.glob("*.vitqc*"))
