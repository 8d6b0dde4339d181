"""How factors and rows are stored at each precision (format versions 2 to 4), and read back.

- float32 / float16 / bfloat16: the tensors cast. bfloat16 is the float storage of lossy artifacts
  (``--quantize none``): its 8-bit significand rounds each number by at most 2^-8 relative, far
  below what a truncation at any threshold under 1 drops (measured in docs/results.md).
- int8 (the default of lossy artifacts): absmax quantization with one float32 scale per rank-1 component and one per row.
  Component j of ``B @ A`` is ``B[:, j] A[j, :]``; each of the two vectors is scaled to
  [-127, 127] by its own absmax, and their two scales multiply into the one stored
  ``scale[j]``, so ``B @ A ~= (q_B * scale) @ q_A``. A row k of the rows is ``scale[k] * q[k]``.
- int4 (version 3): group-wise absmax quantization. Each factor vector (a column of B, a row of A)
  and each stored row is cut into groups of ``GROUP_SIZE`` consecutive numbers, each group with its
  own bfloat16 scale (rounded up, so no code clips). The ``INT4_LEAD`` leading components (the
  largest singular values; a token embedding's shared drift) keep 8-bit codes in [-127, 127], in
  ``.lora_B`` [rows, lead] / ``.lora_A`` [lead, cols] int8; every other component and every row
  has 4-bit codes in [-7, 7], stored as ``code + 8`` two to a byte, the lower index in the low
  nibble: ``.lora_B_int4`` [ceil(rows / 2), r - lead] (along B's rows), ``.lora_A_int4``
  [r - lead, ceil(cols / 2)], ``.rows`` [K, ceil(cols / 2)]. Scales: ``.lora_B_scale``
  [ceil(rows / G), r], ``.lora_A_scale`` [r, ceil(cols / G)], ``.rows_scale`` [K, ceil(cols / G)].
  A number is ``code * scale`` of its group. Measured on the README run: 4-bit codes on every
  component cost +2.4% perplexity where bfloat16 factors cost +1.7%; with the two leading
  components at 8 bits, +1.75% (docs/stored-forms.md).
- mixed (version 4): each component at 8, 4, 3 or 2 bits, in bands by decreasing width that a size
  budget chose (the entry's ``bands``); the 8-bit band as int4's, the narrower ones on midrise
  grids with searched scales, rows as int4's (artifact/bands.py has the grids and the layout).

Only this module, bands.py and the writer/reader beside them know these encodings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from inrank_convert.artifact.bands import (
    GROUP_SIZE,
    INT4,
    INT4_GRIDS,
    MIXED_GRIDS,
    SCALE_BYTES,
    Bands,
    banded_layout,
    decode_banded,
    encode_banded,
    group_dequantize,
    group_quantize,
    groups,
    pack_codes,
    packed_bytes,
    unpack_codes,
)
from inrank_convert.artifact.format import (
    FACTOR_A,
    FACTOR_A_SCALE,
    FACTOR_B,
    FACTOR_B_SCALE,
    FACTOR_SCALE,
    FLOAT_CODES,
    ROWS,
    ROWS_SCALE,
)
from inrank_convert.core.tensors import SAFETENSORS_CODES

FLOAT_STORAGE = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}
QUANTIZE_SCHEMES = ("int8", "int4", "mixed")  # the integer storages compress --quantize names
GROUPED_STORAGE = ("int4", "mixed")  # group-wise codes, stored in precision bands
NO_QUANTIZATION = "none"  # compress --quantize none: float factors (--dtype, else bfloat16)
QUANTIZE_CHOICES = (*QUANTIZE_SCHEMES, NO_QUANTIZATION)  # every value --quantize takes
INT8_LEVELS = 127
INT4_LEAD = 2  # leading components an int4 tensor keeps at 8 bits
# Where a storage's tensors go, by suffix (layouts below): (shape, safetensors dtype codes).
Layout = dict[str, tuple[tuple[int, ...], frozenset[str]]]


def element_bytes(storage: str) -> int:
    """Bytes per stored number (int8 scales are counted per vector, see ``vector_overhead``; int4
    is counted by ``storage_costs``)."""
    return 1 if storage == "int8" else torch.empty((), dtype=FLOAT_STORAGE[storage]).element_size()


def vector_overhead(storage: str) -> int:
    """Extra bytes per rank-1 component or per stored row: its float32 scale under int8 (int4 is
    counted by ``storage_costs``)."""
    return 4 if storage == "int8" else 0


def int4_bands(rank: int) -> Bands:
    """int4's bands: the ``INT4_LEAD`` leading components at 8 bits, the rest at 4."""
    lead = min(INT4_LEAD, rank)
    return tuple(band for band in ((8, lead), (4, rank - lead)) if band[1])


def precision_bands(storage: str | None, rank: int, bands: Bands | None = None) -> list[dict[str, int]] | None:
    """The components of a rank-``rank`` tensor by the bits their codes have, leading ones first
    (``inspect``): int4's two leading components at 8 bits, the rest at 4; mixed's as its
    ``bands`` say; int8's all at 8; None for float storage (its numbers are not codes)."""
    if storage in GROUPED_STORAGE:
        return [{"components": count, "bits": bits}
                for bits, count in (bands or () if storage == "mixed" else int4_bands(rank))]
    if storage == "int8":
        return [{"components": rank, "bits": 8}] if rank else []
    return None


def storage_costs(storage: str) -> dict[str, int]:
    """What ``linalg.forms.Costs`` needs to count a tensor's bytes at ``storage`` (beside the dense
    bytes). mixed is priced as int4 where no budget chose its bands (rows, the rule's forms)."""
    if storage not in GROUPED_STORAGE:
        return {"element": element_bytes(storage), "vector": vector_overhead(storage)}
    return {"element": 0, "vector": SCALE_BYTES, "bits": 4, "group": GROUP_SIZE, "lead": INT4_LEAD, "lead_bits": 8}


def _absmax_int8(vectors: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each slice along ``dim`` to int8 by its own absmax: (q, scale) with x ~= q * scale."""
    absmax = vectors.abs().amax(dim=dim, keepdim=True).float()
    scale = torch.where(absmax > 0, absmax / INT8_LEVELS, torch.ones_like(absmax))
    q = torch.round(vectors.float() / scale).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return q, scale.squeeze(dim)


def encode_factors(B: torch.Tensor, A: torch.Tensor, storage: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor | None]:
    """(stored B [rows, r], stored A [r, cols], scale [r] or None) at ``storage``."""
    if storage != "int8":
        dtype = FLOAT_STORAGE[storage]
        return B.to(dtype), A.to(dtype), None
    q_B, scale_B = _absmax_int8(B, dim=0)  # one scale per column of B: [r]
    q_A, scale_A = _absmax_int8(A, dim=1)  # one scale per row of A: [r]
    return q_B, q_A, (scale_B * scale_A).float()


def decode_factors(B: torch.Tensor, A: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (B, A) with B @ A the stored update's low-rank part, balanced as compress made them.

    int8: component j's one scale is split between B's column and A's row so that the two have
    equal norms (b_j a_j = scale[j], ||b_j B[:, j]|| = ||a_j A[j, :]||). All of it on one side would
    leave A's entries at up to 127 and B's near 1e-5: the same product, but a start that AdamW
    cannot train from (a resumed run's factors) and that float16 LoRA weights cannot hold."""
    if scale is None:
        return B.float(), A.float()
    B, A, scale = B.float(), A.float(), scale.float()
    norm_B, norm_A = B.norm(dim=0), A.norm(dim=1)  # [r], [r]
    both = (norm_B > 0) & (norm_A > 0)
    # A zero vector makes the component zero whatever the split: its scale goes to B.
    ratio = torch.where(both, norm_A / torch.where(both, norm_B, 1.0), 1.0)
    side_B = torch.where(both, (scale.abs() * ratio).sqrt() * scale.sign(), scale)  # [r]
    side_A = torch.where(both, (scale.abs() / ratio).sqrt(), torch.ones_like(scale))  # [r]
    return B * side_B[None, :], A * side_A[:, None]


def encode_rows(rows: torch.Tensor, storage: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored rows [K, cols], scale [K] or None) at ``storage``."""
    if storage != "int8":
        return rows.to(FLOAT_STORAGE[storage]), None
    q, scale = _absmax_int8(rows, dim=1)
    return q, scale.float()


def decode_rows(rows: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return rows.float()
    return rows.float() * scale.float()[:, None]


def round_trip(B: torch.Tensor, A: torch.Tensor, rows: torch.Tensor | None, storage: str, bands: Bands | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What a reader will get back after storing at ``storage``: to measure the rounding's error."""
    return read_update(stored_update(B, A, rows, storage, bands=bands), storage,
                       None if rows is None else rows.shape[1])


# --- every storage by stored-name suffix: what the writer adds, the reader reads, the manifest checks


@dataclass(frozen=True)
class InputGram:
    """The calibration's Gram X^T X ([in, in]) of a layer's inputs, and whether the layer's weight is
    stored [in, out] (GPT-2's Conv1D: B's rows meet the input) rather than [out, in] (A's columns do)."""

    gram: torch.Tensor
    conv1d: bool = False


def stored_factors(B: torch.Tensor, A: torch.Tensor, storage: str, feedback: InputGram | None = None,
                   bands: Bands | None = None) -> dict[str, torch.Tensor]:
    """The tensors that store B [rows, r] and A [r, cols] at ``storage``, by name suffix
    (``bands``: mixed storage's, required there).

    ``feedback`` (int4 and mixed): the factor that meets the layer's input is quantized with error
    feedback (GPTQ's order: one input feature at a time, its rounding error pushed onto the features
    not yet rounded through the inverse Gram), which lowers the error of the layer's outputs on the
    calibration text; the other factor is rounded as without it."""
    if storage in GROUPED_STORAGE:
        gram, conv1d = (None, False) if feedback is None else (feedback.gram, feedback.conv1d)
        if storage == "int4":
            return encode_banded(B, A, int4_bands(A.shape[0]), INT4_GRIDS, gram, conv1d, empty_bands=(4,))
        if bands is None:
            raise ValueError("mixed storage needs the bands a budget chose")
        return encode_banded(B, A, bands, MIXED_GRIDS, gram, conv1d)
    B_s, A_s, scale = encode_factors(B, A, storage)
    return {FACTOR_B: B_s, FACTOR_A: A_s} | ({} if scale is None else {FACTOR_SCALE: scale})


def read_factors(stored: Mapping[str, torch.Tensor], storage: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (B, A) back from ``stored_factors``'s tensors (``storage`` None: version 1 floats)."""
    if storage in GROUPED_STORAGE:
        return decode_banded(stored, INT4_GRIDS if storage == "int4" else MIXED_GRIDS)
    return decode_factors(stored[FACTOR_B], stored[FACTOR_A], stored.get(FACTOR_SCALE) if storage == "int8" else None)


def stored_rows(rows: torch.Tensor, storage: str) -> dict[str, torch.Tensor]:
    """The tensors that store rows [K, cols] at ``storage``, by name suffix (the index is the writer's;
    mixed stores rows as int4 does)."""
    if storage in GROUPED_STORAGE:
        codes, scale = group_quantize(rows.float(), INT4)  # [K, cols], [K, groups]
        return {ROWS: pack_codes(codes, INT4), ROWS_SCALE: scale}
    rows_s, scale = encode_rows(rows, storage)
    return {ROWS: rows_s} | ({} if scale is None else {ROWS_SCALE: scale})


def read_rows(stored: Mapping[str, torch.Tensor], storage: str | None, cols: int) -> torch.Tensor:
    """float32 rows [K, cols] back from ``stored_rows``'s tensors (int4 packs two numbers a byte:
    ``cols`` says whether the last byte holds one or two)."""
    if storage in GROUPED_STORAGE:
        return group_dequantize(unpack_codes(stored[ROWS], cols, INT4), stored[ROWS_SCALE], INT4)
    return decode_rows(stored[ROWS], stored.get(ROWS_SCALE) if storage == "int8" else None)


def stored_update(B: torch.Tensor, A: torch.Tensor, rows: torch.Tensor | None, storage: str,
                  feedback: InputGram | None = None, bands: Bands | None = None) -> dict[str, torch.Tensor]:
    """``stored_factors`` and ``stored_rows`` in one mapping by suffix (the row index is the writer's)."""
    return stored_factors(B, A, storage, feedback, bands) | ({} if rows is None else stored_rows(rows, storage))


def read_update(stored: Mapping[str, torch.Tensor], storage: str, cols: int | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """float32 (B, A, rows or None) back from ``stored_update``'s tensors; ``cols``: the rows' width."""
    B, A = read_factors(stored, storage)
    return B, A, (read_rows(stored, storage, cols) if ROWS in stored else None)


# --- the scales alone: what compress --distill-scales trains (the codes fixed, the bytes the same)

SCALE_SUFFIXES = (FACTOR_SCALE, FACTOR_B_SCALE, FACTOR_A_SCALE, ROWS_SCALE)  # the stored scales, of every storage


def unscaled_update(stored: Mapping[str, torch.Tensor], storage: str, cols: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``read_update``'s (B, A, rows) of an integer storage with every scale taken as 1: the codes'
    levels (float32), which ``scaled_update`` multiplies by the scales."""
    if storage in GROUPED_STORAGE:
        ones = {suffix: torch.ones(stored[suffix].shape) for suffix in SCALE_SUFFIXES if suffix in stored}
        return read_update({**stored, **ones}, storage, cols)
    if storage != "int8":
        raise ValueError(f"{storage} storage has no scales")
    rows = stored.get(ROWS)
    return stored[FACTOR_B].float(), stored[FACTOR_A].float(), None if rows is None else rows.float()


def scaled_update(B: torch.Tensor, A: torch.Tensor, rows: torch.Tensor | None, scales: Mapping[str, torch.Tensor],
                  storage: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, A, rows) of ``unscaled_update``'s levels times ``scales`` (by suffix, float: differentiable
    in them): ``B @ A`` (and the rows) equal ``read_update``'s when the scales are the stored ones.
    int8: component j's one scale on B's column j, row k's on row k; int4 and mixed: each group's
    scale on its ``GROUP_SIZE`` numbers of a column of B, a row of A or a stored row."""
    if storage in GROUPED_STORAGE:
        def spread(scale: torch.Tensor, length: int, dim: int) -> torch.Tensor:
            return scale.repeat_interleave(GROUP_SIZE, dim=dim).narrow(dim, 0, length)

        B = B * spread(scales[FACTOR_B_SCALE], B.shape[0], 0)  # [rows, r] * [groups, r] spread along rows
        A = A * spread(scales[FACTOR_A_SCALE], A.shape[1], 1)  # [r, cols] * [r, groups] spread along cols
        rows = None if rows is None else rows * spread(scales[ROWS_SCALE], rows.shape[1], 1)
        return B, A, rows
    return B * scales[FACTOR_SCALE][None, :], A, None if rows is None else rows * scales[ROWS_SCALE][:, None]


def factors_layout(storage: str | None, rows: int, cols: int, rank: int, bands: Bands | None = None) -> Layout:
    """Suffix -> (shape, dtype codes) of every tensor that stores rank-``rank`` factors of a [rows, cols] tensor."""
    if storage == "int4":
        return banded_layout(rows, cols, int4_bands(rank), empty_bands=(4,))
    if storage == "mixed":
        return banded_layout(rows, cols, bands or ())
    codes = _codes(storage)
    layout = {FACTOR_B: ((rows, rank), codes), FACTOR_A: ((rank, cols), codes)}
    if storage == "int8":
        layout[FACTOR_SCALE] = ((rank,), FLOAT_CODES)
    return layout


def rows_layout(storage: str | None, count: int, cols: int) -> Layout:
    """Suffix -> (shape, dtype codes) of every tensor that stores ``count`` rows of ``cols`` numbers (not the index)."""
    if storage in GROUPED_STORAGE:
        return {ROWS: ((count, packed_bytes(cols, INT4.bits)), frozenset({"U8"})),
                ROWS_SCALE: ((count, groups(cols)), frozenset({"BF16"}))}
    layout = {ROWS: ((count, cols), _codes(storage))}
    if storage == "int8":
        layout[ROWS_SCALE] = ((count,), FLOAT_CODES)
    return layout


def _codes(storage: str | None) -> frozenset[str]:
    if storage is None:
        return FLOAT_CODES
    return frozenset({"I8"}) if storage == "int8" else frozenset({SAFETENSORS_CODES[FLOAT_STORAGE[storage]]})
