"""How factors and rows are stored at each precision (format version 2), and read back.

- float32 / float16 / bfloat16: the tensors cast. bfloat16 is the float storage of lossy artifacts
  (``--quantize none``): its 8-bit significand rounds each number by at most 2^-8 relative, far
  below what a truncation at any threshold under 1 drops (measured in docs/results.md).
- int8 (the default of lossy artifacts): absmax quantization with one float32 scale per rank-1 component and one per row.
  Component j of ``B @ A`` is ``B[:, j] A[j, :]``; each of the two vectors is scaled to
  [-127, 127] by its own absmax, and their two scales multiply into the one stored
  ``scale[j]``, so ``B @ A ~= (q_B * scale) @ q_A``. A row k of the rows is ``scale[k] * q[k]``.

Only this module and the writer/reader beside it know these encodings.
"""

from __future__ import annotations

import torch

FLOAT_STORAGE = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}
QUANTIZE_SCHEMES = ("int8",)  # the integer storages compress --quantize names
NO_QUANTIZATION = "none"  # compress --quantize none: float factors (--dtype, else bfloat16)
QUANTIZE_CHOICES = (*QUANTIZE_SCHEMES, NO_QUANTIZATION)  # every value --quantize takes
INT8_LEVELS = 127


def element_bytes(storage: str) -> int:
    """Bytes per stored number (int8 scales are counted per vector, see ``vector_overhead``)."""
    return 1 if storage == "int8" else torch.empty((), dtype=FLOAT_STORAGE[storage]).element_size()


def vector_overhead(storage: str) -> int:
    """Extra bytes per rank-1 component or per stored row: its float32 scale under int8."""
    return 4 if storage == "int8" else 0


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
    B_q, A_q, scale = encode_factors(B, A, storage)
    B_back, A_back = decode_factors(B_q, A_q, scale)
    rows_back = None
    if rows is not None:
        rows_q, row_scale = encode_rows(rows, storage)
        rows_back = decode_rows(rows_q, row_scale)
    return B_back, A_back, rows_back
