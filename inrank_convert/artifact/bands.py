"""Group-wise integer codes at 8, 4, 3 or 2 bits, packed into bytes, and factors stored in
precision bands (int4 and mixed storage; ``storage.py`` says which storage uses which).

A vector of n numbers is cut into groups of ``GROUP_SIZE`` consecutive numbers, each with its own
bfloat16 scale; a number is its code's level times its group's scale. Two kinds of grid:

- midtread (int4's 8-bit and 4-bit codes): codes in [-L, L], L = 2^(b-1) - 1, level = code; the
  scale is the group's absmax / L rounded up, so no code clips.
- midrise (mixed storage's 4-, 3- and 2-bit codes): codes in [0, 2^b - 1], level = code -
  (2^b - 1) / 2: every code is used (a 2-bit midtread grid has three levels, one of them zero).
  The scale is the one of ``SHRINK`` times the absmax-derived scale whose rounding error is least
  (measured on unit Gaussian vectors of 4,096 numbers: relative squared error 0.113 at 2 bits,
  0.033 at 3, 0.0088 at 4, against 0.52, 0.063 and 0.0116 for midtread absmax grids).

Packed codes: code + offset (midtread 2^(b-1), midrise 0) as a bit stream, code i in bits
[i b, (i + 1) b), least significant bit first, eight bits a byte; a vector of n codes takes
ceil(n b / 8) bytes (at 4 bits: code 2i in the low nibble, 2i + 1 in the high one).

A factorized tensor's components are stored in bands by decreasing width, leading components
first: ``bands`` ((8, k8), (4, k4), (3, k3), (2, k2)), widths absent where no component has them.
The 8-bit band's codes are int8 in ``.lora_B`` [rows, k8] / ``.lora_A`` [k8, cols]; a b-bit
band's are packed along each vector, ``.lora_B_int{b}`` [ceil(rows b / 8), k_b] (B's columns)
and ``.lora_A_int{b}`` [k_b, ceil(cols b / 8)]; the scales of every component are
``.lora_B_scale`` [ceil(rows / G), r] and ``.lora_A_scale`` [r, ceil(cols / G)] bfloat16.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

import torch

from inrank_convert.artifact.format import FACTOR_A, FACTOR_A_SCALE, FACTOR_B, FACTOR_B_SCALE, band_suffixes

GROUP_SIZE = 64  # numbers per scale
SCALE_BYTES = 2  # a group's bfloat16 scale
BAND_BITS = (8, 4, 3, 2)  # the widths a band may have, widest first
SHRINK = tuple(1.0 - 0.05 * step for step in range(16))  # a searched scale's candidates, times absmax's
FEEDBACK_DAMPING = 0.01  # of the Gram's mean diagonal, added to it (GPTQ's): keeps its inverse tame
Bands = tuple[tuple[int, int], ...]  # ((bits, components), ...) widest first, every count > 0


@dataclass(frozen=True)
class Grid:
    """How numbers of one band become codes: ``bits`` wide, midrise or midtread, scale searched or absmax."""

    bits: int
    midrise: bool = False
    search: bool = False

    @property
    def top(self) -> float:
        """The largest level (the absmax maps to it before any shrinking)."""
        return (2 ** self.bits - 1) / 2 if self.midrise else float(2 ** (self.bits - 1) - 1)

    @property
    def offset(self) -> int:
        """Added to a code to store it unsigned."""
        return 0 if self.midrise else 2 ** (self.bits - 1)

    def codes(self, steps: torch.Tensor) -> torch.Tensor:
        """The nearest code (int16) to numbers measured in scales."""
        if self.midrise:
            return torch.round(steps + self.top).clamp_(0, 2 ** self.bits - 1).to(torch.int16)
        return torch.round(steps).clamp_(-self.top, self.top).to(torch.int16)

    def levels(self, codes: torch.Tensor) -> torch.Tensor:
        """float32 levels of codes (the number is level * scale)."""
        return codes.float() - self.top if self.midrise else codes.float()


INT8 = Grid(8)
INT4 = Grid(4)
# mixed storage: the 8-bit band as int4's, the narrow ones midrise with searched scales
MIXED_GRIDS = {8: INT8, **{bits: Grid(bits, midrise=True, search=True) for bits in (4, 3, 2)}}
INT4_GRIDS = {8: INT8, 4: INT4}


def groups(length: int) -> int:
    return -(-length // GROUP_SIZE)


def packed_bytes(length: int, bits: int) -> int:
    return -(-length * bits // 8)


def group_quantize(vectors: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int16 [m, n] and bfloat16 scales [m, ceil(n / G)] of float vectors [m, n], so that
    vectors ~= levels(codes) * scale of their group."""
    m, n = vectors.shape
    count = groups(n)
    padded = torch.nn.functional.pad(vectors.float(), (0, count * GROUP_SIZE - n)).reshape(m, count, GROUP_SIZE)
    absmax = padded.abs().amax(dim=2)  # [m, groups]
    best_codes = best_scale = best_error = None
    for shrink in (SHRINK if grid.search else (1.0,)):
        wanted = absmax * shrink / grid.top
        scale = wanted.to(torch.bfloat16)
        if shrink == 1.0:
            # Rounded up, so that no number's code passes the levels; a zero group gets scale 1.
            low = scale.float() < wanted
            scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
        scale = torch.where(wanted > 0, scale, torch.ones_like(scale))
        codes = grid.codes(padded / scale.float()[:, :, None])
        if not grid.search:
            best_codes, best_scale = codes, scale
            break
        error = (grid.levels(codes) * scale.float()[:, :, None] - padded).pow(2).sum(dim=2)  # [m, groups]
        if best_error is None:
            best_codes, best_scale, best_error = codes, scale, error
            continue
        better = error < best_error
        best_codes = torch.where(better[:, :, None], codes, best_codes)
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.minimum(error, best_error)
    return best_codes.reshape(m, count * GROUP_SIZE)[:, :n], best_scale


def group_dequantize(codes: torch.Tensor, scale: torch.Tensor, grid: Grid) -> torch.Tensor:
    """float32 [m, n] from codes [m, n] and their group scales [m, ceil(n / G)]."""
    n = codes.shape[1]
    return grid.levels(codes) * scale.float().repeat_interleave(GROUP_SIZE, dim=1)[:, :n]


# Codes packed or unpacked at once: the int64 words of a 32000 x 4096 embedding's rows all at once
# would take 1 GB, twice over.
CHUNK_NUMBERS = 1 << 22


def _by_chunks(vectors: torch.Tensor, length: int, work) -> torch.Tensor:
    """``work`` on ``vectors`` [m, ...] a block of rows at a time, the results stacked again."""
    step = max(1, CHUNK_NUMBERS // max(length, 1))
    if vectors.shape[0] <= step:
        return work(vectors)
    return torch.cat([work(vectors[start:start + step]) for start in range(0, vectors.shape[0], step)])


def pack_codes(codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    """uint8 [m, ceil(n b / 8)] of codes [m, n] (the bit stream of the module docstring)."""
    return _by_chunks(codes, codes.shape[1], lambda block: _pack(block, grid))


def unpack_codes(packed: torch.Tensor, n: int, grid: Grid) -> torch.Tensor:
    """int16 codes [m, n] from ``pack_codes``'s bytes."""
    return _by_chunks(packed, n, lambda block: _unpack(block, n, grid))


def _pack(codes: torch.Tensor, grid: Grid) -> torch.Tensor:
    m, n = codes.shape
    bits = grid.bits
    # Eight codes fill exactly ``bits`` bytes: build each chunk's word, then cut it into bytes.
    chunks = -(-n // 8)
    stored = torch.nn.functional.pad(codes.to(torch.int64) + grid.offset, (0, chunks * 8 - n))
    shifts = torch.arange(8, dtype=torch.int64) * bits
    words = (stored.reshape(m, chunks, 8) << shifts).sum(dim=2)  # [m, chunks], at most 64 bits used
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    packed = ((words[:, :, None] >> byte_shifts) & 0xFF).reshape(m, chunks * bits)
    return packed[:, :packed_bytes(n, bits)].to(torch.uint8)


def _unpack(packed: torch.Tensor, n: int, grid: Grid) -> torch.Tensor:
    m = packed.shape[0]
    bits = grid.bits
    chunks = -(-n // 8)
    wide = torch.nn.functional.pad(packed.to(torch.int64), (0, chunks * bits - packed.shape[1]))
    words = (wide.reshape(m, chunks, bits) << (torch.arange(bits, dtype=torch.int64) * 8)).sum(dim=2)
    codes = (words[:, :, None] >> (torch.arange(8, dtype=torch.int64) * bits)) & (2 ** bits - 1)
    return (codes.reshape(m, chunks * 8)[:, :n] - grid.offset).to(torch.int16)


def feedback_quantize(vectors: torch.Tensor, gram: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """``group_quantize``'s codes and scales of vectors [m, n] (n input features, Gram [n, n]) with
    GPTQ's error feedback: feature i is rounded, and its error, divided by U[i, i], is taken off the
    features after it along U[i, i + 1:], U the upper Cholesky factor of the damped Gram's inverse;
    a group's scale is set from its numbers as they are when the feature order reaches it. Each
    vector's error on the inputs, ||(v - v_q) X^T||, is then at most about what plain rounding gives."""
    m, n = vectors.shape
    work = vectors.double().clone()
    hessian = gram.to(torch.float64).clone()
    dead = hessian.diagonal() <= 0  # a feature the text never used: its rounding costs nothing
    hessian[dead, dead] = 1.0
    hessian += FEEDBACK_DAMPING * float(hessian.diagonal().mean()) * torch.eye(n, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)  # [n, n]
    codes = torch.zeros(m, n, dtype=torch.int16)
    scales = torch.ones(m, groups(n), dtype=torch.bfloat16)
    for group in range(groups(n)):
        start, stop = group * GROUP_SIZE, min(n, (group + 1) * GROUP_SIZE)
        _, scale = group_quantize(work[:, start:stop].float(), grid)  # [m, 1]: this group's scale now
        scales[:, group] = scale[:, 0]
        step = scale[:, 0].double()  # [m]
        for i in range(start, stop):
            code = grid.codes(work[:, i] / step)
            codes[:, i] = code
            error = (work[:, i] - grid.levels(code).double() * step) / upper[i, i]  # [m]
            work[:, i + 1:] -= error[:, None] * upper[i, i + 1:][None, :]
    return codes, scales


@cache
def vector_error(grid: Grid) -> float:
    """The mean squared error ``group_quantize`` leaves on a unit Gaussian vector of 4,096 numbers
    (what the budget expects a band of this grid to cost a component, seeded: always the same)."""
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(64, 4096, generator=generator)
    vectors /= vectors.norm(dim=1, keepdim=True)
    codes, scale = group_quantize(vectors, grid)
    return float((group_dequantize(codes, scale, grid) - vectors).pow(2).sum(dim=1).mean())


def _stored_bands(bands: Bands, empty_bands: tuple[int, ...]) -> list[tuple[int, int]]:
    """(bits, count) of every band that has tensors, widest first: the listed ones, the 8-bit band
    always (its ``.lora_B`` / ``.lora_A`` carry the factors' shapes) and ``empty_bands``."""
    widths = dict(bands)
    return [(bits, widths.get(bits, 0)) for bits in BAND_BITS
            if widths.get(bits, 0) > 0 or bits == 8 or bits in empty_bands]


def _rounded(vectors: torch.Tensor, grid: Grid, gram: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of vectors, with error feedback through ``gram`` when given."""
    return group_quantize(vectors, grid) if gram is None else feedback_quantize(vectors, gram, grid)


def encode_banded(B: torch.Tensor, A: torch.Tensor, bands: Bands, grids: Mapping[int, Grid],
                  gram: torch.Tensor | None = None, b_meets_input: bool = False,
                  empty_bands: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors that store B [rows, r] and A [r, cols] in ``bands``, by name suffix.

    ``gram`` (the layer's input Gram): the factor that meets the input (B where ``b_meets_input``:
    a Conv1D weight [in, out]) is rounded with ``feedback_quantize``. ``empty_bands``: widths stored
    with no component too (int4 keeps its 4-bit tensors at rank 2)."""
    columns, rows_of_a = B.T.float(), A.float()  # [r, rows], [r, cols]: one vector per component
    stored: dict[str, torch.Tensor] = {}
    scales_b, scales_a = [], []
    start = 0
    for bits, count in _stored_bands(bands, empty_bands):
        grid, stop = grids[bits], start + count
        code_b, scale_b = _rounded(columns[start:stop], grid, gram if b_meets_input else None)
        code_a, scale_a = _rounded(rows_of_a[start:stop], grid, None if b_meets_input else gram)
        suffix_b, suffix_a = band_suffixes(bits)
        if bits == 8:
            stored[suffix_b], stored[suffix_a] = code_b.to(torch.int8).T.contiguous(), code_a.to(torch.int8)
        else:
            stored[suffix_b] = pack_codes(code_b, grid).T.contiguous()
            stored[suffix_a] = pack_codes(code_a, grid)
        scales_b.append(scale_b)
        scales_a.append(scale_a)
        start = stop
    stored[FACTOR_B_SCALE] = torch.cat(scales_b).T.contiguous()
    stored[FACTOR_A_SCALE] = torch.cat(scales_a).contiguous()
    return stored


def decode_banded(stored: Mapping[str, torch.Tensor], grids: Mapping[int, Grid]) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (B [rows, r], A [r, cols]) back from ``encode_banded``'s tensors (the bands are
    read from the shapes: a band's count is its A tensor's first dimension)."""
    rows, cols = stored[FACTOR_B].shape[0], stored[FACTOR_A].shape[1]
    scale_b, scale_a = stored[FACTOR_B_SCALE].T, stored[FACTOR_A_SCALE]  # [r, groups] each
    B_parts, A_parts, start = [], [], 0
    for bits in BAND_BITS:
        suffix_b, suffix_a = band_suffixes(bits)
        if suffix_a not in stored:
            continue
        grid, count = grids[bits], stored[suffix_a].shape[0]
        if bits == 8:
            code_b, code_a = stored[suffix_b].T.to(torch.int16), stored[suffix_a].to(torch.int16)
        else:
            code_b, code_a = unpack_codes(stored[suffix_b].T, rows, grid), unpack_codes(stored[suffix_a], cols, grid)
        B_parts.append(group_dequantize(code_b, scale_b[start:start + count], grid))
        A_parts.append(group_dequantize(code_a, scale_a[start:start + count], grid))
        start += count
    return torch.cat(B_parts).T.contiguous(), torch.cat(A_parts)


def banded_layout(rows: int, cols: int, bands: Bands, empty_bands: tuple[int, ...] = ()
                  ) -> dict[str, tuple[tuple[int, ...], frozenset[str]]]:
    """Suffix -> (shape, dtype codes) of ``encode_banded``'s tensors."""
    rank = sum(count for _, count in bands)
    layout: dict[str, tuple[tuple[int, ...], frozenset[str]]] = {}
    for bits, count in _stored_bands(bands, empty_bands):
        suffix_b, suffix_a = band_suffixes(bits)
        if bits == 8:
            layout[suffix_b] = ((rows, count), frozenset({"I8"}))
            layout[suffix_a] = ((count, cols), frozenset({"I8"}))
        else:
            layout[suffix_b] = ((packed_bytes(rows, bits), count), frozenset({"U8"}))
            layout[suffix_a] = ((count, packed_bytes(cols, bits)), frozenset({"U8"}))
    layout[FACTOR_B_SCALE] = ((groups(rows), rank), frozenset({"BF16"}))
    layout[FACTOR_A_SCALE] = ((rank, groups(cols)), frozenset({"BF16"}))
    return layout


def check_bands(bands: Bands, rank: int) -> str | None:
    """What is wrong with ``bands`` for a rank-``rank`` tensor, or None."""
    widths = [bits for bits, _ in bands]
    if any(bits not in BAND_BITS for bits in widths):
        return f"band widths {widths} are not among {list(BAND_BITS)}"
    if widths != sorted(set(widths), reverse=True):
        return f"band widths {widths} are not distinct and widest first"
    if any(count < 1 for _, count in bands):
        return f"band counts {[count for _, count in bands]} are not all 1 or more"
    if sum(count for _, count in bands) != rank:
        return f"the bands hold {sum(count for _, count in bands)} components, the rank is {rank}"
    return None
