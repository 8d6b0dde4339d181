"""linalg/factorize.py: one update's truncated SVD through every engine (exact, randomized, Gram,
auto) against an exact float64 SVD: the rank a rule gives, the numerical rank at threshold 1, and
the hand-overs between engines."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.linalg.criteria import RankRule, numerical_tolerance
from inrank_convert.linalg.factorize import factorize
from tests.conftest import energy_rank_float64
from tests.helpers.spectra import ENGINES, EPS32, flat_planted_update, low_rank_plus_noise, rounded_low_rank


@pytest.mark.parametrize("shape", [(96, 64), (64, 160), (128, 128)])
@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9, 0.99])
def test_energy_rank_matches_float64_svd(shape, threshold):
    delta = low_rank_plus_noise(*shape, rank=12, noise=0.2)
    expected = energy_rank_float64(delta, threshold)
    for engine in ("exact", "auto"):
        result = factorize(delta, RankRule("energy", threshold), engine)
        assert result.rank == expected, (engine, result.rank, expected)
        assert result.energy >= threshold - 1e-6


def test_zero_update_has_rank_zero():
    result = factorize(torch.zeros(30, 20), RankRule("energy", 0.9), "auto")
    assert result.rank == 0 and result.B.shape == (30, 0) and result.A.shape == (0, 20)


# --------------------------------------------------------------------------- threshold 1: the numerical rank


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (300, 200)])
def test_threshold_one_keeps_the_numerical_rank_of_a_rounded_update(engine, shape):
    """The float32 rounding of W0 + U @ V is no rank: every engine keeps rank r (matrix_rank's) and
    the factors still rebuild W to float32 rounding. The old 1e-9 energy slack kept up to all of
    min(rows, cols) here, differently per engine (float32 singular values miss the exact energy
    total by ~1e-7 of it)."""
    checked = 0
    for rank in (1, 4, 8):
        for seed in range(3):
            W0, W, delta = rounded_low_rank(*shape, rank, seed)
            assert int(torch.linalg.matrix_rank(delta)) == rank  # the convention's count, as torch makes it
            found = factorize(delta, RankRule("energy", 1.0), engine, generator=torch.Generator().manual_seed(seed))
            assert found.rank == rank, (rank, seed, found.rank, found.engine)
            # The randomized engine stops on its own (the rounding floor), not by handing over to the exact SVD.
            assert engine == "auto" or found.engine == engine
            rebuilt = W0.double() + found.B.double() @ found.A.double()
            assert float((rebuilt - W.double()).norm()) <= 4 * EPS32 * float(W.double().norm()), (rank, seed)
            checked += 1
    assert checked == 9


@pytest.mark.parametrize("engine", ENGINES)
def test_threshold_one_counts_a_component_by_the_tolerance(engine):
    """A component planted at 10x the matrix_rank tolerance is rank, one at 0.1x is rounding, in every engine."""
    W0, _, delta = rounded_low_rank(96, 160, 4, seed=5)
    generator = torch.Generator().manual_seed(6)
    tolerance = numerical_tolerance(float(torch.linalg.svdvals(delta.double())[0]), 160, EPS32)
    left, right = torch.randn(96, 1, generator=generator), torch.randn(1, 160, generator=generator)
    direction = (left / left.norm()) @ (right / right.norm())  # [96, 160], unit spectral norm
    for scale, expected in ((10.0, 5), (0.1, 4)):
        planted = delta + scale * tolerance * direction
        found = factorize(planted, RankRule("energy", 1.0), engine, generator=torch.Generator().manual_seed(0))
        assert found.rank == expected == int(torch.linalg.matrix_rank(planted)), (scale, found.rank)


def test_threshold_one_tolerance_follows_the_svds_dtype():
    """With --float64 the tolerance is float64's: float32 rounding of W0 + U @ V is then above it (full rank)."""
    _, _, delta = rounded_low_rank(64, 96, 4, seed=1)
    assert factorize(delta, RankRule("energy", 1.0), "exact").rank == 4
    found = factorize(delta, RankRule("energy", 1.0), "exact", float64=True)
    assert found.rank == int(torch.linalg.matrix_rank(delta.double())) == 64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("engine", ["exact", "randomized"])
def test_cuda_engines_match_cpu(engine):
    delta = low_rank_plus_noise(300, 200, rank=16, noise=0.1)
    cpu = factorize(delta, RankRule("energy", 0.9), "exact")
    gpu = factorize(delta.cuda(), RankRule("energy", 0.9), engine, generator=torch.Generator("cuda").manual_seed(0))
    assert gpu.B.is_cuda and abs(gpu.rank - cpu.rank) <= 1


@pytest.mark.parametrize("rows,cols,rank", [
    (384, 96, 10),  # the case found 1.09% above optimal: a basis of n/8 = 12 left no oversampling
    (96, 384, 10), (32, 32, 4), (64, 256, 8), (512, 512, 40), (1024, 256, 24), (256, 1024, 60),
    (1024, 1024, 100),  # 1.0101x the optimum at t = 0.9 without oversampling
])
@pytest.mark.parametrize("noise", [0.05, 0.3])
@pytest.mark.parametrize("threshold", [0.8, 0.9])
def test_the_auto_engine_is_within_one_percent_of_the_optimal_truncation(rows, cols, rank, noise, threshold):
    delta = flat_planted_update(rows, cols, rank, noise, seed=rows + cols)
    found = factorize(delta, RankRule("energy", threshold), engine="auto", generator=torch.Generator().manual_seed(0))
    assert 0 < found.rank <= min(rows, cols)
    error = torch.linalg.matrix_norm(delta.double() - found.B.double() @ found.A.double())
    optimal = torch.linalg.svdvals(delta.double())[found.rank:].square().sum().sqrt()  # the float64 oracle
    assert error <= 1.01 * optimal, (found.engine, found.rank, float(error / optimal))


# Each block of the adaptive engine, refined by all its POWER_ITERATIONS, reads the update
# 2 * POWER_ITERATIONS + 2 times.


def test_a_noise_only_update_leaves_the_randomized_engine_after_two_passes():
    noise = torch.randn(2000, 256, generator=torch.Generator().manual_seed(0))
    found = factorize(noise, RankRule("energy", 0.9), "auto", generator=torch.Generator().manual_seed(0))
    assert found.engine == "gram"
    assert found.passes == 2  # one sketch and its projection, then the estimate says the limit is far off
    assert found.rank == energy_rank_float64(noise, 0.9)


