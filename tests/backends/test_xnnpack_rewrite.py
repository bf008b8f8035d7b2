"""The graph rewrites that keep a ViT inside XNNPACK's delegates compute what the graph computed before."""
import pytest
import torch

import vitqc
from tests.conftest import tiny_vit

pytest.importorskip("executorch")

from vitqc.backends.executorch import float_program  # noqa: E402
from vitqc.backends.xnnpack_rewrite import xnnpack_supported_ops  # noqa: E402

W4A4_TOKEN = ("canonicalize,insert_quantizers{weight_bits=4,act_bits=4,act_granularity='token',keep={head=8,patch_embed=8}},"
              "calibrate,materialize")


def _calib():
    return list(torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1)).split(16))


def _rewritten(gm, x):
    exported = torch.export.export(gm, (x,), strict=False).module()
    with torch.no_grad():
        before = exported(x)
        rewritten = xnnpack_supported_ops(exported)
        return before, rewritten(x), {n.target for n in rewritten.graph.nodes}


def test_quantizer_ops_rewritten_for_xnnpack_give_the_same_codes():
    """amax/amin as max pooling, round as floor(x + 0.5): the same program output (no exact ties in random data;
    LayerNorm's decomposition rounds differently, so compared in float, not bit for bit)."""
    q = vitqc.compile(tiny_vit(), W4A4_TOKEN, _calib(), quiet=True).quantized
    gm, _, example, _ = float_program(q)
    x = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(5))
    before, after, targets = _rewritten(gm, x)
    aten = torch.ops.aten
    assert not {aten.round.default, aten.amax.default, aten.amin.default, aten.clamp_min.default} & targets
    assert aten.max.dim in targets and aten.floor.default in targets
    assert float((before - after).abs().max() / before.abs().max()) < 1e-5


def test_model_ops_rewritten_for_xnnpack_compute_the_same():
    """LayerNorm as 4-D means, batched matmul as bmm, unbind/select as slices: the float model's output kept."""
    q = vitqc.compile(tiny_vit(), W4A4_TOKEN, _calib(), quiet=True).quantized
    gm, _, example, _ = float_program(q, activations=False)
    x = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(5))
    before, after, targets = _rewritten(gm, x)
    aten = torch.ops.aten
    assert not {aten.layer_norm.default, aten.matmul.default, aten.unbind.int, aten.select.int} & targets
    assert {aten.mean.dim, aten.rsqrt.default, aten.bmm.default, aten.slice.Tensor} <= targets
    assert float((before - after).abs().max() / before.abs().max()) < 1e-5
