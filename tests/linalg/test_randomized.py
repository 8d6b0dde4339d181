"""linalg/randomized.py: the adaptive randomized engine and the fixed-rank range finder against an
exact float64 SVD: the rank and error of the exact engine, and as few passes over the update as the
spectrum allows."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.linalg.criteria import RankRule, frobenius_energy
from inrank_convert.linalg.factorize import factorize
from inrank_convert.linalg.randomized import adaptive_randomized_svd, oversampling
from tests.helpers.spectra import FULL_BLOCK_PASSES, flat_planted_update, low_rank_plus_noise


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.95])
def test_randomized_agrees_with_exact(threshold):
    delta = low_rank_plus_noise(512, 384, rank=24, noise=0.15, seed=11)
    exact = factorize(delta, RankRule("energy", threshold), "exact")
    randomized = factorize(delta, RankRule("energy", threshold), "randomized",
                           generator=torch.Generator().manual_seed(0))
    assert randomized.engine == "randomized"
    assert abs(randomized.rank - exact.rank) <= 1
    assert randomized.energy >= threshold - 1e-6
    error_exact = float((delta - exact.B @ exact.A).norm())
    error_randomized = float((delta - randomized.B @ randomized.A).norm())
    assert error_randomized <= error_exact * 1.01 + 1e-6 or randomized.rank > exact.rank


def test_adaptive_range_finder_stops_on_exact_energy():
    delta = low_rank_plus_noise(400, 300, rank=40, noise=0.05, seed=2)
    total = frobenius_energy(delta)
    U, S, Vh = adaptive_randomized_svd(delta, total, 0.9, torch.Generator().manual_seed(1), max_fraction=1.0)
    assert U.shape[1] == S.numel() == Vh.shape[0]
    assert float((S.double() ** 2).sum()) >= 0.9 * total * (1 - 1e-6)
    assert torch.allclose(U.T @ U, torch.eye(U.shape[1]), atol=1e-4)


def test_fixed_rank_is_clipped_and_exact_for_both_engines():
    delta = low_rank_plus_noise(50, 40, rank=6, noise=0.05)
    assert factorize(delta, RankRule(fixed_rank=500), "exact").rank == 40
    small = factorize(delta, RankRule(fixed_rank=3), "randomized", generator=torch.Generator().manual_seed(0))
    exact = factorize(delta, RankRule(fixed_rank=3), "exact")
    assert small.rank == 3
    error_small = float((delta - small.B @ small.A).norm())
    error_exact = float((delta - exact.B @ exact.A).norm())
    assert error_small <= error_exact * 1.01


@pytest.mark.parametrize("rows,cols,rank", [(384, 96, 10), (96, 384, 10), (64, 256, 8), (512, 512, 40), (1024, 256, 24),
                                            (256, 1024, 60)])
@pytest.mark.parametrize("noise", [0.05, 0.3])
def test_the_fixed_rank_engine_is_within_one_percent_of_the_optimal_truncation(rows, cols, rank, noise):
    """--rank r: the randomized engine (which may stop its power iterations early) at r = the planted rank."""
    delta = flat_planted_update(rows, cols, rank, noise, seed=rows + cols)
    found = factorize(delta, RankRule(fixed_rank=rank), engine="auto", generator=torch.Generator().manual_seed(0))
    assert found.rank == rank
    error = torch.linalg.matrix_norm(delta.double() - found.B.double() @ found.A.double())
    optimal = torch.linalg.svdvals(delta.double())[rank:].square().sum().sqrt()
    assert error <= 1.01 * optimal, (found.engine, found.passes, float(error / optimal))


@pytest.mark.parametrize("rows,cols", [(1024, 512), (512, 1024), (2048, 256)])
@pytest.mark.parametrize("rule", [RankRule("energy", 0.9), RankRule(fixed_rank=16)])
def test_a_fast_decaying_spectrum_takes_fewer_passes_at_the_optimal_error(rows, cols, rule):
    """Rank 16 over a noise floor 1% of the energy: one power iteration already finds the range, so
    the engine stops there (4 passes, not 6), and its truncation is within 0.1% of the optimum."""
    delta = flat_planted_update(rows, cols, 16, 0.01, seed=rows)
    found = factorize(delta, rule, engine="auto", generator=torch.Generator().manual_seed(0))
    assert found.engine == "randomized"
    assert found.passes < FULL_BLOCK_PASSES, found.passes
    error = torch.linalg.matrix_norm(delta.double() - found.B.double() @ found.A.double())
    optimal = torch.linalg.svdvals(delta.double())[found.rank:].square().sum().sqrt()
    assert error <= 1.001 * optimal, float(error / optimal)


def test_a_flat_spectrum_gets_every_power_iteration():
    """Rank 40 with equal singular values under 5% noise energy: no gap, so no early stop, neither
    for the energy rule (one block of 64, oversampled from the start) nor for --rank 16 (8 passes)."""
    delta = flat_planted_update(512, 512, 40, 0.05, seed=1024)
    found = factorize(delta, RankRule("energy", 0.9), engine="auto", generator=torch.Generator().manual_seed(0),
                      hints={(512, 512): 64})
    assert found.engine == "randomized" and found.rank + oversampling(found.rank) <= 64
    assert found.passes == FULL_BLOCK_PASSES
    fixed = factorize(delta, RankRule(fixed_rank=16), engine="auto", generator=torch.Generator().manual_seed(0))
    assert fixed.passes == FULL_BLOCK_PASSES + 2  # one power iteration more than a block of the adaptive engine


def test_an_update_of_the_same_shape_starts_with_the_last_basis():
    """The first rank-30 update needs a second block for its oversampling (32 directions, then the
    ones missing); the next of that shape starts with the basis the first ended with: one block."""
    hints: dict = {}
    first = factorize(flat_planted_update(1024, 512, 30, 0.01, seed=1), RankRule("energy", 0.9), "auto",
                      generator=torch.Generator().manual_seed(0), hints=hints)
    assert first.engine == "randomized" and hints[(1024, 512)] >= first.rank + oversampling(first.rank) > 32
    delta = flat_planted_update(1024, 512, 30, 0.01, seed=2)
    second = factorize(delta, RankRule("energy", 0.9), "auto", generator=torch.Generator().manual_seed(0), hints=hints)
    alone = factorize(delta, RankRule("energy", 0.9), "auto", generator=torch.Generator().manual_seed(0))
    assert second.rank == alone.rank
    assert second.passes < alone.passes, (second.passes, alone.passes)
    error = torch.linalg.matrix_norm(delta.double() - second.B.double() @ second.A.double())
    optimal = torch.linalg.svdvals(delta.double())[second.rank:].square().sum().sqrt()
    assert error <= 1.001 * optimal
