"""Bit packing of low-bit codes: exact round trips for every width, ragged row lengths and sizes."""
import pytest
import torch

from vitqc.backends.packing import (bits_per_value, fields, pack_bits, pack_trits, packed_nbytes, padded_length,
                                    unpack_bits, unpack_trits)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 3, 5, 8, 13, 64, 385])
def test_pack_bits_round_trip_is_exact_and_dense(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    u = torch.randint(0, 1 << bits, (3, 2, k), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(u, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, packed_nbytes(k, bits))
    assert packed.shape[-1] == padded_length(k, bits) * bits // 8  # exactly `bits` bits a value, padding aside
    assert torch.equal(unpack_bits(packed, bits, k), u)


def test_extreme_values_survive():
    for bits in range(1, 9):
        u = torch.tensor([[0, (1 << bits) - 1] * 8], dtype=torch.uint8)
        assert torch.equal(unpack_bits(pack_bits(u, bits), bits, u.shape[-1]), u)


def test_four_bit_is_two_a_byte_and_three_bit_is_eight_in_three_bytes():
    assert packed_nbytes(384, 4) == 192 and packed_nbytes(384, 3) == 144 and packed_nbytes(384, 2) == 96
    assert fields(3) == [2, 1] and fields(7) == [4, 2, 1] and fields(8) == [8]
    # planar nibbles: byte j holds value j (low nibble) and value j + K/2 (high nibble)
    u = torch.arange(16, dtype=torch.uint8).reshape(1, 16)
    packed = pack_bits(u, 4)
    assert packed[0, 0] == (0 | (8 << 4)) and packed[0, 7] == (7 | (15 << 4))


@pytest.mark.parametrize("k", [1, 4, 5, 6, 11, 384, 1536])
def test_trits_five_a_byte_round_trip(k):
    g = torch.Generator().manual_seed(k)
    t = torch.randint(0, 3, (4, k), generator=g).to(torch.uint8)
    packed = pack_trits(t)
    assert packed.shape == (4, -(-k // 5)) and int(packed.max()) <= 242
    assert torch.equal(unpack_trits(packed, k), t)
    assert packed_nbytes(k, "trit5") == -(-k // 5) and bits_per_value("trit5") == 1.6


def test_trit_digit_division_trick_is_exact_on_every_byte():
    q = torch.arange(256, dtype=torch.int16)
    assert torch.equal(((q + 1) * 85) >> 8, q // 3)
    every = torch.tensor([[(v // 3 ** i) % 3 for i in range(5)] for v in range(243)], dtype=torch.uint8)
    # pack_trits puts digit i of byte j at position j + i*S; with S = 243 rows of one byte each:
    planar = every.t().reshape(1, -1)
    assert torch.equal(pack_trits(planar)[0], torch.arange(243, dtype=torch.uint8))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(torch.tensor([[16]], dtype=torch.uint8), 4)
    with pytest.raises(TypeError, match="uint8"):
        pack_bits(torch.tensor([[1]], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="does not fit"):
        pack_trits(torch.tensor([[3]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="1..8-bit"):
        fields(9)
    with pytest.raises(ValueError, match="bytes a row"):
        unpack_bits(torch.zeros(1, 3, dtype=torch.uint8), 4, 8)


def test_unpack_exports_with_torch_export():
    class Unpack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("p", pack_bits(torch.randint(0, 8, (4, 24), dtype=torch.int64).to(torch.uint8), 3))
            self.register_buffer("t", pack_trits(torch.randint(0, 3, (4, 24), dtype=torch.int64).to(torch.uint8)))

        def forward(self, x):
            return x + unpack_bits(self.p, 3, 24).float() + unpack_trits(self.t, 24).float()

    m = Unpack()
    ep = torch.export.export(m, (torch.zeros(4, 24),))
    assert torch.equal(ep.module()(torch.zeros(4, 24)), m(torch.zeros(4, 24)))
