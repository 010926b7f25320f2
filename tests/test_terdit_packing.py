"""TerDiT's two storage formats: base-3 (5 trits per byte, division-free decode) and signed 2-bit."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from stepq.compiler import ops
from stepq.compiler.ternary_ops import TRITS_PER_BYTE, base3_decode_byte, pack_base3, unpack_base3

shapes = st.lists(st.integers(1, 23), min_size=1, max_size=3)


def _codes(shape: list[int], seed: int) -> torch.Tensor:
    return torch.randint(-1, 2, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


def test_the_decode_formula_recovers_every_one_of_the_243_codes():
    """s = ceil(c·256/243) and trit n = ((s·3^n mod 256)·3) >> 8, on all 243 five-trit values."""
    c = torch.arange(243)
    s = (c * 256 + 242) // 243  # ceil
    assert int(s.max()) == 255 and int(s.min()) == 0  # one byte
    assert torch.equal(s, torch.ceil(c.double() * 256 / 243).long())
    digits = base3_decode_byte(s.to(torch.uint8))
    for n in range(5):  # the formula written out, digit by digit
        assert torch.equal(digits[:, n].long(), (((s * 3**n) % 256) * 3) >> 8)
    assert torch.equal((digits.long() * torch.tensor([81, 27, 9, 3, 1])).sum(1), c)
    assert len({tuple(d) for d in digits.tolist()}) == 243


def test_pack_base3_stores_the_documented_byte():
    q = torch.tensor([1, 0, -1, 1, 1], dtype=torch.int8)  # digits 2 1 0 2 2
    c = 2 * 81 + 1 * 27 + 0 * 9 + 2 * 3 + 2
    assert pack_base3(q).tolist() == [math.ceil(c * 256 / 243)]


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_base3_round_trip_every_shape(shape, seed):
    q = _codes(shape, seed)
    p = pack_base3(q)
    assert p.dtype == torch.uint8 and p.numel() == math.ceil(q.numel() / TRITS_PER_BYTE)
    out = unpack_base3(p, shape)
    assert out.dtype == torch.int8 and torch.equal(out, q)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 19, 20, 21, 4 * 5 + 1, 128 * 768])
def test_base3_round_trip_lengths_not_divisible_by_4_or_5(n):
    q = _codes([n], n)
    assert torch.equal(unpack_base3(pack_base3(q), [n]), q)
    assert pack_base3(q).numel() == -(-n // 5)


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_two_bit_round_trip_every_shape(shape, seed):
    q = _codes(shape, seed)
    p = ops.pack(q, 2, True)
    assert p.numel() == math.ceil(q.numel() / 4)
    assert torch.equal(ops.unpack(p, 2, True, shape), q)


def test_two_bit_layout_is_lsb_first_twos_complement():
    q = torch.tensor([-1, 0, 1, -1, 1], dtype=torch.int8)  # 0b11, 0b00, 0b01, 0b11 | 0b01
    assert ops.pack(q, 2, True).tolist() == [0b11_01_00_11, 0b01]


def test_bits_per_weight_of_both_formats():
    q = _codes([768, 128], 0)
    n = q.numel()
    alpha_bytes = 4
    assert 8 * (pack_base3(q).numel() + alpha_bytes) / n <= 1.61
    assert 8 * (ops.pack(q, 2, True).numel() + alpha_bytes) / n <= 2.01
    assert 8 * pack_base3(q).numel() / n == pytest.approx(1.6, abs=1e-3)


def test_pack_base3_rejects_values_outside_the_ternary_grid():
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_base3(torch.tensor([2], dtype=torch.int8))
