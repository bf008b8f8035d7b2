"""ExecuTorch lowering (XNNPACK): the .pte loads in executorch.runtime, runs, and follows vitqc's model."""
import pytest
import torch

import vitqc
from tests.conftest import tiny_vit

pytest.importorskip("executorch")

from vitqc.backends.executorch import (describe_substitution, float_program, load_pte, lower_executorch,  # noqa: E402
                                       run_pte, save_pte)

W4A8_HEAD8 = "canonicalize,insert_quantizers{weight_bits=4,act_bits=8,keep={head=8}},calibrate,materialize"


def _calib():
    return list(torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)).split(16))


@pytest.fixture(scope="module")
def w4a8():
    return vitqc.compile(tiny_vit(), W4A8_HEAD8, _calib(), quiet=True)


def test_float_program_plans_each_layer(w4a8):
    gm, plans, example, _ = float_program(w4a8)
    by_path = {p.path: p for p in plans}
    assert by_path["blocks.0.mlp.fc1"].device_weight == "qc4w" and by_path["head"].device_weight == "qc8w"
    assert by_path["patch_embed.proj"].device_weight == "fp32"
    # vitqc's scales are handed over as they are; the float graph holds the dequantized weights
    assert torch.equal(by_path["blocks.0.mlp.fc1"].scale, w4a8.get_submodule("blocks.0.mlp.fc1").weight_scale.reshape(-1))
    assert torch.equal(gm.get_submodule("blocks.0.mlp.fc1").weight, w4a8.get_submodule("blocks.0.mlp.fc1").dequantized_weight())
    line = describe_substitution(plans)
    assert "\n" not in line and "XNNPACK W4/8A8" in line and "dynamic int8" in line


def test_pte_loads_runs_and_follows_vitqc(w4a8, tmp_path):
    lines = []
    result = lower_executorch(w4a8, batch=2, announce=lines.append)
    assert len(lines) == 1 and lines[0] == result.substitution  # said once, before lowering
    assert result.delegates >= 2  # XNNPACK segments split by the ops it does not take (LayerNorm...)
    path = save_pte(result, tmp_path / "m.pte")
    method = load_pte(path)
    x = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    got = run_pte(method, x, batch=2)
    with torch.no_grad():
        ref = w4a8(x)
    assert got.shape == ref.shape
    # dynamic A8 instead of vitqc's static A8: close, not identical
    assert float((got - ref).abs().max() / ref.abs().max()) < 0.1
    assert [l["device"] for l in result.layers if l["path"] == "blocks.0.mlp.fc1"] == ["qc4w+dynA8"]
