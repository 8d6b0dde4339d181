"""How factors and rows are stored at each precision (format versions 2 and 3), and read back.

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

Only this module and the writer/reader beside it know these encodings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from inrank_convert.artifact.format import (
    FACTOR_A,
    FACTOR_A4,
    FACTOR_A_SCALE,
    FACTOR_B,
    FACTOR_B4,
    FACTOR_B_SCALE,
    FACTOR_SCALE,
    FLOAT_CODES,
    ROWS,
    ROWS_SCALE,
)
from inrank_convert.core.tensors import SAFETENSORS_CODES

FLOAT_STORAGE = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}
QUANTIZE_SCHEMES = ("int8", "int4")  # the integer storages compress --quantize names
NO_QUANTIZATION = "none"  # compress --quantize none: float factors (--dtype, else bfloat16)
QUANTIZE_CHOICES = (*QUANTIZE_SCHEMES, NO_QUANTIZATION)  # every value --quantize takes
INT8_LEVELS = 127
INT4_LEVELS = 7
GROUP_SIZE = 64  # numbers per int4 scale
INT4_LEAD = 2  # leading components an int4 tensor keeps at 8 bits
SCALE_BYTES = 2  # an int4 group's bfloat16 scale
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


def precision_bands(storage: str | None, rank: int) -> list[dict[str, int]] | None:
    """The components of a rank-``rank`` tensor by the bits their codes have, leading ones first
    (``inspect``): int4's two leading components at 8 bits, the rest at 4; int8's all at 8; None
    for float storage (its numbers are not codes)."""
    if storage == "int4":
        lead = min(INT4_LEAD, rank)
        return [band for band in ({"components": lead, "bits": 8}, {"components": rank - lead, "bits": 4})
                if band["components"]]
    if storage == "int8":
        return [{"components": rank, "bits": 8}] if rank else []
    return None


def storage_costs(storage: str) -> dict[str, int]:
    """What ``linalg.forms.Costs`` needs to count a tensor's bytes at ``storage`` (beside the dense bytes)."""
    if storage != "int4":
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


def round_trip(B: torch.Tensor, A: torch.Tensor, rows: torch.Tensor | None, storage: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What a reader will get back after storing at ``storage``: to measure the rounding's error."""
    return read_update(stored_update(B, A, rows, storage), storage, None if rows is None else rows.shape[1])


# --- every storage by stored-name suffix: what the writer adds, the reader reads, the manifest checks


@dataclass(frozen=True)
class InputGram:
    """The calibration's Gram X^T X ([in, in]) of a layer's inputs, and whether the layer's weight is
    stored [in, out] (GPT-2's Conv1D: B's rows meet the input) rather than [out, in] (A's columns do)."""

    gram: torch.Tensor
    conv1d: bool = False


def stored_factors(B: torch.Tensor, A: torch.Tensor, storage: str,
                   feedback: InputGram | None = None) -> dict[str, torch.Tensor]:
    """The tensors that store B [rows, r] and A [r, cols] at ``storage``, by name suffix.

    ``feedback`` (int4 only): the factor that meets the layer's input is quantized with error
    feedback (GPTQ's order: one input feature at a time, its rounding error pushed onto the features
    not yet rounded through the inverse Gram), which lowers the error of the layer's outputs on the
    calibration text; the other factor is rounded as without it."""
    if storage == "int4":
        return _int4_factors(B, A, feedback)
    B_s, A_s, scale = encode_factors(B, A, storage)
    return {FACTOR_B: B_s, FACTOR_A: A_s} | ({} if scale is None else {FACTOR_SCALE: scale})


def read_factors(stored: Mapping[str, torch.Tensor], storage: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (B, A) back from ``stored_factors``'s tensors (``storage`` None: version 1 floats)."""
    if storage == "int4":
        return _int4_read_factors(stored)
    return decode_factors(stored[FACTOR_B], stored[FACTOR_A], stored.get(FACTOR_SCALE) if storage == "int8" else None)


def stored_rows(rows: torch.Tensor, storage: str) -> dict[str, torch.Tensor]:
    """The tensors that store rows [K, cols] at ``storage``, by name suffix (the index is the writer's)."""
    if storage == "int4":
        codes, scale = _group_quantize(rows.float(), INT4_LEVELS)  # [K, cols], [K, groups]
        return {ROWS: _pack_nibbles(codes), ROWS_SCALE: scale}
    rows_s, scale = encode_rows(rows, storage)
    return {ROWS: rows_s} | ({} if scale is None else {ROWS_SCALE: scale})


def read_rows(stored: Mapping[str, torch.Tensor], storage: str | None, cols: int) -> torch.Tensor:
    """float32 rows [K, cols] back from ``stored_rows``'s tensors (int4 packs two numbers a byte:
    ``cols`` says whether the last byte holds one or two)."""
    if storage == "int4":
        return _group_dequantize(_unpack_nibbles(stored[ROWS], cols), stored[ROWS_SCALE])
    return decode_rows(stored[ROWS], stored.get(ROWS_SCALE) if storage == "int8" else None)


def stored_update(B: torch.Tensor, A: torch.Tensor, rows: torch.Tensor | None, storage: str,
                  feedback: InputGram | None = None) -> dict[str, torch.Tensor]:
    """``stored_factors`` and ``stored_rows`` in one mapping by suffix (the row index is the writer's)."""
    return stored_factors(B, A, storage, feedback) | ({} if rows is None else stored_rows(rows, storage))


def read_update(stored: Mapping[str, torch.Tensor], storage: str, cols: int | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """float32 (B, A, rows or None) back from ``stored_update``'s tensors; ``cols``: the rows' width."""
    B, A = read_factors(stored, storage)
    return B, A, (read_rows(stored, storage, cols) if ROWS in stored else None)


def factors_layout(storage: str | None, rows: int, cols: int, rank: int) -> Layout:
    """Suffix -> (shape, dtype codes) of every tensor that stores rank-``rank`` factors of a [rows, cols] tensor."""
    if storage == "int4":
        lead, groups_b, groups_a = min(INT4_LEAD, rank), _groups(rows), _groups(cols)
        return {FACTOR_B: ((rows, lead), frozenset({"I8"})), FACTOR_A: ((lead, cols), frozenset({"I8"})),
                FACTOR_B4: ((-(-rows // 2), rank - lead), frozenset({"U8"})),
                FACTOR_A4: ((rank - lead, -(-cols // 2)), frozenset({"U8"})),
                FACTOR_B_SCALE: ((groups_b, rank), frozenset({"BF16"})),
                FACTOR_A_SCALE: ((rank, groups_a), frozenset({"BF16"}))}
    codes = _codes(storage)
    layout = {FACTOR_B: ((rows, rank), codes), FACTOR_A: ((rank, cols), codes)}
    if storage == "int8":
        layout[FACTOR_SCALE] = ((rank,), FLOAT_CODES)
    return layout


def rows_layout(storage: str | None, count: int, cols: int) -> Layout:
    """Suffix -> (shape, dtype codes) of every tensor that stores ``count`` rows of ``cols`` numbers (not the index)."""
    if storage == "int4":
        return {ROWS: ((count, -(-cols // 2)), frozenset({"U8"})), ROWS_SCALE: ((count, _groups(cols)), frozenset({"BF16"}))}
    layout = {ROWS: ((count, cols), _codes(storage))}
    if storage == "int8":
        layout[ROWS_SCALE] = ((count,), FLOAT_CODES)
    return layout


def _codes(storage: str | None) -> frozenset[str]:
    if storage is None:
        return FLOAT_CODES
    return frozenset({"I8"}) if storage == "int8" else frozenset({SAFETENSORS_CODES[FLOAT_STORAGE[storage]]})


# --- int4: group-wise codes, packed


def _groups(length: int) -> int:
    return -(-length // GROUP_SIZE)


def _group_quantize(vectors: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes int8 [m, n] in [-levels, levels] and bfloat16 scales [m, ceil(n / G)] of float vectors
    [m, n], one scale per group of G numbers of a vector, so that vectors ~= codes * scale."""
    m, n = vectors.shape
    groups = _groups(n)
    padded = torch.nn.functional.pad(vectors.float(), (0, groups * GROUP_SIZE - n)).reshape(m, groups, GROUP_SIZE)
    wanted = padded.abs().amax(dim=2) / levels  # [m, groups]
    scale = wanted.to(torch.bfloat16)
    # Rounded up, so that no number's code passes the levels (a clipped code would be an error the
    # rounding cannot bound); a zero group gets scale 1 (its codes are 0 whatever it is).
    low = scale.float() < wanted
    scale = torch.where(low, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    scale = torch.where(wanted > 0, scale, torch.ones_like(scale))
    codes = torch.round(padded / scale.float()[:, :, None]).clamp_(-levels, levels).to(torch.int8)
    return codes.reshape(m, groups * GROUP_SIZE)[:, :n], scale


def _group_dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [m, n] from codes [m, n] and their group scales [m, ceil(n / G)]."""
    n = codes.shape[1]
    return codes.float() * scale.float().repeat_interleave(GROUP_SIZE, dim=1)[:, :n]


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [m, ceil(n / 2)] of 4-bit codes [m, n] in [-7, 7]: code + 8, index 2i low, 2i + 1 high."""
    m, n = codes.shape
    offset = torch.nn.functional.pad(codes.to(torch.int16) + 8, (0, n % 2)).reshape(m, (n + 1) // 2, 2)
    return (offset[:, :, 0] | (offset[:, :, 1] << 4)).to(torch.uint8)


def _unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """int8 codes [m, n] from ``_pack_nibbles``'s bytes."""
    wide = packed.to(torch.int16)
    pairs = torch.stack([wide & 0xF, wide >> 4], dim=2).reshape(packed.shape[0], 2 * packed.shape[1])[:, :n]
    return (pairs - 8).to(torch.int8)


def _int4_factors(B: torch.Tensor, A: torch.Tensor, feedback: InputGram | None = None) -> dict[str, torch.Tensor]:
    rank = A.shape[0]
    lead = min(INT4_LEAD, rank)
    columns = B.T.float()  # [r, rows]: each of B's columns as a vector

    def quantize(vectors: torch.Tensor, levels: int, meets_input: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if feedback is None or not meets_input:
            return _group_quantize(vectors, levels)
        return _feedback_quantize(vectors, feedback.gram, levels)

    b_meets_input = feedback is not None and feedback.conv1d  # Conv1D [in, out]: B's rows meet the input
    code_b8, scale_b8 = quantize(columns[:lead], INT8_LEVELS, b_meets_input)
    code_b4, scale_b4 = quantize(columns[lead:], INT4_LEVELS, b_meets_input)
    code_a8, scale_a8 = quantize(A[:lead].float(), INT8_LEVELS, not b_meets_input)
    code_a4, scale_a4 = quantize(A[lead:].float(), INT4_LEVELS, not b_meets_input)
    return {FACTOR_B: code_b8.T.contiguous(), FACTOR_A: code_a8.contiguous(),
            FACTOR_B4: _pack_nibbles(code_b4).T.contiguous(), FACTOR_A4: _pack_nibbles(code_a4),
            FACTOR_B_SCALE: torch.cat([scale_b8, scale_b4]).T.contiguous(),
            FACTOR_A_SCALE: torch.cat([scale_a8, scale_a4]).contiguous()}


FEEDBACK_DAMPING = 0.01  # of the Gram's mean diagonal, added to it (GPTQ's): keeps its inverse tame


def _feedback_quantize(vectors: torch.Tensor, gram: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_group_quantize``'s codes and scales of vectors [m, n] (n input features, Gram [n, n]) with
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
    codes = torch.zeros(m, n, dtype=torch.int8)
    scales = torch.ones(m, _groups(n), dtype=torch.bfloat16)
    for group in range(_groups(n)):
        start, stop = group * GROUP_SIZE, min(n, (group + 1) * GROUP_SIZE)
        _, scale = _group_quantize(work[:, start:stop].float(), levels)  # [m, 1]: this group's scale now
        scales[:, group] = scale[:, 0]
        step = scale[:, 0].double()  # [m]
        for i in range(start, stop):
            code = torch.round(work[:, i] / step).clamp_(-levels, levels)
            codes[:, i] = code.to(torch.int8)
            error = (work[:, i] - code * step) / upper[i, i]  # [m]
            work[:, i + 1:] -= error[:, None] * upper[i, i + 1:][None, :]
    return codes, scales


def _int4_read_factors(stored: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = stored[FACTOR_B].shape[0], stored[FACTOR_A].shape[1]
    scale_b, scale_a = stored[FACTOR_B_SCALE].T, stored[FACTOR_A_SCALE]  # [r, groups] each
    codes_b = torch.cat([stored[FACTOR_B].T.to(torch.int8), _unpack_nibbles(stored[FACTOR_B4].T, rows)])  # [r, rows]
    codes_a = torch.cat([stored[FACTOR_A].to(torch.int8), _unpack_nibbles(stored[FACTOR_A4], cols)])  # [r, cols]
    return _group_dequantize(codes_b, scale_b).T.contiguous(), _group_dequantize(codes_a, scale_a)
