"""vitqc's LayerNorm: LayerNorm to float precision, in a summation order the graph fixes, computed by an XNNPACK
.pte bit for bit."""
import pytest
import torch
import torch.nn.functional as F

from vitqc.quant.pairwise_layer_norm import pairwise_layer_norm, pairwise_sum, pairwise_sum_nodes, sqrt_rn


def _x(c: int, rows: int = 64) -> torch.Tensor:
    return torch.randn(rows, c, generator=torch.Generator().manual_seed(c)) * 3 + 1


@pytest.mark.parametrize("c", [8, 12, 192, 384, 7])
def test_pairwise_layer_norm_is_layer_norm_to_float_precision(c):
    x, w, b = _x(c), torch.rand(c) + 0.5, torch.randn(c)
    ref = F.layer_norm(x.double(), (c,), w.double(), b.double(), 1e-6)
    got = pairwise_layer_norm(x, w, b, 1e-6)
    assert float((got.double() - ref).abs().max()) < 1e-5
    assert torch.allclose(pairwise_layer_norm(x, None, None, 1e-5), F.layer_norm(x, (c,), eps=1e-5), atol=1e-5)


def test_pairwise_sum_adds_halves_then_the_odd_rest_left_to_right():
    x = _x(12, rows=5)
    halves = x[:, :6] + x[:, 6:]
    quarters = halves[:, :3] + halves[:, 3:]
    expected = (quarters[:, 0:1] + quarters[:, 1:2]) + quarters[:, 2:3]
    assert torch.equal(pairwise_sum(x), expected)


@pytest.mark.parametrize("c", [64, 12, 384, 7, 2])
def test_pairwise_sums_are_found_in_an_exported_graph(c):
    """Each exported pairwise_sum is found from its input to its output, and nothing else: a sum of halves in
    another order (last half first) is not one."""
    class Sums(torch.nn.Module):
        def forward(self, x):
            n = x.shape[-1] // 2
            return pairwise_sum(x), pairwise_sum(x * x), x[..., n:2 * n] + x[..., :n]

    x = _x(c, rows=6).reshape(2, 3, c)
    g = torch.export.export(Sums(), (x,)).graph
    found = pairwise_sum_nodes(g)
    outputs = list(g.output_node().args[0])
    assert [out for _, out in found] == outputs[:2]
    assert found[0][0].op == "placeholder" and found[1][0].target is torch.ops.aten.mul.Tensor


def test_sqrt_rn_is_correctly_rounded():
    v = torch.rand(1 << 16, generator=torch.Generator().manual_seed(0)) * 100
    r = sqrt_rn(v).double()
    exact = torch.sqrt(v.double())
    up, down = torch.nextafter(r.float(), torch.tensor(float("inf"))).double(), \
        torch.nextafter(r.float(), torch.tensor(float("-inf"))).double()
    assert bool(((r - exact).abs() <= (up - exact).abs()).all() and ((r - exact).abs() <= (down - exact).abs()).all())


def test_an_xnnpack_pte_computes_it_bit_for_bit(tmp_path):
    pytest.importorskip("executorch")
    from executorch.exir import to_edge_transform_and_lower

    from vitqc.backends.executorch import count_delegates, load_pte, xnnpack_partitioner
    from vitqc.backends.xnnpack_rewrite import xnnpack_supported_ops

    class Norms(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = torch.nn.Parameter(torch.rand(384) + 0.5), torch.nn.Parameter(torch.randn(384))

        def forward(self, v):
            for _ in range(3):
                v = v + pairwise_layer_norm(v, self.w, self.b, 1e-6)
            return v

    x = _x(384, rows=130)
    with torch.no_grad():
        program = torch.export.export(Norms(), (x,)).module()
        expected = program(x)  # (after the rewrite, torch would run ATen's sqrt: not correctly rounded)
        graph = xnnpack_supported_ops(program)
        targets = [n.target for n in graph.graph.nodes]
        assert targets.count(torch.ops.aten.sqrt.default) == 3 and torch.ops.aten.to.dtype not in targets
        edge = to_edge_transform_and_lower(torch.export.export(graph, (x,)), partitioner=[xnnpack_partitioner()])
    assert count_delegates(edge.exported_program().graph_module) >= 1
    (tmp_path / "ln.pte").write_bytes(edge.to_executorch().buffer)
    assert torch.equal(load_pte(tmp_path / "ln.pte").execute([x])[0], expected)
