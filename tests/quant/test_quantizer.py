"""UniformQuantizer: exact hand-computed values, gradients, init methods, observation, state, export."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vitqc.quant import UniformQuantizer


def t(*vals: float) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.float32)


def sym4(**kw) -> UniformQuantizer:
    return UniformQuantizer(bits=4, symmetric=True, granularity=kw.pop("granularity", "tensor"), **kw)


# ---------------------------------------------------------------- ranges and validation


def test_integer_ranges() -> None:
    assert (sym4().qmin, sym4().qmax) == (-8, 7)
    assert (sym4(narrow_range=True).qmin, sym4(narrow_range=True).qmax) == (-7, 7)
    asym8 = UniformQuantizer(bits=8, symmetric=False, granularity="tensor")
    assert (asym8.qmin, asym8.qmax) == (0, 255)
    sym2 = UniformQuantizer(bits=2, symmetric=True, granularity="tensor")
    assert (sym2.qmin, sym2.qmax) == (-2, 1)
    assert UniformQuantizer(bits=4.0, symmetric=True, granularity="tensor").bits == 4


@pytest.mark.parametrize("bits", [1, 9, 1.5, 3.3, 16])
def test_invalid_bits_rejected(bits: float) -> None:
    with pytest.raises(ValueError, match="1.58"):
        UniformQuantizer(bits=bits, symmetric=True, granularity="tensor")


def test_invalid_options_rejected() -> None:
    with pytest.raises(ValueError, match="narrow_range"):
        UniformQuantizer(bits=4, symmetric=False, granularity="tensor", narrow_range=True)
    with pytest.raises(ValueError, match="granularity"):
        UniformQuantizer(bits=4, symmetric=True, granularity="row")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init"):
        UniformQuantizer(bits=4, symmetric=True, granularity="tensor", init="kl")  # type: ignore[arg-type]


def test_extra_repr_is_readable() -> None:
    r = repr(UniformQuantizer(bits=4, symmetric=True, granularity="channel", ch_axis=1))
    assert "bits=4" in r and "granularity=channel" in r and "ch_axis=1" in r and "range=[-8, 7]" in r


# ---------------------------------------------------------------- exact values


def test_sym4_per_tensor_minmax_exact() -> None:
    q = sym4().init_from_tensor(t(-3.5, -1.0, 0.0, 0.6, 1.75, 3.0))
    # amax 3.5, s = amax / qmax = 3.5 / 7 = 0.5
    assert q.scale.shape == torch.Size([])
    assert q.scale.item() == 0.5
    # x/s = [-7, -2, 0, 1.2, 3.5, 6] -> round half to even [-7, -2, 0, 1, 4, 6]
    assert torch.equal(q(t(-3.5, -1.0, 0.0, 0.6, 1.75, 3.0)), t(-3.5, -1.0, 0.0, 0.5, 2.0, 3.0))
    # out of range: 10 -> 7, -10 -> -8 (the extra negative level), -8.4 -> -8
    assert torch.equal(q(t(5.0, -5.0, -4.2)), t(3.5, -4.0, -4.0))


def test_narrow_range_clips_to_minus_qmax() -> None:
    q = sym4(narrow_range=True).init_from_tensor(t(-3.5, 3.5))
    assert q.scale.item() == 0.5
    assert torch.equal(q(t(-4.2, -5.0, 5.0)), t(-3.5, -3.5, 3.5))


def test_asym8_per_tensor_exact_and_clipping() -> None:
    q = UniformQuantizer(bits=8, symmetric=False, granularity="tensor")
    # range [-1, 2.984375]: s = 3.984375 / 255 = 1/64, z = 0 - round(-1 / (1/64)) = 64
    q.init_from_tensor(t(-1.0, 0.0, 2.984375))
    assert q.scale.item() == 1 / 64
    assert q.zero_point.item() == 64.0
    x = t(-1.0, 0.0, 0.5, 2.984375, 0.01)
    # codes [0, 64, 96, 255, 65]  (0.01 * 64 = 0.64 -> 1)
    assert torch.equal(q.integer(x), torch.tensor([0, 64, 96, 255, 65], dtype=torch.uint8))
    assert torch.equal(q(x), t(-1.0, 0.0, 0.5, 2.984375, 1 / 64))
    # clipping: 3.5 -> 224 + 64 -> 255 -> 191/64 ; -2.0 -> -128 + 64 -> 0 -> -1.0
    assert torch.equal(q(t(3.5, -2.0)), t(2.984375, -1.0))


def test_asym_range_always_contains_zero() -> None:
    q = UniformQuantizer(bits=8, symmetric=False, granularity="tensor").init_from_tensor(t(0.5, 1.0))
    assert q.zero_point.item() == 0.0
    assert torch.equal(q.scale.detach(), torch.tensor(1.0) / 255)
    assert q(t(0.0)).item() == 0.0


def test_per_channel_weights_each_row_own_scale() -> None:
    w = torch.tensor([[1.0, -0.6, 0.25, 0.0], [-7.0, 3.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q = sym4(granularity="channel", ch_axis=0).init_from_tensor(w)
    s = q.scale.detach()
    assert s.shape == (3,)
    assert torch.equal(s[:2], torch.tensor([1.0, 7.0]) / 7)  # row amax / qmax
    assert 0 < s[2].item() < 1e-6  # zero row: tiny positive scale
    out = q(w)
    # row 0: x/s = [7, -4.2, 1.75, 0] -> [7, -4, 2, 0]; row 1: s = 1 -> [-7, 4, 1, 0] (3.5 rounds to 4)
    assert torch.equal(out[0], torch.tensor([7.0, -4.0, 2.0, 0.0]) * s[0])
    assert torch.equal(out[1], t(-7.0, 4.0, 1.0, 0.0))
    assert torch.equal(out[2], torch.zeros(4))
    assert not torch.isnan(out).any()


def test_per_channel_negative_axis() -> None:
    w = torch.tensor([[1.0, -14.0], [-3.5, 2.0]])
    q = sym4(granularity="channel", ch_axis=-1).init_from_tensor(w)
    assert torch.equal(q.scale.detach(), t(0.5, 2.0))  # column amax 3.5, 14 over 7
    assert torch.equal(q(w), torch.tensor([[1.0, -14.0], [-3.5, 2.0]]))
    with pytest.raises(RuntimeError, match="channels"):
        q(torch.zeros(2, 3))


def test_ternary_levels_and_range() -> None:
    q = UniformQuantizer(bits=1.58, symmetric=True, granularity="tensor")
    assert q.is_ternary and (q.qmin, q.qmax) == (-1, 1)
    q.init_from_tensor(t(-2.0, -0.9, 0.0, 0.4, 1.1, 2.0))
    assert q.scale.item() == 2.0
    # x/s = [-1, -0.45, 0, 0.2, 0.55, 1]
    assert torch.equal(q(t(-2.0, -0.9, 0.0, 0.4, 1.1, 2.0)), t(-2.0, 0.0, 0.0, 0.0, 2.0, 2.0))
    out = q(torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3)
    assert set(out.unique().tolist()) == {-2.0, 0.0, 2.0}
    assert q.code_dtype == torch.int8


def test_asymmetric_ternary_raises() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        UniformQuantizer(bits=1.58, symmetric=False, granularity="tensor")


def test_per_token_dynamic_symmetric() -> None:
    q = sym4(granularity="token").init_from_tensor(torch.randn(4, 4))
    assert q.clip_ratio.item() == 1.0
    x = torch.tensor([[[0.7, -3.5, 1.2, 0.1], [14.0, 1.0, -3.0, 5.0]]])
    out = q(x)
    # row 0: s = 3.5/7 = 0.5, x/s = [1.4, -7, 2.4, 0.2] -> [1, -7, 2, 0]
    assert torch.equal(out[0, 0], t(0.5, -3.5, 1.0, 0.0))
    # row 1: s = 14/7 = 2, x/s = [7, 0.5, -1.5, 2.5] -> [7, 0, -2, 2]
    assert torch.equal(out[0, 1], t(14.0, 0.0, -4.0, 4.0))
    assert torch.equal(q(torch.zeros(2, 4)), torch.zeros(2, 4))


def test_per_token_dynamic_asymmetric() -> None:
    q = UniformQuantizer(bits=4, symmetric=False, granularity="token").init_from_tensor(torch.randn(3, 4))
    x = torch.tensor([[-1.0, 0.0, 2.75, 1.3], [0.0, 15.0, 7.4, 3.0]])
    out = q(x)
    # row 0: s = 3.75/15 = 0.25, z = 4; codes [0, 4, 15, 9] -> [-1, 0, 2.75, 1.25]
    assert torch.equal(out[0], t(-1.0, 0.0, 2.75, 1.25))
    # row 1: s = 1, z = 0 -> plain rounding
    assert torch.equal(out[1], t(0.0, 15.0, 7.0, 3.0))


def test_used_before_calibration_raises_and_disabled_is_identity() -> None:
    for gran in ("tensor", "channel", "token"):
        q = sym4(granularity=gran)
        with pytest.raises(RuntimeError, match="before calibration"):
            q(torch.ones(2, 2))
        q.enabled = False
        x = torch.randn(2, 2)
        assert q(x) is x


def test_zero_range_gives_tiny_positive_scale() -> None:
    for sym in (True, False):
        q = UniformQuantizer(bits=8, symmetric=sym, granularity="tensor").init_from_tensor(torch.zeros(5))
        assert 0 < q.scale.item() < 1e-6
        out = q(torch.zeros(5))
        assert torch.equal(out, torch.zeros(5))


def test_negative_learned_scale_is_clamped_positive() -> None:
    q = sym4().init_from_tensor(t(-1.0, 1.0))
    with torch.no_grad():
        q.scale.fill_(-1.0)
    assert torch.isfinite(q(t(0.0, 1e-9, -1e-9))).all()
    assert q.scale_tensor().item() > 0


# ---------------------------------------------------------------- gradients


def test_ste_gradient_for_x_inside_and_outside_range() -> None:
    q = sym4().init_from_tensor(t(-3.5, 3.5))  # s = 0.5, codes in [-8, 7]
    x = t(0.3, 1.2, -3.4, 5.0, -6.0).requires_grad_()
    q(x).sum().backward()
    # x/s = [0.6, 2.4, -6.8, 10, -12]: the last two are clipped
    assert torch.equal(x.grad, t(1.0, 1.0, 1.0, 0.0, 0.0))


def test_scale_gradient_includes_lsq_factor() -> None:
    q = sym4().init_from_tensor(t(-3.5, 3.5))  # s = 0.5
    x = t(0.3, 1.2, -3.4, 5.0, -6.0)
    q(x).sum().backward()
    # d out/ds: inside round(v) - v, clipped qmax / qmin:
    #   v = [0.6, 2.4, -6.8, 10, -12] -> [0.4, -0.4, -0.2, 7, -8], sum = -1.2
    # LSQ: g = 1/sqrt(numel * qmax) = 1/sqrt(5 * 7)
    expected = -1.2 / math.sqrt(35)
    assert q.scale.grad is not None
    assert q.scale.grad.item() == pytest.approx(expected, rel=1e-5)


def test_asymmetric_gradients_scale_and_zero_point() -> None:
    q = UniformQuantizer(bits=4, symmetric=False, granularity="tensor").init_from_tensor(t(-1.0, 2.75))
    assert (q.scale.item(), q.zero_point.item()) == (0.25, 4.0)
    x = t(0.5, 5.0, -2.0).requires_grad_()
    q(x).sum().backward()
    # v + z = [2+4, 20+4 -> 15, -8+4 -> 0]: only the first is inside
    assert torch.equal(x.grad, t(1.0, 0.0, 0.0))
    # d/dz: 0 inside, -s when clipped -> -0.5
    assert q.zero_point.grad.item() == pytest.approx(-0.5, rel=1e-6)
    # d/ds: round(v) - v = 0, (qmax - z) = 11, (qmin - z) = -4 -> 7, times g = 1/sqrt(3 * 15)
    assert q.scale.grad.item() == pytest.approx(7 / math.sqrt(45), rel=1e-5)


def test_channel_scale_gradient_uses_per_channel_count() -> None:
    q = sym4(granularity="channel").init_from_tensor(torch.tensor([[3.5, 0.0], [7.0, 0.0]]))  # s = [0.5, 1]
    x = torch.tensor([[0.3, 5.0], [1.2, -3.0]])
    q(x).sum().backward()
    # row 0: v = [0.6, 10 -> 7] -> 0.4 + 7; row 1: v = [1.2, -3] -> -0.2 + 0; g = 1/sqrt(2 * 7)
    assert torch.allclose(q.scale.grad, t(7.4, -0.2) / math.sqrt(14), rtol=1e-5)


def test_token_clip_ratio_gets_gradient_and_not_learnable_has_none() -> None:
    q = sym4(granularity="token").init_from_tensor(torch.randn(3, 8))
    q(torch.randn(3, 8)).pow(2).sum().backward()
    assert q.clip_ratio.grad is not None and torch.isfinite(q.clip_ratio.grad).all()
    assert q.clip_ratio.grad.item() != 0.0
    frozen = sym4(learnable=False).init_from_tensor(t(-1.0, 1.0))
    assert not frozen.scale.requires_grad


# ---------------------------------------------------------------- init methods


def _heavy_tailed(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g) - 0.5
    x = -torch.sign(u) * torch.log1p(-2 * u.abs())  # Laplace(0, 1)
    x[0] = 60.0  # outlier
    return x


def _mse(q: UniformQuantizer, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((q(x) - x).pow(2).mean())


def test_mse_init_beats_minmax_on_heavy_tailed_data() -> None:
    x = _heavy_tailed()
    mm = sym4().init_from_tensor(x)
    ms = sym4(init="mse").init_from_tensor(x)
    assert ms.scale.item() < mm.scale.item()
    assert _mse(ms, x) < 0.5 * _mse(mm, x)


def test_mse_init_per_channel_never_worse_than_minmax() -> None:
    w = torch.stack([_heavy_tailed(2000, seed=s) for s in range(4)])
    w[:, 0] = 20.0
    w[2] = torch.linspace(-1, 1, 2000)  # uniform row: clipping does not pay much
    mm = sym4(granularity="channel").init_from_tensor(w)
    ms = sym4(granularity="channel", init="mse").init_from_tensor(w)
    with torch.no_grad():
        err_mm = (mm(w) - w).pow(2).mean(1)
        err_ms = (ms(w) - w).pow(2).mean(1)
    assert (err_ms <= err_mm).all()
    assert (err_ms[[0, 1, 3]] < 0.5 * err_mm[[0, 1, 3]]).all()


def test_mse_init_asymmetric_beats_minmax() -> None:
    x = _heavy_tailed().abs()
    mm = UniformQuantizer(bits=4, symmetric=False, granularity="tensor").init_from_tensor(x)
    ms = UniformQuantizer(bits=4, symmetric=False, granularity="tensor", init="mse").init_from_tensor(x)
    assert _mse(ms, x) < 0.5 * _mse(mm, x)


def test_percentile_clips_outlier() -> None:
    x = torch.linspace(-1, 1, 10_001)
    x[0] = 100.0
    q = sym4(init="percentile", percentile=99.9).init_from_tensor(x)
    assert q.scale.item() < 1.1 / 7  # minmax would give 100 / 7
    assert torch.equal(q(t(100.0)), 7 * q.scale_tensor().reshape(1))  # outlier clipped to qmax * s
    qa = UniformQuantizer(bits=8, symmetric=False, granularity="tensor", init="percentile", percentile=99.9)
    qa.init_from_tensor(x)
    assert qa.scale.item() < 2.1 / 255


def test_percentile_per_channel() -> None:
    w = torch.stack([torch.linspace(-1, 1, 1001), torch.linspace(-4, 4, 1001)])
    w[0, 0] = 50.0
    q = sym4(granularity="channel", init="percentile", percentile=99.5).init_from_tensor(w)
    s = q.scale.detach()
    assert s[0].item() < 1.1 / 7 and 3.9 / 7 < s[1].item() <= 4 / 7


def test_token_mse_and_percentile_search_clip_ratio() -> None:
    rows = torch.stack([_heavy_tailed(256, seed=s) for s in range(64)])
    rows[:, 0] = 10.0  # a moderate outlier in every token (Laplace tails already make minmax wasteful)
    ms = sym4(granularity="token", init="mse").init_from_tensor(rows)
    mm = sym4(granularity="token").init_from_tensor(rows)
    assert ms.clip_ratio.item() < 1.0
    assert _mse(ms, rows) < _mse(mm, rows)
    pc = sym4(granularity="token", init="percentile", percentile=90.0).init_from_tensor(rows)
    assert 0 < pc.clip_ratio.item() < 1.0


# ---------------------------------------------------------------- observation


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_observe_is_identity_and_minmax_matches_init_from_tensor(granularity: str, symmetric: bool) -> None:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 6, generator=g) * (i + 1) for i in range(3)]
    q = UniformQuantizer(bits=4, symmetric=symmetric, granularity=granularity, ch_axis=1)  # type: ignore[arg-type]
    q.observe(True)
    for b in batches:
        out = q(b)
        assert out is b
    q.observe(False).init_from_observed()
    ref = UniformQuantizer(bits=4, symmetric=symmetric, granularity=granularity, ch_axis=1)  # type: ignore[arg-type]
    ref.init_from_tensor(torch.cat(batches))
    assert torch.equal(q.scale, ref.scale) and torch.equal(q.zero_point, ref.zero_point)
    assert torch.equal(q(batches[0]), ref(batches[0]))


def test_observed_percentile_matches_init_from_tensor_when_all_values_fit() -> None:
    x = _heavy_tailed(3000)
    q = sym4(init="percentile", percentile=99.0).observe(True)
    q(x[:1000]), q(x[1000:])
    q.observe(False).init_from_observed()
    ref = sym4(init="percentile", percentile=99.0).init_from_tensor(x)
    assert torch.equal(q.scale, ref.scale)


def test_observation_subsample_is_bounded() -> None:
    q = sym4(init="mse", max_samples=500).observe(True)
    for _ in range(5):
        q(torch.randn(4, 300))
    assert q.observed_samples is not None and q.observed_samples.numel() <= 500
    qc = sym4(granularity="channel", ch_axis=-1, init="mse", max_samples=500).observe(True)
    for _ in range(5):
        qc(torch.randn(4, 30, 10))
    assert qc.observed_samples is not None and qc.observed_samples.numel() <= 500 and qc.observed_samples.shape[0] == 10
    qt = sym4(granularity="token", init="mse", max_samples=500).observe(True)
    for _ in range(5):
        qt(torch.randn(4, 30, 10))
    assert qt.observed_samples is not None and qt.observed_samples.numel() <= 500 and qt.observed_samples.shape[1] == 10
    for quant in (q, qc, qt):
        quant.observe(False).init_from_observed()
        assert quant.is_initialized


def test_init_from_observed_without_data_raises() -> None:
    q = sym4().observe(True)
    with pytest.raises(RuntimeError, match="observe\\(False\\)"):
        q.init_from_observed()
    q.observe(False)
    with pytest.raises(RuntimeError, match="nothing was observed"):
        q.init_from_observed()


# ---------------------------------------------------------------- state, export, materialization


@pytest.mark.parametrize(
    "kw",
    [
        dict(bits=4, symmetric=True, granularity="channel", ch_axis=0),
        dict(bits=8, symmetric=False, granularity="channel", ch_axis=1),
        dict(bits=6, symmetric=False, granularity="tensor"),
        dict(bits=4, symmetric=True, granularity="token", init="mse"),
    ],
)
def test_state_dict_round_trip_into_fresh_quantizer(kw: dict) -> None:
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    q = UniformQuantizer(**kw).init_from_tensor(x)
    with torch.no_grad():  # move away from the init values, as training would
        for p in q.parameters():
            p.mul_(0.9).add_(0.01)
    fresh = UniformQuantizer(**kw)
    with pytest.raises(RuntimeError):
        fresh(x)
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_initialized and fresh.initialized.item()
    assert torch.equal(fresh(x), q(x))
    assert {n for n, _ in fresh.named_parameters()} == {n for n, _ in q.named_parameters()}
    assert all(p.requires_grad for p in fresh.parameters())


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.wq = UniformQuantizer(bits=4, symmetric=True, granularity="channel", ch_axis=0, init="mse")
        self.aq = UniformQuantizer(bits=8, symmetric=False, granularity="tensor")
        self.tq = UniformQuantizer(bits=4, symmetric=False, granularity="token")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.aq(x), self.wq(self.lin.weight), self.lin.bias)
        return self.tq(y)


def test_torch_export_matches_eager() -> None:
    torch.manual_seed(0)
    m = _Toy()
    x = torch.randn(2, 5, 8)
    m.wq.init_from_tensor(m.lin.weight)
    m.aq.observe(True)
    m.tq.observe(True)
    m(x)
    m.aq.observe(False).init_from_observed()
    m.tq.observe(False).init_from_observed()
    ep = torch.export.export(m, (x,))
    x2 = torch.randn(2, 5, 8) * 1.5
    assert torch.equal(ep.module()(x2), m(x2))
    # dynamic batch/sequence: the LSQ factor must not specialize the input's numel
    dims = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
    ep_dyn = torch.export.export(m, (x,), dynamic_shapes=dims)
    x3 = torch.randn(3, 7, 8)
    assert torch.equal(ep_dyn.module()(x3), m(x3))


@pytest.mark.parametrize(
    "kw,dtype",
    [
        (dict(bits=4, symmetric=True, granularity="channel", ch_axis=1), torch.int8),
        (dict(bits=8, symmetric=True, granularity="tensor", narrow_range=True), torch.int8),
        (dict(bits=8, symmetric=False, granularity="tensor"), torch.uint8),
        (dict(bits=3, symmetric=False, granularity="channel", ch_axis=0), torch.int8),
        (dict(bits=1.58, symmetric=True, granularity="channel", ch_axis=0), torch.int8),
    ],
)
def test_integer_dequantize_round_trip_is_exact(kw: dict, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    q = UniformQuantizer(**kw).init_from_tensor(torch.randn(6, 10, generator=g))
    x = torch.randn(6, 10, generator=g) * 2  # includes values outside the initialized range
    codes = q.integer(x)
    assert codes.dtype == dtype == q.code_dtype
    assert int(codes.min()) >= q.qmin and int(codes.max()) <= q.qmax
    assert int(codes.min()) == q.qmin or int(codes.max()) == q.qmax  # something was clipped
    assert torch.equal(q.dequantize(codes), q(x))
    s, z = q.scale_tensor(2), q.zero_point_tensor(2)
    assert torch.equal((codes.float() - z) * s, q(x))


def test_integer_rejects_token_granularity() -> None:
    q = sym4(granularity="token").init_from_tensor(torch.randn(2, 4))
    with pytest.raises(ValueError, match="token"):
        q.integer(torch.randn(2, 4))


def test_a_new_observation_samples_the_same_whatever_was_observed_before():
    g = torch.Generator().manual_seed(0)
    first, second = torch.randn(50_000, generator=g), torch.randn(40_000, generator=g)
    fresh = UniformQuantizer(bits=4, symmetric=False, granularity="tensor", init="mse", max_samples=1000)
    used = UniformQuantizer(bits=4, symmetric=False, granularity="tensor", init="mse", max_samples=1000)
    used.observe(True)
    used(first)  # an earlier observation (e.g. a search) draws from the sampler
    used.observe(False)
    for q in (fresh, used):
        q.observe(True)
        q(second)
        q.observe(False)
        q.init_from_observed()
    assert torch.equal(fresh.scale, used.scale) and torch.equal(fresh.zero_point, used.zero_point)


def test_set_bits_and_qparams_round_trip():
    w = torch.randn(8, 16)
    q = UniformQuantizer(bits=4, symmetric=True, granularity="channel").init_from_tensor(w)
    at4 = q.qparams()
    q.set_bits(8).init_from_tensor(w)
    assert not torch.equal(q.scale, at4["scale"])
    q.set_bits(4).load_qparams(at4)
    assert torch.equal(q(w), UniformQuantizer(bits=4, symmetric=True, granularity="channel").init_from_tensor(w)(w))
    with pytest.raises(ValueError, match="symmetric only"):
        UniformQuantizer(bits=4, symmetric=False, granularity="tensor").set_bits(1.58)
