"""What every module needs to know about a single tensor: dtype names, raw bytes, hashes, and
which names share one storage (tied weights). One definition of each, used everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

# safetensors' dtype codes -> torch dtypes: what a checkpoint file may hold and an artifact may store.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
# The floating-point dtypes a user may ask a model to run or train in (--dtype).
COMPUTE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                          "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how manifests, JSON output and tables name a dtype."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype | None:
    """The inverse of ``dtype_name``; None for a name that is not a torch dtype."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def raw_bytes(tensor: torch.Tensor) -> memoryview | bytes:
    """The tensor's data as stored in a safetensors file (row-major, native little-endian)."""
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else b""


def checksum(tensor: torch.Tensor) -> str:
    """sha256 of the stored bytes alone: an artifact's per-tensor checksum (what ``verify`` checks)."""
    return hashlib.sha256(raw_bytes(tensor)).hexdigest()


def sha256_tensor(tensor: torch.Tensor) -> str:
    """sha256 of dtype, shape and bytes: identifies a reference tensor however it was stored."""
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(raw_bytes(tensor))
    return digest.hexdigest()


def is_finite(tensor: torch.Tensor, block_rows: int = 4096) -> bool:
    """No NaN or Inf anywhere (integer tensors always are). A block of rows at a time, so that the
    boolean mask stays small for a tall tensor (a 50,257 x 4096 embedding: 16 MB, not 200 MB)."""
    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return True
    rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() >= 2 else tensor.reshape(1, -1)
    return all(bool(torch.isfinite(rows[start:start + block_rows]).all())
               for start in range(0, rows.shape[0], block_rows))


def storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """Two tensors with the same key are one weight under two names (a tie)."""
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset()


def shared_storage_groups(tensors: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Groups of names (in order, the first is canonical) that view the same data."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in tensors.items():
        key = (*storage_key(tensor), tuple(tensor.shape), tuple(tensor.stride()))
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def aliases_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """alias -> canonical name, for every name after the first of a shared-storage group."""
    return {alias: group[0] for group in shared_storage_groups(tensors) for alias in group[1:]}


def without_aliases(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mapping with each shared storage once (safetensors refuses to store a tie twice)."""
    aliases = aliases_of(tensors)
    return {name: tensor for name, tensor in tensors.items() if name not in aliases}


def numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
