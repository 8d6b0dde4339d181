"""core/tensors.py: dtype names both ways, the bytes a tensor is stored as and their hashes (a
checksum of the bytes alone, a reference hash of dtype, shape and bytes), finiteness checked a block
of rows at a time, and ties found from shared storage."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from inrank_convert.core.tensors import (
    SAFETENSORS_CODES,
    SAFETENSORS_DTYPES,
    aliases_of,
    checksum,
    dtype_from_name,
    dtype_name,
    dtype_size,
    is_finite,
    numel,
    raw_bytes,
    sha256_tensor,
    shared_storage_groups,
    without_aliases,
)


@pytest.mark.parametrize("dtype", sorted(set(SAFETENSORS_DTYPES.values()), key=str))
def test_dtype_names_round_trip_and_sizes(dtype):
    assert dtype_from_name(dtype_name(dtype)) is dtype
    assert SAFETENSORS_DTYPES[SAFETENSORS_CODES[dtype]] is dtype
    assert dtype_size(dtype) == torch.empty(3, dtype=dtype).element_size()


def test_dtype_from_a_name_that_is_no_dtype():
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert dtype_from_name("float99") is None and dtype_from_name("Tensor") is None and dtype_from_name(None) is None


def test_raw_bytes_are_the_row_major_little_endian_data():
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3).T  # not contiguous
    assert bytes(raw_bytes(tensor)) == np.ascontiguousarray(tensor.numpy()).astype("<f4").tobytes()
    assert bytes(raw_bytes(torch.tensor([1.0], dtype=torch.bfloat16))) == b"\x80\x3f"
    assert raw_bytes(torch.zeros(0, 4)) == b""


def test_the_checksum_is_of_the_bytes_and_the_reference_hash_of_dtype_and_shape_too():
    tensor = torch.arange(12, dtype=torch.float32)
    assert checksum(tensor) == hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
    # Same bytes, other shape: one checksum, two reference hashes.
    assert checksum(tensor.reshape(3, 4)) == checksum(tensor)
    assert sha256_tensor(tensor.reshape(3, 4)) != sha256_tensor(tensor)
    # Same bytes, other dtype: int32 0 and float32 0.0 are both four zero bytes.
    zeros = torch.zeros(4, dtype=torch.float32)
    assert checksum(zeros) == checksum(torch.zeros(4, dtype=torch.int32))
    assert sha256_tensor(zeros) != sha256_tensor(torch.zeros(4, dtype=torch.int32))
    changed = tensor.clone()
    changed[5] += 1
    assert checksum(changed) != checksum(tensor) and sha256_tensor(changed) != sha256_tensor(tensor)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_is_found_in_any_block(bad):
    tall = torch.zeros(50, 3)
    assert is_finite(tall, block_rows=7)
    for row in (0, 13, 49):  # in the first, a middle and the last (short) block
        poisoned = tall.clone()
        poisoned[row, 2] = bad
        assert not is_finite(poisoned, block_rows=7), row
    vector = torch.ones(5)
    vector[4] = bad
    assert not is_finite(vector)
    assert is_finite(torch.tensor([1, 2, 3])) and is_finite(torch.zeros(0))


def test_ties_are_names_that_view_one_storage():
    weight = torch.randn(4, 3)
    tensors = {"wte": weight, "bias": torch.zeros(3), "lm_head": weight, "copy": weight.clone(), "again": weight}
    assert shared_storage_groups(tensors) == [["wte", "lm_head", "again"]]
    assert aliases_of(tensors) == {"lm_head": "wte", "again": "wte"}
    assert list(without_aliases(tensors)) == ["wte", "bias", "copy"]
    # A view of other rows, or of the same data in another shape, is no tie.
    assert shared_storage_groups({"a": weight, "b": weight[1:], "c": weight.reshape(3, 4)}) == []


def test_numel():
    assert numel((3, 4, 5)) == 60 and numel(()) == 1 and numel([7, 0]) == 0
