"""A differentiable uniform fake-quantizer for weights and activations.

:class:`UniformQuantizer` simulates integer quantization in floating point::

    x_q = (clamp(round(x / s) + z, qmin, qmax) - z) * s

with straight-through rounding and LSQ gradient scaling (Esser et al. 2020), written with plain tensor
ops only (no ``torch.autograd.Function``) so that modules containing it can be captured by
``torch.export``.

Conventions the rest of vitqc relies on:

* **Symmetric scale**: ``s = amax / qmax`` with ``qmax = 2^(b-1) - 1``, so ``+amax`` is exactly
  representable and nothing on the positive side is clipped; the extra negative level ``-2^(b-1)`` (full
  range) is simply unused by minmax init. Ternary (``bits=1.58``) has levels ``{-1, 0, +1} * s`` and
  ``s = amax``.
* **Asymmetric range always contains 0** (``lo = min(min, 0)``, ``hi = max(max, 0)``) so that 0 is exact and
  the zero point lies in ``[qmin, qmax]``: ``s = (hi - lo) / (qmax - qmin)``, ``z = qmin - round(lo / s)``.
* **Integer codes** (:meth:`UniformQuantizer.integer`) are ``int8`` when ``[qmin, qmax]`` fits in int8
  (every symmetric/ternary config, asymmetric up to 7 bits), ``uint8`` when it fits in ``[0, 255]``
  (asymmetric 8 bit), otherwise ``int16``.
* **Granularity** ``"tensor"``: one scale; ``"channel"``: one scale per index of ``ch_axis``;
  ``"token"``: dynamic, one scale per row of the last dimension computed at run time from that row's
  min/max times a learnable per-tensor ``clip_ratio``.
* **Percentile init** is per group: per tensor for ``"tensor"``, per channel (on that channel's values)
  for ``"channel"``; for ``"token"`` it sets ``clip_ratio`` to the mean over observed tokens of
  ``percentile range / minmax range``.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from vitqc.quant.fused import fake_quant_static, fake_quant_token, fused_enabled
from vitqc.quant.intops import EPS as _EPS, token_qparams
from vitqc.quant.observer import Observer, as_units
from vitqc.quant.ranges import mse_range, percentile_range, qparams_for_range, token_clip_ratio

__all__ = ["UniformQuantizer", "round_ste", "grad_scale", "TERNARY_BITS", "VALID_BITS"]

TERNARY_BITS = 1.58
VALID_BITS: tuple[float, ...] = (TERNARY_BITS, 2, 3, 4, 5, 6, 7, 8)

Granularity = Literal["tensor", "channel", "token"]
InitMethod = Literal["minmax", "percentile", "mse"]


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (half to even) with a straight-through gradient of 1.

    The value is exactly ``x.round()``: ``round(x) - x`` is exact in floating point (the operands are within
    a factor 2 of each other, or one is 0) and adding ``x`` back gives a representable integer. Without
    autograd (evaluation) the plain round is used: the same values, two fewer passes over the tensor.
    """
    if not torch.is_grad_enabled():
        return x.round()
    return (x.round() - x).detach() + x


def grad_scale(x: Tensor, g: float) -> Tensor:
    """Identity in value (bit-exact), multiplies the gradient by ``g``.

    Written as ``x.detach() + (x*g - (x*g).detach())`` rather than ``(x - x*g).detach() + x*g`` because the
    latter can differ from ``x`` by one ulp, which would break ``dequantize(integer(x)) == forward(x)``.
    """
    if not torch.is_grad_enabled():
        return x
    xg = x * g
    return x.detach() + (xg - xg.detach())


class UniformQuantizer(nn.Module):
    """Uniform fake-quantizer with learnable step (LSQ) and, if asymmetric, learnable zero point.

    Life cycle: construct, then either ``init_from_tensor(w)`` (weights) or ``observe(True)``, run
    calibration batches, ``observe(False)``, ``init_from_observed()`` (activations). Using it before
    that raises ``RuntimeError``. ``enabled = False`` makes forward the identity.

    Parameters/buffers (state_dict keys): ``scale`` (Parameter, shape ``[]`` for tensor and ``[C]`` for
    channel granularity), ``zero_point`` (Parameter for asymmetric, zero buffer for symmetric, same shape
    as ``scale``), ``clip_ratio`` (Parameter ``[]``, token granularity only, instead of scale/zero_point)
    and ``initialized`` (bool buffer). Initialization may *replace* ``scale``/``zero_point`` by new
    Parameter objects of the right shape, so build optimizers after calibration.
    """

    def __init__(
        self,
        *,
        bits: float,
        symmetric: bool,
        granularity: Granularity,
        ch_axis: int = 0,
        init: InitMethod = "minmax",
        percentile: float = 99.99,
        learnable: bool = True,
        narrow_range: bool = False,
        max_samples: int = 100_000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.bits: float = self._validate_bits(bits)
        if self.is_ternary and not symmetric:
            raise ValueError("ternary quantization (bits=1.58) is symmetric only: pass symmetric=True")
        if narrow_range and not symmetric:
            raise ValueError("narrow_range applies to symmetric quantization only")
        if granularity not in ("tensor", "channel", "token"):
            raise ValueError(f"granularity must be 'tensor', 'channel' or 'token', got {granularity!r}")
        if init not in ("minmax", "percentile", "mse"):
            raise ValueError(f"init must be 'minmax', 'percentile' or 'mse', got {init!r}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if max_samples < 1:
            raise ValueError(f"max_samples must be positive, got {max_samples}")
        self.symmetric = bool(symmetric)
        self.granularity: Granularity = granularity
        self.ch_axis = int(ch_axis)
        self.init_method: InitMethod = init
        self.percentile = float(percentile)
        self.learnable = bool(learnable)
        self.narrow_range = bool(narrow_range)
        self.max_samples = int(max_samples)
        self.enabled = True

        if granularity == "token":
            self.clip_ratio = nn.Parameter(torch.ones(()), requires_grad=self.learnable)
        else:
            shape = () if granularity == "tensor" else (1,)  # channel: resized to [C] at initialization
            self.scale = nn.Parameter(torch.ones(shape), requires_grad=self.learnable)
            if self.symmetric:
                self.register_buffer("zero_point", torch.zeros(shape))
            else:
                self.zero_point = nn.Parameter(torch.zeros(shape), requires_grad=self.learnable)
        self.register_buffer("initialized", torch.tensor(False))
        # Python mirror of `initialized`: forward must not branch on a tensor (torch.export).
        self._is_init = False

        # Observer state: a plain attribute, deliberately not in state_dict.
        self._observing = False
        self._observer = Observer(granularity, self.ch_axis, self.max_samples, int(seed))

    # ------------------------------------------------------------------ integer range

    @staticmethod
    def _validate_bits(bits: float) -> float:
        for v in VALID_BITS:
            if float(bits) == float(v):
                return v
        raise ValueError(f"bits must be one of {', '.join(str(b) for b in VALID_BITS)} (1.58 = ternary), got {bits}")

    @property
    def is_ternary(self) -> bool:
        return self.bits == TERNARY_BITS

    @property
    def qmin(self) -> int:
        if self.is_ternary:
            return -1
        b = int(self.bits)
        if not self.symmetric:
            return 0
        return -(2 ** (b - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        if self.is_ternary:
            return 1
        b = int(self.bits)
        return 2 ** (b - 1) - 1 if self.symmetric else 2**b - 1

    @property
    def is_initialized(self) -> bool:
        return self._is_init

    def extra_repr(self) -> str:
        parts = [
            f"bits={self.bits}", f"symmetric={self.symmetric}", f"granularity={self.granularity}",
        ]
        if self.granularity == "channel":
            parts.append(f"ch_axis={self.ch_axis}")
        parts += [f"range=[{self.qmin}, {self.qmax}]", f"init={self.init_method}"]
        if self.init_method == "percentile":
            parts.append(f"percentile={self.percentile}")
        parts += [f"learnable={self.learnable}", f"initialized={self._is_init}"]
        if not self.enabled:
            parts.append("enabled=False")
        return ", ".join(parts)

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self._observing:
            self._observer.record(x)
            return x
        if not self._is_init:
            raise RuntimeError(
                "quantizer used before calibration: call init_from_tensor(w), or observe(True) + calibration "
                "batches + observe(False) + init_from_observed() first"
            )
        qmin, qmax = self.qmin, self.qmax
        if self.granularity == "token":
            return self._forward_token(x, qmin, qmax)

        if x.numel() == 0:
            return x
        n_groups = 1 if self.granularity == "tensor" else self.scale.numel()
        # LSQ gradient scale; `** -0.5` (not math.sqrt) keeps a symbolic numel symbolic under torch.export.
        lsq = (x.numel() // n_groups * qmax) ** -0.5
        if self._use_fused(x):
            zp = None if self.symmetric else self._broadcast(self.zero_point, x)
            return fake_quant_static(x, self._broadcast(self.scale, x), zp, qmin, qmax, _EPS, lsq)
        s = grad_scale(self.scale.clamp_min(_EPS), lsq)
        s = self._broadcast(s, x)
        v = round_ste(x / s)
        if self.symmetric:
            out = torch.clamp(v, qmin, qmax) * s
        else:
            z = self._broadcast(torch.clamp(round_ste(self.zero_point), qmin, qmax), x)
            out = (torch.clamp(v + z, qmin, qmax) - z) * s
        return out.to(x.dtype)

    def _forward_token(self, x: Tensor, qmin: int, qmax: int) -> Tensor:
        # The per-token range is a statistic of the input: detached, so x gets the plain clipped STE gradient
        # and the learnable part is only clip_ratio (LSQ-scaled over the whole tensor).
        xd = x.detach()
        if x.numel() == 0:
            return x
        lsq = (x.numel() * qmax) ** -0.5
        if self._use_fused(x):
            return fake_quant_token(x, self.clip_ratio, qmin, qmax, self.symmetric, _EPS, lsq)
        r = grad_scale(self.clip_ratio.clamp_min(_EPS), lsq)
        # z = qmin - round(r*lo/s) does not depend on r (it cancels) and round() passes no gradient
        _, s, z = token_qparams(xd, r, qmin, qmax, self.symmetric)
        if z is None:
            out = torch.clamp(round_ste(x / s), qmin, qmax) * s
        else:
            out = (torch.clamp(round_ste(x / s) + z, qmin, qmax) - z) * s
        return out.to(x.dtype)

    def _use_fused(self, x: Tensor) -> bool:
        """The fused autograd path (vitqc.quant.fused) serves eager training only: it is taken when a gradient
        is wanted, and never while torch.compile / torch.export trace (they capture the plain ops above)."""
        if not (fused_enabled() and torch.is_grad_enabled()) or type(x) not in (Tensor, nn.Parameter):
            return False
        if torch.compiler.is_compiling():
            return False
        # (its own parameters straight from the dict: parameters() walks named_modules, per call, per quantizer)
        return x.requires_grad or any(p is not None and p.requires_grad for p in self._parameters.values())

    def _channel_shape(self, ndim: int) -> list[int]:
        axis = self.ch_axis if self.ch_axis >= 0 else self.ch_axis + ndim
        if not 0 <= axis < ndim:
            raise ValueError(f"ch_axis={self.ch_axis} is out of range for a {ndim}-d tensor")
        shape = [1] * ndim
        shape[axis] = -1
        return shape

    def _broadcast(self, t: Tensor, x: Tensor) -> Tensor:
        if self.granularity == "tensor":
            return t
        c = t.numel()
        axis = self.ch_axis if self.ch_axis >= 0 else self.ch_axis + x.dim()
        if not 0 <= axis < x.dim() or x.shape[axis] != c:
            raise RuntimeError(
                f"per-channel quantizer has {c} channels on axis {self.ch_axis} but got input of shape "
                f"{tuple(x.shape)}"
            )
        return t.reshape(self._channel_shape(x.dim()))

    # ------------------------------------------------------------------ materialization helpers

    def _check_static(self, what: str) -> None:
        if self.granularity == "token":
            raise ValueError(f"{what} is only defined for tensor/channel granularity (token scales are dynamic)")
        if not self._is_init:
            raise RuntimeError(f"quantizer used before calibration: {what} needs an initialized quantizer")

    def scale_tensor(self, ndim: int | None = None) -> Tensor:
        """The scale used in forward (clamped positive, detached): ``[]`` for tensor granularity; for channel
        granularity ``[C]``, or broadcast-ready for an ``ndim``-d tensor when ``ndim`` is given."""
        self._check_static("scale_tensor()")
        s = self.scale.detach().clamp_min(_EPS)
        if self.granularity == "channel" and ndim is not None:
            s = s.reshape(self._channel_shape(ndim))
        return s

    def zero_point_tensor(self, ndim: int | None = None) -> Tensor:
        """The zero point used in forward (rounded, clamped to [qmin, qmax], float, detached); shaped as
        :meth:`scale_tensor`. All zeros for symmetric quantizers."""
        self._check_static("zero_point_tensor()")
        z = self.zero_point.detach()
        if not self.symmetric:
            z = torch.clamp(z.round(), self.qmin, self.qmax)
        if self.granularity == "channel" and ndim is not None:
            z = z.reshape(self._channel_shape(ndim))
        return z

    @property
    def zero_free(self) -> bool:
        """Its codes need no zero-point correction in an integer GEMM (symmetric, fits int8 unshifted)."""
        return self.symmetric and self.qmax <= 127

    def codes(self, x: Tensor, shift: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """``(codes - shift, scale, zero point)`` of an activation as the integer kernels take them
        (:func:`vitqc.quant.intops.act_codes`): the same float ops as forward, so the same codes."""
        from vitqc.quant.intops import act_codes

        if not self._is_init:
            raise RuntimeError("quantizer used before calibration: codes() needs an initialized quantizer")
        if self.granularity == "token":
            return act_codes(x, granularity="token", qmin=self.qmin, qmax=self.qmax, symmetric=self.symmetric,
                             clip_ratio=self.clip_ratio.detach(), shift=shift)
        if self.granularity != "tensor":
            raise ValueError("codes() is defined for tensor and token granularity (one scale per row at most)")
        return act_codes(x, granularity="tensor", qmin=self.qmin, qmax=self.qmax, symmetric=self.symmetric,
                         scale=self.scale_tensor(), zero_point=self.zero_point_tensor(), shift=shift)

    @property
    def code_dtype(self) -> torch.dtype:
        """Dtype of :meth:`integer` codes: int8 if [qmin, qmax] fits, else uint8 if it fits [0, 255], else int16."""
        if self.qmin >= -128 and self.qmax <= 127:
            return torch.int8
        if self.qmin >= 0 and self.qmax <= 255:
            return torch.uint8
        return torch.int16

    @torch.no_grad()
    def integer(self, x: Tensor) -> Tensor:
        """Integer codes ``clamp(round(x/s) + z, qmin, qmax)`` as :attr:`code_dtype`."""
        self._check_static("integer()")
        s = self.scale_tensor(x.dim())
        q = torch.round(x / s)
        if not self.symmetric:
            q = q + self.zero_point_tensor(x.dim())
        return torch.clamp(q, self.qmin, self.qmax).to(self.code_dtype)

    @torch.no_grad()
    def dequantize(self, codes: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``(codes - z) * s``; bit-identical to forward for the input the codes came from (float32)."""
        self._check_static("dequantize()")
        s = self.scale_tensor(codes.dim())
        q = codes.to(s.dtype)
        if not self.symmetric:
            q = q - self.zero_point_tensor(codes.dim())
        out = q * s
        return out if dtype is None else out.to(dtype)

    # ------------------------------------------------------------------ observation / calibration

    def observe(self, enabled: bool = True) -> "UniformQuantizer":
        """Enter (``True``) or leave (``False``) observing mode. While observing, forward returns its input
        unchanged and records statistics (:class:`~vitqc.quant.observer.Observer`). Entering afresh discards
        previously recorded statistics and restarts the subsample's random stream."""
        if enabled and not self._observing:
            self._observer.start()
        self._observing = bool(enabled)
        return self

    @property
    def observing(self) -> bool:
        return self._observing

    @property
    def observed_samples(self) -> Tensor | None:
        """The recorded subsample (values, channel columns or token rows), or None."""
        return self._observer.samples

    def reset_observer(self) -> None:
        """Drop recorded statistics (running min/max and the value subsample)."""
        self._observer.reset()

    def init_from_observed(self, keep_observations: bool = False) -> "UniformQuantizer":
        """Set the quantization parameters from the statistics recorded while observing, with the ``init``
        method; frees the recorded statistics unless ``keep_observations`` (to initialise again, e.g. at
        another bit width)."""
        if self._observing:
            raise RuntimeError("call observe(False) before init_from_observed()")
        obs = self._observer
        if obs.empty:
            raise RuntimeError("init_from_observed(): nothing was observed (run calibration batches in observe mode)")
        self._initialize(obs.samples, obs.lo, obs.hi)
        if not keep_observations:
            self.reset_observer()
        return self

    def set_bits(self, bits: float) -> "UniformQuantizer":
        """Change the bit width. The range parameters are left as they are: initialise again (or
        :meth:`load_qparams` ones made at this width) before use."""
        bits = self._validate_bits(bits)
        if bits == TERNARY_BITS and not self.symmetric:
            raise ValueError("ternary quantization (bits=1.58) is symmetric only")
        self.bits = bits
        return self

    def qparams(self) -> dict[str, Tensor]:
        """A detached copy of the range parameters (scale and zero point, or the token clip ratio)."""
        names = ("clip_ratio",) if self.granularity == "token" else ("scale", "zero_point")
        return {n: getattr(self, n).detach().clone() for n in names}

    def load_qparams(self, params: dict[str, Tensor]) -> "UniformQuantizer":
        """Set the range parameters from :meth:`qparams` output (the quantizer counts as initialised)."""
        for name, value in params.items():
            self._set(name, value, param=name != "zero_point" or not self.symmetric)
        self.initialized.fill_(True)
        self._is_init = True
        return self

    @torch.no_grad()
    def init_from_tensor(self, w: Tensor) -> "UniformQuantizer":
        """Set the quantization parameters directly from ``w`` (all of it, no subsampling), e.g. a weight."""
        w = w.detach().float()
        if w.numel() == 0:
            raise ValueError("init_from_tensor(): empty tensor")
        units, _ = as_units(w, self.granularity, self.ch_axis)
        if self.granularity == "channel":
            lo, hi = units.amin(1), units.amax(1)
        else:
            lo, hi = w.amin(), w.amax()
        self._initialize(units, lo, hi)
        return self

    @torch.no_grad()
    def _initialize(self, samples: Tensor, lo: Tensor, hi: Tensor) -> None:
        qmin, qmax = self.qmin, self.qmax
        if self.granularity == "token":
            ratio = token_clip_ratio(samples, self.init_method, self.percentile, qmin, qmax, self.symmetric)
            self._set("clip_ratio", torch.tensor(ratio), param=True)
        else:
            if self.init_method == "percentile":
                lo, hi = percentile_range(samples, self.percentile, self.symmetric)
            elif self.init_method == "mse":
                lo, hi = mse_range(samples, lo, hi, qmin, qmax, self.symmetric, self.granularity == "channel")
            s, z = qparams_for_range(lo, hi, qmin, qmax, self.symmetric)
            self._set("scale", s, param=True)
            self._set("zero_point", z, param=not self.symmetric)
        self.initialized.fill_(True)
        self._is_init = True

    def _set(self, name: str, value: Tensor, *, param: bool) -> None:
        """Write ``value`` into parameter/buffer ``name``: in place when the shape matches (keeps the object
        an optimizer may hold), otherwise as a new tensor of the new shape on the old device/dtype."""
        old: Tensor = getattr(self, name)
        value = value.to(device=old.device, dtype=old.dtype)
        if old.shape == value.shape:
            with torch.no_grad():
                old.copy_(value)
        elif param:
            setattr(self, name, nn.Parameter(value.clone(), requires_grad=self.learnable))
        else:
            self.register_buffer(name, value.clone())

    # ------------------------------------------------------------------ state_dict

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        # A fresh channel quantizer holds 1-element placeholders: resize them to the saved shapes first.
        for name in ("scale", "zero_point"):
            key = prefix + name
            cur = getattr(self, name, None)
            if key in state_dict and isinstance(cur, Tensor) and cur.shape != state_dict[key].shape:
                self._set(name, torch.zeros(state_dict[key].shape), param=isinstance(cur, nn.Parameter))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "initialized" in state_dict:
            self._is_init = bool(state_dict[prefix + "initialized"])
