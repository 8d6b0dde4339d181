"""linalg/gram.py: the Gram engine against an exact float64 SVD: the optimal truncation, no factors
past the rank a dense form needs, and its bfloat16 factor product with the error it adds."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.linalg import gram
from inrank_convert.linalg.criteria import RankRule
from inrank_convert.linalg.factorize import factorize
from inrank_convert.linalg.gram import REDUCED_PRODUCT_MIN_TAIL, REDUCED_PRODUCT_MIN_WORK
from tests.conftest import energy_rank_float64
from tests.helpers.spectra import flat_planted_update


def test_auto_hands_high_ranks_to_the_exact_gram_spectrum():
    noise_only = torch.randn(200, 200, generator=torch.Generator().manual_seed(0))
    result = factorize(noise_only, RankRule("energy", 0.99), "auto")
    assert result.engine == "gram"
    assert result.rank == energy_rank_float64(noise_only, 0.99)
    assert result.energy >= 0.99


@pytest.mark.parametrize("shape", [(900, 120), (120, 900)])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_the_gram_engine_is_the_optimal_truncation(shape, threshold):
    """Past the adaptive basis: the rank of the float64 SVD, the optimal error, balanced factors,
    and the leading right singular vectors, for tall and wide updates."""
    delta = flat_planted_update(*shape, 60, 0.3, seed=7)
    found = factorize(delta, RankRule("energy", threshold), "auto", generator=torch.Generator().manual_seed(0))
    assert found.engine == "gram" and found.factored
    assert found.rank == energy_rank_float64(delta, threshold)
    _, s, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    error = torch.linalg.matrix_norm(delta.double() - found.B.double() @ found.A.double())
    assert float(error) == pytest.approx(float(s[found.rank:].square().sum().sqrt()), rel=1e-4)
    assert torch.allclose(found.B.norm(dim=0), found.A.norm(dim=1), rtol=1e-4)
    overlap = (found.right_vectors[:3].double() @ Vh[:3].T).abs()  # [3, 3]: the same directions up to sign
    assert torch.allclose(overlap, torch.eye(3, dtype=torch.float64), atol=1e-4)


def test_the_gram_engine_makes_no_factors_past_max_rank():
    """Dense decided from the eigenvalues alone: no eigenvectors, no B, no full SVD."""
    calls = []

    def counting_svd(matrix, full_matrices=False):
        calls.append(matrix.shape)
        return torch.linalg.svd(matrix, full_matrices=full_matrices)

    noise = torch.randn(400, 400, generator=torch.Generator().manual_seed(3))
    found = factorize(noise, RankRule("energy", 0.9), "auto", generator=torch.Generator().manual_seed(0),
                      solver=counting_svd, max_rank=150)
    assert calls == []
    assert found.engine == "gram" and not found.factored
    assert found.rank == energy_rank_float64(noise, 0.9) > 150
    assert found.B.shape == (400, 0) and found.A.shape == (0, 400)
    assert found.gram.vectors is None  # the rank estimate was already past max_rank: eigenvalues only
    assert found.energy == pytest.approx(0.9, abs=0.01) and found.energy >= 0.9


@pytest.mark.parametrize("shape", [(3000, 160), (160, 3000)])
def test_the_gram_engines_bfloat16_product_measures_the_error_it_adds(shape, monkeypatch):
    """A bfloat16 factor product (``products``): the rank, energy and spectrum of the float32 one
    (the Gram stays float32), the computed factor within bfloat16 rounding of the float32 one, and
    its recorded per-component error equal to the true one (sampled rows, scaled), tall and wide."""
    monkeypatch.setattr(gram, "REDUCED_PRODUCT_MIN_WORK", 0)  # a product this small would stay float32
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    rule = RankRule("energy", 0.9)
    plain = factorize(delta, rule, "auto", generator=torch.Generator().manual_seed(0))
    reduced = factorize(delta, rule, "auto", generator=torch.Generator().manual_seed(0), products=torch.bfloat16)
    assert plain.engine == "gram" and plain.product_error is None
    assert reduced.engine == "gram-bfloat16"
    assert (reduced.rank, reduced.energy) == (plain.rank, plain.energy)
    assert torch.equal(reduced.singular_values, plain.singular_values)
    tall = shape[0] > shape[1]
    computed, exact = (reduced.B, plain.B) if tall else (reduced.A.T, plain.A.T)  # [long, r]
    assert computed.dtype == torch.bfloat16
    true_error = (computed.double() - exact.double()).square().sum(dim=0)  # [r]
    relative = float(true_error.sum() / exact.double().square().sum())
    assert 1e-7 < relative < 4 ** -8, relative  # rounded, but within a few bfloat16 ulps
    assert float(reduced.product_error.sum()) == pytest.approx(float(true_error.sum()), rel=0.05)
    assert torch.equal(reduced.B if not tall else reduced.A, plain.B if not tall else plain.A)  # the other side exact


def test_the_bfloat16_product_is_kept_for_rules_that_drop_enough_on_large_products(monkeypatch):
    """Where the rule keeps more than 1 - REDUCED_PRODUCT_MIN_TAIL of the energy the product's rounding
    would matter next to the truncation's, and below REDUCED_PRODUCT_MIN_WORK multiply-adds it saves
    nothing: float32 in both cases, whatever ``products`` says."""
    delta = torch.randn(3000, 160, generator=torch.Generator().manual_seed(4))
    small = factorize(delta, RankRule("energy", 0.9), "auto", generator=torch.Generator().manual_seed(0),
                      products=torch.bfloat16)
    assert 3000 * 160 * small.rank < REDUCED_PRODUCT_MIN_WORK
    assert small.engine == "gram" and small.product_error is None and small.B.dtype == torch.float32
    monkeypatch.setattr(gram, "REDUCED_PRODUCT_MIN_WORK", 0)
    tight = factorize(delta, RankRule("energy", 0.995), "auto", generator=torch.Generator().manual_seed(0),
                      products=torch.bfloat16)
    assert 1.0 - tight.energy < REDUCED_PRODUCT_MIN_TAIL
    assert tight.engine == "gram" and tight.product_error is None and tight.B.dtype == torch.float32
