"""model/layers.py: LowRankLinear against nn.Linear / Conv1D holding W_ref + B @ A."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from inrank_convert.core.errors import NonFiniteError
from inrank_convert.model.layers import LowRankLinear

IN, OUT, RANK = 48, 80, 6


def factors(generator_seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(generator_seed)
    reference = torch.randn(OUT, IN, generator=generator) * 0.1
    B = torch.randn(OUT, RANK, generator=generator) * 0.2
    A = torch.randn(RANK, IN, generator=generator) * 0.2
    bias = torch.randn(OUT, generator=generator)
    return reference.to(dtype), B.to(dtype), A.to(dtype), bias.to(dtype)


def dense_linear(reference, B, A, bias):
    layer = nn.Linear(IN, OUT)
    with torch.no_grad():
        layer.weight.copy_(reference.float() + B.float() @ A.float())
        layer.bias.copy_(bias)
    return layer


def test_matches_linear_float32():
    reference, B, A, bias = factors()
    low_rank = LowRankLinear(A.clone(), B.clone(), reference.clone(), bias.clone())
    x = torch.randn(3, 7, IN)
    assert torch.allclose(low_rank(x), dense_linear(reference, B, A, bias)(x), atol=1e-5)
    assert low_rank.rank == RANK and low_rank(x).shape == (3, 7, OUT)


def test_matches_conv1d_in_its_stored_orientation():
    # Conv1D stores W [in, out]; the artifact's factors are for that orientation: W ~= ref + B @ A.
    generator = torch.Generator().manual_seed(1)
    ref_stored = torch.randn(IN, OUT, generator=generator) * 0.1
    B_stored = torch.randn(IN, RANK, generator=generator)  # [in, r]
    A_stored = torch.randn(RANK, OUT, generator=generator)  # [r, out]
    bias = torch.randn(OUT, generator=generator)
    conv = Conv1D(OUT, IN)
    with torch.no_grad():
        conv.weight.copy_(ref_stored + B_stored @ A_stored)
        conv.bias.copy_(bias)
    low_rank = LowRankLinear.from_stored(B_stored, A_stored, ref_stored, conv1d=True, bias=bias.clone())
    x = torch.randn(2, 5, IN)
    assert torch.allclose(low_rank(x), conv(x), atol=1e-4)
    assert torch.allclose(low_rank.weight, conv.weight.T, atol=1e-5)


def test_zero_reference_is_pure_low_rank():
    _, B, A, bias = factors()
    low_rank = LowRankLinear(A, B, None, bias)
    x = torch.randn(4, IN)
    assert torch.allclose(low_rank(x), x @ (B @ A).T + bias, atol=1e-5)
    no_bias = LowRankLinear(A, B)
    assert torch.allclose(no_bias(x), x @ (B @ A).T, atol=1e-5)


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_loosely_matches(dtype, tolerance):
    reference, B, A, bias = factors(dtype=dtype)
    low_rank = LowRankLinear(A, B, reference, bias)
    x = torch.randn(8, IN)
    expected = dense_linear(reference, B, A, bias)(x)
    got = low_rank(x.to(dtype))
    assert got.dtype == dtype
    assert torch.allclose(got.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("with_reference", [True, False])
def test_merge_and_unmerge_are_idempotent(with_reference):
    reference, B, A, bias = factors()
    low_rank = LowRankLinear(A, B, reference if with_reference else None, bias)
    x = torch.randn(5, IN)
    before = low_rank(x)
    low_rank.merge()
    merged_weight = low_rank.weight_ref.clone()
    low_rank.merge()
    assert low_rank.merged and torch.equal(low_rank.weight_ref, merged_weight)
    assert torch.allclose(low_rank(x), before, atol=1e-5)
    low_rank.unmerge()
    low_rank.unmerge()
    assert not low_rank.merged
    assert (low_rank.weight_ref is None) == (not with_reference)
    if with_reference:
        assert torch.allclose(low_rank.weight_ref, reference, atol=1e-6)
    assert torch.allclose(low_rank(x), before, atol=1e-5)


def test_merge_refuses_non_finite_results():
    reference, B, A, bias = factors()
    B[0, 0] = float("inf")
    low_rank = LowRankLinear(A, B, reference, bias)
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        low_rank.merge()
    assert not low_rank.merged and torch.equal(low_rank.weight_ref, reference)


def test_gradients_reach_the_factors_not_the_reference():
    reference, B, A, bias = factors()
    low_rank = LowRankLinear(A, B, reference, bias)
    low_rank(torch.randn(3, IN)).pow(2).sum().backward()
    assert low_rank.lora_A.grad is not None and low_rank.lora_B.grad is not None
    assert not low_rank.weight_ref.requires_grad
    assert {name for name, _ in low_rank.named_parameters()} == {"lora_A", "lora_B", "bias"}


def test_shape_checks():
    with pytest.raises(ValueError, match="ranks differ"):
        LowRankLinear(torch.zeros(3, IN), torch.zeros(OUT, 4))
    with pytest.raises(ValueError, match="reference shape"):
        LowRankLinear(torch.zeros(3, IN), torch.zeros(OUT, 3), torch.zeros(IN, OUT))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    reference, B, A, bias = factors()
    cpu = LowRankLinear(A, B, reference, bias)
    gpu = LowRankLinear(A.clone(), B.clone(), reference.clone(), bias.clone()).to("cuda", dtype)
    x = torch.randn(4, IN)
    assert torch.allclose(gpu(x.to("cuda", dtype)).float().cpu(), cpu(x), atol=0.1 if dtype != torch.float32 else 1e-4)
