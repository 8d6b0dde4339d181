"""artifact/bands.py: group-wise codes at 8, 4, 3 and 2 bits, their packing, and factors stored in
precision bands (mixed storage), with and without error feedback."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.artifact.bands import (
    GROUP_SIZE,
    INT4,
    INT8,
    MIXED_GRIDS,
    Grid,
    banded_layout,
    check_bands,
    decode_banded,
    encode_banded,
    group_dequantize,
    group_quantize,
    pack_codes,
    unpack_codes,
    vector_error,
)
from inrank_convert.artifact.storage import InputGram, read_factors, storage_costs, stored_factors
from inrank_convert.core.tensors import SAFETENSORS_CODES
from inrank_convert.linalg.forms import Costs

GRIDS = [Grid(bits, midrise) for bits in (2, 3, 4) for midrise in (False, True)]


def gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.double() - exact.double()).norm() / exact.double().norm())


@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("length", [0, 1, 3, 8, 9, 64, 131])
def test_codes_pack_and_unpack_exactly_at_every_width(grid, length):
    low, high = (0, 2 ** grid.bits - 1) if grid.midrise else (-int(grid.top), int(grid.top))
    codes = torch.randint(low, high + 1, (3, length), generator=torch.Generator().manual_seed(length)).to(torch.int16)
    packed = pack_codes(codes, grid)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (3, -(-length * grid.bits // 8))
    assert torch.equal(unpack_codes(packed, length, grid), codes)
    if length >= 8:  # a little-endian bit stream: code 0 in the lowest bits of byte 0
        assert int(packed[0, 0]) & (2 ** grid.bits - 1) == int(codes[0, 0]) + grid.offset


def test_four_bit_packing_is_int4s_nibble_layout():
    codes = torch.tensor([[-7, 7, 0, 3, -1]], dtype=torch.int16)
    assert pack_codes(codes, INT4).tolist() == [[(-7 + 8) | ((7 + 8) << 4), 8 | (11 << 4), 7]]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_midrise_grids_use_every_code_and_searched_scales_beat_absmax(bits):
    vectors = gaussian(32, 512, seed=bits)
    grid = MIXED_GRIDS[bits]
    codes, scale = group_quantize(vectors, grid)
    assert set(codes.unique().tolist()) == set(range(2 ** bits))
    assert scale.dtype == torch.bfloat16 and tuple(scale.shape) == (32, 512 // GROUP_SIZE)
    searched = relative_error(group_dequantize(codes, scale, grid), vectors)
    absmax = Grid(bits, midrise=True)
    plain = relative_error(group_dequantize(*group_quantize(vectors, absmax), absmax), vectors)
    assert searched < plain


def test_vector_errors_fall_with_the_width():
    errors = [vector_error(MIXED_GRIDS[bits]) for bits in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-4 < errors[0] < 0.2
    assert vector_error(INT8) == errors[-1]  # the 8-bit band is int4's


BANDS = [((8, 1), (4, 2), (3, 3), (2, 4)), ((3, 5),), ((8, 2), (2, 1)), ((4, 1), (2, 6)), ()]


@pytest.mark.parametrize("bands", BANDS, ids=str)
def test_banded_factors_round_trip_in_their_layout(bands):
    rows, cols = 131, 70  # neither a multiple of the group nor of eight
    rank = sum(count for _, count in bands)
    B, A = gaussian(rows, rank, seed=1), gaussian(rank, cols, seed=2)
    stored = stored_factors(B, A, "mixed", bands=bands)
    layout = banded_layout(rows, cols, bands)
    assert set(stored) == set(layout)
    for suffix, (shape, codes) in layout.items():
        assert tuple(stored[suffix].shape) == shape and SAFETENSORS_CODES[stored[suffix].dtype] in codes, suffix
    B_back, A_back = read_factors(stored, "mixed")
    assert B_back.shape == B.shape and A_back.shape == A.shape
    # Each band's vectors lose what its width's grid loses on Gaussian vectors (the budget's model).
    start = 0
    for bits, count in bands:
        squared = [relative_error(back, exact) ** 2 for j in range(start, start + count)
                   for back, exact in ((B_back[:, j], B[:, j]), (A_back[j], A[j]))]
        expected = vector_error(MIXED_GRIDS[bits])
        assert 0.3 * expected < sum(squared) / len(squared) < 2.0 * expected, (bits, squared, expected)
        start += count
    # The stored bytes are what the budget's costs count.
    costs = Costs(**storage_costs("mixed"), dense=rows * cols * 4)
    assert sum(t.numel() * t.element_size() for t in stored.values()) == \
        sum(count * costs.component_at(bits, rows, cols) for bits, count in bands)


def test_mixed_storage_needs_its_bands():
    with pytest.raises(ValueError, match="bands"):
        stored_factors(gaussian(8, 2, seed=0), gaussian(2, 8, seed=1), "mixed")


@pytest.mark.parametrize(("bands", "rank", "says"), [
    (((4, 2), (8, 1)), 3, "widest first"), (((4, 2), (4, 1)), 3, "distinct"), (((5, 2),), 2, "not among"),
    (((8, 0), (4, 2)), 2, "1 or more"), (((8, 1), (2, 1)), 3, "the rank is 3")])
def test_bad_bands_are_named(bands, rank, says):
    problem = check_bands(bands, rank)
    assert problem is not None and says in problem
    assert check_bands(((8, 1), (2, 2)), 3) is None


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("conv1d", [False, True])
def test_error_feedback_lowers_the_output_error_at_every_width(bits, conv1d):
    generator = torch.Generator().manual_seed(7)
    mixing = torch.linalg.qr(torch.randn(96, 96, generator=generator))[0]
    inputs = torch.randn(4000, 96, generator=generator) @ torch.diag(torch.logspace(0, -2, 96)) @ mixing  # [tokens, in]
    gram = (inputs.T @ inputs).double()
    B, A = gaussian(40, 6, seed=1), gaussian(6, 96, seed=2)  # nn.Linear [out, in]: A meets the input
    if conv1d:  # GPT-2's Conv1D [in, out]: B meets the input
        B, A = A.T.contiguous(), B.T.contiguous()
    bands = ((8, 1), (bits, 5))

    def output_error(stored: dict) -> float:
        """The outputs' error from the input-side factor's rounding alone (the other is rounded alike)."""
        B_back, A_back = read_factors(stored, "mixed")
        error = (B - B_back) @ A if conv1d else B @ (A - A_back)
        return float((inputs @ error if conv1d else inputs @ error.T).norm())

    plain = stored_factors(B, A, "mixed", bands=bands)
    fed = stored_factors(B, A, "mixed", InputGram(gram, conv1d), bands)
    assert {k: v.shape for k, v in fed.items()} == {k: v.shape for k, v in plain.items()}
    assert output_error(fed) < 0.8 * output_error(plain), (output_error(fed), output_error(plain))


def test_encode_banded_keeps_empty_bands_it_is_asked_to():
    B, A = gaussian(10, 2, seed=0), gaussian(2, 12, seed=1)
    stored = encode_banded(B, A, ((8, 2),), {8: INT8, 4: INT4}, empty_bands=(4,))
    assert tuple(stored[".lora_B_int4"].shape) == (5, 0) and tuple(stored[".lora_A_int4"].shape) == (0, 6)
    back_B, back_A = decode_banded(stored, {8: INT8, 4: INT4})
    assert relative_error(back_B @ back_A, B @ A) < 0.02


def test_packing_by_chunks_gives_the_same_bytes(monkeypatch):
    from inrank_convert.artifact import bands

    codes = torch.randint(-7, 8, (37, 50), generator=torch.Generator().manual_seed(3)).to(torch.int16)
    whole = pack_codes(codes, INT4)
    monkeypatch.setattr(bands, "CHUNK_NUMBERS", 120)  # two rows a block
    assert torch.equal(pack_codes(codes, INT4), whole)
    assert torch.equal(unpack_codes(whole, 50, INT4), codes)
