"""Dense bit packing of low-bit integer codes (uint8 storage), with exact round trips.

Every function works along the last dimension of a tensor (a weight's input dimension K) and only uses
tensor ops that ``torch.export`` captures (shifts, masks, ``cat``), so unpacking can run inside an exported
program. Values are unsigned here: a quantized code ``c`` in ``[qmin, qmax]`` is stored as ``u = c - qmin``.

**b-bit layout** (``pack_bits``, b = 1..8). ``b`` is split into power-of-two fields, high width first
(3 = 2+1, 5 = 4+1, 6 = 4+2, 7 = 4+2+1; 1, 2, 4, 8 are one field). Field ``f`` of width ``w`` holds bits
``[o, o+w)`` of every value and is stored *planar*: with ``v = 8/w`` values per byte and the row padded to
``Kp`` (a multiple of 8 for the split widths, of ``v`` otherwise), segment length ``S = Kp / v``, byte ``j``
of the field holds the values at ``j, j+S, ..., j+(v-1)S`` (``i``-th one in bits ``[w*i, w*(i+1))``). The
fields are concatenated: ``Kp * b / 8`` bytes a row, exactly b bits a value (4-bit = two values a byte,
3-bit = 8 values in 3 bytes, ternary as 2-bit = 4 a byte). Planar rather than interleaved because
unpacking is then ``v`` contiguous shift-and-mask slices joined by one ``cat``, faster on CPU than
re-interleaving nibbles with ``stack`` (docs/findings.md, "Weight packing").

**Base-3 ternary** (``pack_trits``): trits ``t`` in {0, 1, 2} (= code + 1), five a byte
(3^5 = 243 <= 256): byte ``j = sum_i t[j + i*S] * 3^i``, ``S = ceil(K/5)``; 1.6 bits a value against 2.
Unpacking divides by 3 five times in int16 (multiply-shift, exact on 0..255).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fields", "padded_length", "packed_nbytes", "pack_bits", "unpack_bits", "pack_trits", "unpack_trits",
           "bits_per_value", "TRITS_PER_BYTE"]

TRITS_PER_BYTE = 5


def fields(bits: int) -> list[int]:
    """Field widths ``bits`` is stored as (high width first): 3 -> [2, 1], 7 -> [4, 2, 1], 8 -> [8]."""
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"pack_bits stores 1..8-bit values, got bits={bits!r}")
    return [w for w in (8, 4, 2, 1) if bits & w]


def padded_length(k: int, bits: int) -> int:
    """Row length after padding: a multiple of every field's values-per-byte."""
    per_byte = max(8 // w for w in fields(bits))
    return -(-k // per_byte) * per_byte


def packed_nbytes(k: int, bits: int | str) -> int:
    """Bytes one row of ``k`` values takes (``bits="trit5"`` for base-3 ternary)."""
    if bits == "trit5":
        return -(-k // TRITS_PER_BYTE)
    return padded_length(k, int(bits)) * int(bits) // 8


def _check_unsigned(u: Tensor, limit: int, what: str) -> None:
    if u.dtype != torch.uint8:
        raise TypeError(f"{what}: values must be uint8 (got {u.dtype}); store code - qmin")
    if u.numel() and int(u.max()) >= limit:
        raise ValueError(f"{what}: value {int(u.max())} does not fit (must be < {limit})")


def pack_bits(u: Tensor, bits: int) -> Tensor:
    """Pack uint8 values ``u`` in ``[0, 2^bits)`` along the last dim; returns uint8 ``[..., packed_nbytes]``."""
    widths = fields(bits)
    _check_unsigned(u, 1 << bits, "pack_bits")
    k = u.shape[-1]
    kp = padded_length(k, bits)
    if kp != k:
        u = torch.cat([u, u.new_zeros(*u.shape[:-1], kp - k)], -1)
    out, offset = [], 0
    for w in widths:
        f = (u >> offset) & ((1 << w) - 1)
        v, s = 8 // w, kp // (8 // w)
        byte = f[..., :s].clone()
        for i in range(1, v):
            byte |= f[..., i * s:(i + 1) * s] << (w * i)
        out.append(byte)
        offset += w
    return torch.cat(out, -1).contiguous()


def unpack_bits(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., k]``.

    A field of width ``w`` is ``v = 8/w`` contiguous shift-and-mask slices joined by one ``cat`` (the planar
    order); measured faster on CPU than one broadcast shift ``bytes[..., None, :] >> shifts[:, None]``.
    """
    widths = fields(bits)
    kp = padded_length(k, bits)
    if packed.shape[-1] != kp * bits // 8:
        raise ValueError(f"unpack_bits: expected {kp * bits // 8} bytes a row for k={k}, bits={bits}, "
                         f"got {packed.shape[-1]}")
    u: Tensor | None = None
    start, offset = 0, 0
    for w in widths:
        v, s = 8 // w, kp // (8 // w)
        p = packed[..., start:start + s]
        if w == 8:
            f = p
        else:
            mask = (1 << w) - 1
            f = torch.cat([p & mask] + [(p >> (w * i)) & mask for i in range(1, v - 1)] + [p >> (w * (v - 1))], -1)
        part = f if offset == 0 else f << offset
        u = part if u is None else u | part
        start += s
        offset += w
    assert u is not None
    return u if kp == k else u[..., :k]


def pack_trits(t: Tensor) -> Tensor:
    """Pack trits (uint8 in {0, 1, 2}) five a byte along the last dim: uint8 ``[..., ceil(K/5)]``."""
    _check_unsigned(t, 3, "pack_trits")
    k = t.shape[-1]
    s = -(-k // TRITS_PER_BYTE)
    kp = s * TRITS_PER_BYTE
    if kp != k:
        t = torch.cat([t, t.new_zeros(*t.shape[:-1], kp - k)], -1)
    byte = t[..., :s].clone()
    for i in range(1, TRITS_PER_BYTE):
        byte += t[..., i * s:(i + 1) * s] * (3 ** i)
    return byte.contiguous()


def unpack_trits(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_trits`: uint8 ``[..., k]`` in {0, 1, 2}.

    Digits by repeated division by 3 in int16 with ``q // 3 == ((q + 1) * 85) >> 8`` (exact for 0 <= q <= 255,
    checked in the tests): faster on CPU than float division or a lookup table (docs/findings.md).
    """
    s = -(-k // TRITS_PER_BYTE)
    if packed.shape[-1] != s:
        raise ValueError(f"unpack_trits: expected {s} bytes a row for k={k}, got {packed.shape[-1]}")
    q = packed.to(torch.int16)
    digits = []
    for _ in range(TRITS_PER_BYTE):
        nq = ((q + 1) * 85) >> 8
        digits.append(q - nq * 3)
        q = nq
    t = torch.cat(digits, -1).to(torch.uint8)
    return t if s * TRITS_PER_BYTE == k else t[..., :k]


def bits_per_value(bits: int | str) -> float:
    """Storage bits per value of a format, ignoring row padding."""
    return 8 / TRITS_PER_BYTE if bits == "trit5" else float(bits)
