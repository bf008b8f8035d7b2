"""vitqc's GELU is XNNPACK's GELU kernel, bit for bit, and GELU to float precision."""
import math

import pytest
import torch

from vitqc.quant.rational_gelu import GELU_LIMIT, fma_is_fused, rational_gelu


def _inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(1 << 18, generator=g) * 3, torch.linspace(-8, 8, (1 << 18) + 13),
                      torch.tensor([0.0, -0.0, GELU_LIMIT, -GELU_LIMIT, 1e-30, -1e-30, 100.0, -100.0])])


def test_rational_gelu_is_gelu_to_float_precision():
    x = _inputs()
    exact = (x.double() * 0.5 * (1 + torch.erf(x.double() / math.sqrt(2)))).float()
    # absolute error below 1e-6 (where 1 + erf cancels, and GELU's tail beyond the clamp), relative 1e-6 elsewhere
    assert bool(((rational_gelu(x) - exact).abs() <= 1e-6 + 1e-6 * exact.abs()).all())
    assert torch.equal(rational_gelu(x[x > 6]), x[x > 6])  # beyond the clamp, x * 0.5 * 2


def test_rational_gelu_is_what_xnnpack_computes_bit_for_bit(tmp_path):
    """Through an XNNPACK .pte (its GELU kernel): every value equal; ATen's GELU differs on many of them."""
    pytest.importorskip("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from vitqc.backends.executorch import count_delegates, load_pte

    if not fma_is_fused("cpu"):
        pytest.skip("this torch build's addcmul rounds twice (no FMA kernels)")

    class Gelu(torch.nn.Module):
        def forward(self, v):
            return torch.nn.functional.gelu(v)

    x = _inputs()
    edge = to_edge_transform_and_lower(torch.export.export(Gelu(), (x,)), partitioner=[XnnpackPartitioner()])
    assert count_delegates(edge.exported_program().graph_module) == 1
    (tmp_path / "gelu.pte").write_bytes(edge.to_executorch().buffer)
    xnnpack = load_pte(tmp_path / "gelu.pte").execute([x])[0]
    assert torch.equal(rational_gelu(x), xnnpack)
    assert int((torch.nn.functional.gelu(x) != xnnpack).sum()) > x.numel() // 10


def test_fma_probe_tells_one_rounding_from_two():
    a = torch.full((5,), 1.0 + 2.0**-12)
    fused = float(torch.addcmul(torch.tensor(-(1.0 + 2.0**-11)), a, a)[0]) == 2.0**-24
    assert fma_is_fused("cpu") == fused
    assert float(a[0] * a[0] - (1.0 + 2.0**-11)) == 0.0  # two roundings lose the last bit


@pytest.mark.parametrize("shape", [(7,), (3, 5, 11), (1 << 19) + 3])
def test_the_in_place_chunked_form_gives_the_same_values(shape):
    from vitqc.quant.rational_gelu import rational_gelu_fast

    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 4
    assert torch.equal(rational_gelu_fast(x), rational_gelu(x))


def test_exported_gelus_are_found_and_replaced_by_one_node():
    from vitqc.quant.rational_gelu import fast_rational_gelus, rational_gelu_fast, rational_gelu_nodes

    class Mlp(torch.nn.Module):
        def forward(self, v):
            return rational_gelu(v * 2.0) + rational_gelu(v).sum(-1, keepdim=True)

    x = torch.randn(4, 9)
    gm = torch.export.export(Mlp(), (x,)).module()
    assert len(rational_gelu_nodes(gm.graph)) == 2
    expected = gm(x)
    fast = fast_rational_gelus(gm)
    assert [n.target for n in fast.graph.nodes].count(rational_gelu_fast) == 2
    assert torch.ops.aten.addcmul.default not in {n.target for n in fast.graph.nodes}
    assert torch.equal(fast(x), expected)
