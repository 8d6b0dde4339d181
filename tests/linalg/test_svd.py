"""linalg/svd.py: the exact truncated SVD (optimal error, balanced factors, everything kept at
threshold 1) and its float64 retry when float32 does not converge."""

from __future__ import annotations

import math

import pytest
import torch

from inrank_convert.linalg.criteria import RankRule
from inrank_convert.linalg.factorize import factorize
from tests.conftest import energy_rank_float64
from tests.helpers.spectra import low_rank_plus_noise


def test_truncation_error_is_optimal():
    delta = low_rank_plus_noise(100, 70, rank=8, noise=0.1, seed=5)
    result = factorize(delta, RankRule("energy", 0.9), "exact")
    s = torch.linalg.svdvals(delta.double())
    optimal = math.sqrt(float((s[result.rank:] ** 2).sum()))
    measured = float((delta.double() - result.B.double() @ result.A.double()).norm())
    assert measured == pytest.approx(optimal, rel=1e-4)
    assert result.relative_error == pytest.approx(optimal / float(delta.double().norm()), rel=1e-4)


def test_factors_are_balanced():
    delta = low_rank_plus_noise(60, 90, rank=5, noise=0.01)
    result = factorize(delta, RankRule(fixed_rank=5), "exact")
    # B = U sqrt(S), A = sqrt(S) Vh: both carry the same singular values.
    assert torch.allclose(torch.linalg.svdvals(result.B), torch.linalg.svdvals(result.A), rtol=1e-4)


def test_threshold_one_keeps_everything():
    delta = low_rank_plus_noise(40, 30, rank=30, noise=0.5)
    result = factorize(delta, RankRule("energy", 1.0), "exact")
    assert result.rank == 30
    assert torch.allclose(result.B @ result.A, delta, atol=1e-5)


def test_non_convergence_retries_in_float64_and_says_so():
    calls = []

    def failing_float32_solver(matrix, full_matrices=False):
        calls.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return torch.linalg.svd(matrix, full_matrices=full_matrices)

    delta = low_rank_plus_noise(40, 30, rank=5, noise=0.05)
    result = factorize(delta, RankRule("energy", 0.9), "exact", solver=failing_float32_solver)
    assert calls == [torch.float32]
    assert result.engine == "exact-float64"
    assert any("did not converge" in note and "float64" in note for note in result.notes)
    assert result.rank == energy_rank_float64(delta, 0.9)
