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
    """amax/amin as max pooling, round as two additions: the same program output (LayerNorm's decomposition
    rounds differently, so compared in float, not bit for bit)."""
    q = vitqc.compile(tiny_vit(), W4A4_TOKEN, _calib(), quiet=True).quantized
    gm, _, example, _ = float_program(q)
    x = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(5))
    before, after, targets = _rewritten(gm, x)
    aten = torch.ops.aten
    assert not {aten.round.default, aten.amax.default, aten.amin.default, aten.clamp_min.default} & targets
    assert aten.max.dim in targets
    assert float((before - after).abs().max() / before.abs().max()) < 1e-5


def test_model_ops_rewritten_for_xnnpack_compute_the_same():
    """ATen's LayerNorm as 4-D means, batched matmul as bmm, unbind/select as slices: the float model's output
    kept."""
    q = vitqc.compile(tiny_vit(), W4A4_TOKEN.replace("materialize", "materialize{layer_norm='aten'}"), _calib(),
                      quiet=True).quantized
    gm, _, example, _ = float_program(q, activations=False)
    x = torch.randn(2, *example.shape[1:], generator=torch.Generator().manual_seed(5))
    before, after, targets = _rewritten(gm, x)
    aten = torch.ops.aten
    assert not {aten.layer_norm.default, aten.matmul.default, aten.unbind.int, aten.select.int} & targets
    assert {aten.mean.dim, aten.rsqrt.default, aten.bmm.default, aten.slice.Tensor} <= targets
    assert float((before - after).abs().max() / before.abs().max()) < 1e-5


@pytest.mark.parametrize("c", [64, 384, 12, 7])
def test_pairwise_sums_on_transposed_rows_add_the_same_pairs(c):
    """vitqc's LayerNorm sums restated on [C, R]: the same values to the last bit, the old slices gone."""
    from vitqc.backends.xnnpack_rewrite import pairwise_sums_transposed
    from vitqc.quant.pairwise_layer_norm import pairwise_layer_norm, pairwise_sum_nodes

    class Norm(torch.nn.Module):
        def forward(self, v):
            return pairwise_layer_norm(v, None, None, 1e-6)

    x = torch.randn(3, 5, c, generator=torch.Generator().manual_seed(c)) * 4 + 1
    gm = torch.export.export(Norm(), (x,)).module()
    with torch.no_grad():
        before = gm(x)
        assert pairwise_sums_transposed(gm.graph) == 2
        gm.recompile()
        assert torch.equal(gm(x), before)
    assert not pairwise_sum_nodes(gm.graph)
    assert sum(n.target is torch.ops.aten.permute.default for n in gm.graph.nodes) == 2


def test_round_is_half_to_even_bit_for_bit_in_torch_and_inside_xnnpack(tmp_path):
    """Ties (k + 1/2) are where rounding half up would differ from torch.round: every one of them, and values a
    last bit beside them, round as torch rounds, in the rewritten graph and in the lowered .pte."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from vitqc.backends.executorch import count_delegates, load_pte

    ties = torch.arange(-2048, 2048, dtype=torch.float32) + 0.5
    x = torch.cat([ties, torch.nextafter(ties, ties + 1), torch.nextafter(ties, ties - 1),
                   torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 300]).reshape(1, 4, 64, 64)

    class Round(torch.nn.Module):
        def forward(self, v):
            return torch.round(v * 1.0)

    graph = xnnpack_supported_ops(torch.export.export(Round(), (x,), strict=False).module())
    assert torch.ops.aten.round.default not in {n.target for n in graph.graph.nodes}
    assert torch.equal(graph(x), torch.round(x))
    edge = to_edge_transform_and_lower(torch.export.export(graph, (x,), strict=False), partitioner=[XnnpackPartitioner()])
    assert count_delegates(edge.exported_program().graph_module) == 1
    (tmp_path / "round.pte").write_bytes(edge.to_executorch().buffer)
    got = load_pte(tmp_path / "round.pte").execute([x])[0]
    assert torch.equal(got, torch.round(x))


def test_vitqcs_gelu_goes_to_xnnpack_as_its_gelu_kernel_and_the_pte_equals_the_program(tmp_path):
    """A materialized program's GELU (some twenty ops) is one aten.gelu after the rewrite, and the .pte's
    output equals the program's bit for bit."""
    from vitqc.backends.executorch import load_pte, lower_executorch, run_pte, save_pte

    q = vitqc.compile(tiny_vit(), "minmax-w8a8", _calib(), quiet=True).quantized
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    exported = torch.export.export(q, (x,), strict=False).module()
    with torch.no_grad():
        graph = xnnpack_supported_ops(exported)
        targets = [n.target for n in graph.graph.nodes]
        assert targets.count(torch.ops.aten.gelu.default) == 2
        method = load_pte(save_pte(lower_executorch(q, example=x, batch=4, announce=None), tmp_path / "q.pte"))
        assert torch.equal(run_pte(method, x, batch=4), q(x))
