"""The artifact's file format by name: its files, the manifest's header key, the suffixes of stored
tensor names, the tensor kinds, storage precisions and reference modes. Every other module spells
these through here.

    OUT/inrank.safetensors   factors (``name.lora_B`` [rows, r], ``name.lora_A`` [r, cols]), rows
                             (``name.rows`` [K, cols], ``name.row_index`` [K]), int8 and int4 scales, and
                             dense-stored tensors; header metadata key ``inrank`` = the JSON manifest
    OUT/init.safetensors     the reference tensors, only with --embed-init
"""

from __future__ import annotations

from typing import Literal, get_args

ARTIFACT_FILE = "inrank.safetensors"
INIT_FILE = "init.safetensors"
FORMAT_NAME = "inrank-convert"
# What this writer writes; readers take every version up to it (1: no rows, no int8; 2: no int4;
# 3: no mixed storage, no bands).
FORMAT_VERSION = 4
MANIFEST_KEY = "inrank"
FACTOR_B = ".lora_B"  # [rows, r]
FACTOR_A = ".lora_A"  # [r, cols]
FACTOR_SCALE = ".lora_scale"  # [r] float32, int8 storage: component j is scale[j] * B[:, j] A[j, :]
ROWS = ".rows"  # [K, cols]: the update's residual on K whole rows (kind lowrank+rows)
ROW_INDEX = ".row_index"  # [K] int64, distinct, in [0, rows)
ROWS_SCALE = ".rows_scale"  # [K] float32, int8 storage: row k is scale[k] * rows[k]; int4: [K, groups]
# int4 and mixed storage (artifact/bands.py has the layout): the 8-bit band's codes stay in
# .lora_B / .lora_A, a b-bit band's codes are packed b bits a number here, and every group of
# GROUP_SIZE numbers of a factor vector or row has its own bfloat16 scale.
FACTOR_B4 = ".lora_B_int4"  # [ceil(rows / 2), k4] uint8
FACTOR_A4 = ".lora_A_int4"  # [k4, ceil(cols / 2)] uint8
FACTOR_B3 = ".lora_B_int3"  # [ceil(3 rows / 8), k3] uint8 (mixed storage)
FACTOR_A3 = ".lora_A_int3"  # [k3, ceil(3 cols / 8)] uint8
FACTOR_B2 = ".lora_B_int2"  # [ceil(rows / 4), k2] uint8 (mixed storage)
FACTOR_A2 = ".lora_A_int2"  # [k2, ceil(cols / 4)] uint8
FACTOR_B_SCALE = ".lora_B_scale"  # [ceil(rows / GROUP_SIZE), r] bfloat16
FACTOR_A_SCALE = ".lora_A_scale"  # [r, ceil(cols / GROUP_SIZE)] bfloat16
# How a tensor is stored: B @ A on top of the reference; B @ A plus K exact rows (an update
# concentrated in rows: embeddings); whole; not at all (equal to the reference); or as a second
# name of another tensor (tied weights).
TensorKind = Literal["lowrank", "lowrank+rows", "dense", "zero", "alias"]
# The precision of stored factors and rows (dense tensors keep their source dtype).
# mixed: each component at 8, 4, 3 or 2 bits as a size budget chose (the entry's ``bands``).
Storage = Literal["float64", "float32", "float16", "bfloat16", "int8", "int4", "mixed"]
# What the update is measured against: a checkpoint by path and hash, a seed recipe, the init
# stored beside the factors, or nothing.
ReferenceMode = Literal["reference", "seed", "embedded", "zero"]
TENSOR_KINDS: tuple[str, ...] = get_args(TensorKind)
REFERENCE_MODES: tuple[str, ...] = get_args(ReferenceMode)
STORAGES: tuple[str, ...] = get_args(Storage)
# What a damaged manifest tells the user to do: the file no longer says what compress wrote.
DAMAGED = "the file is damaged: re-run compress"
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})  # the safetensors codes of float tensors


def factor_names(name: str) -> tuple[str, str]:
    """Stored names of the two factors of tensor ``name``: (B, A)."""
    return name + FACTOR_B, name + FACTOR_A


def band_suffixes(bits: int) -> tuple[str, str]:
    """Suffixes of the (B, A) tensors that hold a band of ``bits``-bit codes."""
    return {8: (FACTOR_B, FACTOR_A), 4: (FACTOR_B4, FACTOR_A4), 3: (FACTOR_B3, FACTOR_A3),
            2: (FACTOR_B2, FACTOR_A2)}[bits]


def row_names(name: str) -> tuple[str, str]:
    """Stored names of the rows of tensor ``name``: (rows, row_index)."""
    return name + ROWS, name + ROW_INDEX
