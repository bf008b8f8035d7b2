"""The fused training path of UniformQuantizer gives the plain path's values and gradients."""
from __future__ import annotations

import pytest
import torch

from vitqc.quant import UniformQuantizer
from vitqc.quant.fused import fused_fake_quant

CASES = [
    # bits, symmetric, granularity, input shape
    (4, True, "tensor", (4, 9, 16)),
    (4, False, "tensor", (4, 9, 16)),
    (8, False, "tensor", (2, 5, 8)),
    (3, True, "channel", (12, 10)),
    (4, False, "channel", (12, 10)),
    (1.58, True, "channel", (12, 10)),
    (4, True, "token", (3, 7, 16)),
    (4, False, "token", (3, 7, 16)),
    (3, False, "token", (2, 2, 5, 8)),
    (8, False, "token", (2, 5, 8)),
]


def _quantizer(bits, symmetric, granularity, x):
    torch.manual_seed(0)
    q = UniformQuantizer(bits=bits, symmetric=symmetric, granularity=granularity, ch_axis=0)
    q.init_from_tensor(x)
    with torch.no_grad():  # move ranges off min-max so that some values are clipped, others not
        if granularity == "token":
            q.clip_ratio.fill_(0.7)
        else:
            q.scale.mul_(0.6 + 0.2 * torch.rand_like(q.scale))
            if not symmetric:
                q.zero_point.add_(torch.randn_like(q.zero_point) * 2)
    return q


def _run(q, x, grad, fused):
    x = x.clone().requires_grad_(True)
    for p in q.parameters():
        p.grad = None
    with fused_fake_quant(fused):
        out = q(x)
    out.backward(grad)
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in q.named_parameters()}


@pytest.mark.parametrize("bits,symmetric,granularity,shape", CASES)
def test_fused_matches_plain(bits, symmetric, granularity, shape) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * 3
    grad = torch.randn(shape, generator=g)
    q = _quantizer(bits, symmetric, granularity, x)
    out_f, gx_f, gp_f = _run(q, x, grad, True)
    out_p, gx_p, gp_p = _run(q, x, grad, False)
    assert torch.equal(out_f, out_p)  # values bit-identical
    assert torch.allclose(gx_f, gx_p, rtol=1e-5, atol=1e-6)
    clipped = int((gx_p == 0).sum())
    assert 0 < clipped < x.numel()  # the case exercises both sides of the clamp
    assert gp_f.keys() == gp_p.keys() and gp_f
    for name in gp_p:
        assert torch.allclose(gp_f[name], gp_p[name], rtol=1e-4, atol=1e-6), name
        assert gp_p[name].abs().sum() > 0, name  # a gradient that is all zero would compare equal trivially


def test_fused_saves_less_for_backward() -> None:
    """What the autograd graph keeps alive between forward and backward for a quantizer feeding a linear layer
    (as every input quantizer does): the input, the output the linear keeps anyway, and a one-byte mask."""
    x = torch.randn(8, 65, 384)
    w = torch.randn(16, 384, requires_grad=True)
    q = _quantizer(4, False, "token", x)

    def saved_bytes(fused: bool) -> int:
        storages: dict[int, int] = {}

        def pack(t):
            storages[id(t.untyped_storage())] = t.untyped_storage().nbytes()
            return t

        xr = x.clone().requires_grad_(True)
        with fused_fake_quant(fused), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.nn.functional.linear(q(xr), w)
        return sum(storages.values())

    fused, plain = saved_bytes(True), saved_bytes(False)
    assert fused <= x.numel() * 9 * 1.05 < plain


def test_plain_path_without_gradients() -> None:
    """Evaluation (no grad) and tracing use the plain ops: the fused function never enters an exported graph."""
    x = torch.randn(2, 5, 8)
    q = _quantizer(4, False, "token", x)
    with torch.no_grad():
        assert q(x).grad_fn is None
    ep = torch.export.export(q, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("FakeQuant" in o or "autograd_function" in o for o in ops)


@pytest.mark.parametrize("granularity", ["tensor", "token"])
def test_fused_codes_in_float32_for_bf16_inputs(granularity) -> None:
    """Under autocast activations arrive as bf16; the codes are those of the float32 values (as deployed)."""
    x = (torch.randn(4, 9, 16) * 3).bfloat16()
    q = _quantizer(8, False, granularity, x.float())
    xr = x.clone().requires_grad_(True)
    out = q(xr)
    assert out.dtype == torch.bfloat16
    with torch.no_grad():
        expected = q(x.float()).bfloat16()
    assert torch.equal(out.detach(), expected)
    out.float().sum().backward()
    assert xr.grad.dtype == torch.bfloat16
