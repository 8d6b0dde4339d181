"""Rank criteria and SVD engines against an exact float64 SVD."""

from __future__ import annotations

import math

import pytest
import torch

from inrank_convert.linalg import gram
from inrank_convert.linalg.criteria import (
    RankRule,
    choose_rank,
    frobenius_energy,
    numerical_tolerance,
    rank_for_energy,
    rank_for_inrank,
    stored_as_lowrank,
)
from inrank_convert.linalg.factorize import factorize
from inrank_convert.linalg.gram import REDUCED_PRODUCT_MIN_TAIL, REDUCED_PRODUCT_MIN_WORK
from inrank_convert.linalg.randomized import POWER_ITERATIONS, adaptive_randomized_svd, oversampling
from tests.conftest import energy_rank_float64, inrank_rank_float64


def low_rank_plus_noise(rows: int, cols: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, cols, generator=generator, dtype=torch.float64)
    signal = (left * torch.logspace(0, -1, rank, dtype=torch.float64)) @ right
    signal /= signal.norm()
    extra = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return (signal + extra * (noise / extra.norm())).float()


@pytest.mark.parametrize("shape", [(96, 64), (64, 160), (128, 128)])
@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9, 0.99])
def test_energy_rank_matches_float64_svd(shape, threshold):
    delta = low_rank_plus_noise(*shape, rank=12, noise=0.2)
    expected = energy_rank_float64(delta, threshold)
    for engine in ("exact", "auto"):
        result = factorize(delta, RankRule("energy", threshold), engine)
        assert result.rank == expected, (engine, result.rank, expected)
        assert result.energy >= threshold - 1e-6


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.9, 0.99])
def test_inrank_rank_matches_reference_loop(threshold):
    delta = low_rank_plus_noise(80, 120, rank=10, noise=0.3, seed=3)
    expected = inrank_rank_float64(delta, threshold)
    assert factorize(delta, RankRule("inrank", threshold), "exact").rank == expected
    assert factorize(delta, RankRule("inrank", threshold), "auto").rank == expected
    assert rank_for_inrank(torch.linalg.svdvals(delta.double()), threshold) == expected


def test_inrank_and_energy_criteria_differ_on_a_flat_spectrum():
    # A flat tail carries much energy but no variance: the two rules must not collapse into one.
    s = torch.tensor([10.0, 5.0] + [1.0] * 50)
    total = float((s**2).sum())
    assert rank_for_inrank(s, 0.9) == 2
    assert rank_for_energy(s, total, 0.9) > 2


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


def test_auto_hands_high_ranks_to_the_exact_gram_spectrum():
    noise_only = torch.randn(200, 200, generator=torch.Generator().manual_seed(0))
    result = factorize(noise_only, RankRule("energy", 0.99), "auto")
    assert result.engine == "gram"
    assert result.rank == energy_rank_float64(noise_only, 0.99)
    assert result.energy >= 0.99


def test_fixed_rank_is_clipped_and_exact_for_both_engines():
    delta = low_rank_plus_noise(50, 40, rank=6, noise=0.05)
    assert factorize(delta, RankRule(fixed_rank=500), "exact").rank == 40
    small = factorize(delta, RankRule(fixed_rank=3), "randomized", generator=torch.Generator().manual_seed(0))
    exact = factorize(delta, RankRule(fixed_rank=3), "exact")
    assert small.rank == 3
    error_small = float((delta - small.B @ small.A).norm())
    error_exact = float((delta - exact.B @ exact.A).norm())
    assert error_small <= error_exact * 1.01


def test_zero_update_has_rank_zero():
    result = factorize(torch.zeros(30, 20), RankRule("energy", 0.9), "auto")
    assert result.rank == 0 and result.B.shape == (30, 0) and result.A.shape == (0, 20)


def test_threshold_one_keeps_everything():
    delta = low_rank_plus_noise(40, 30, rank=30, noise=0.5)
    result = factorize(delta, RankRule("energy", 1.0), "exact")
    assert result.rank == 30
    assert torch.allclose(result.B @ result.A, delta, atol=1e-5)


# --------------------------------------------------------------------------- threshold 1: the numerical rank

EPS32 = torch.finfo(torch.float32).eps


def rounded_low_rank(rows: int, cols: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W0, W, delta): an update of exactly rank ``rank`` as compress sees it, delta = (W0 + U @ V) - W0
    in float32 with W0 of ten times the update's norm, so the sum rounds (~eps |W0| per entry)."""
    generator = torch.Generator().manual_seed(seed)
    update = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)
    W0 = torch.randn(rows, cols, generator=generator)
    W0 *= 10 * update.norm() / W0.norm()
    W = W0 + update
    return W0, W, W - W0


ENGINES = ("exact", "randomized", "auto")


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


def test_rank_for_energy_at_threshold_one_is_the_numerical_rank():
    values = torch.tensor([4.0, 2.0, 1e-3, 4e-5, 1e-9])
    total = float((values.double() ** 2).sum())
    tolerance = 4.0 * 100 * EPS32  # 4.8e-5: the last two values are rounding
    assert numerical_tolerance(4.0, 100, EPS32) == pytest.approx(tolerance)
    assert rank_for_energy(values, total, 1.0, size=100, eps=EPS32) == 3
    assert choose_rank(values, total, RankRule("energy", 1.0), size=100, eps=EPS32) == 3
    # Every value above the tolerance: a leading spectrum does not reach it, a full one is full rank.
    assert rank_for_energy(values[:3], total, 1.0, size=100, eps=EPS32) is None
    assert choose_rank(values[:3], total, RankRule("energy", 1.0), size=100, eps=EPS32) == 3
    # Below 1 the energy rule is unchanged: 4^2 + 2^2 = 20 of 20.000001 is 0.99999995 of the energy.
    assert rank_for_energy(values, total, 0.99999999) == 3
    assert rank_for_energy(values, total, 0.9999999) == 2
    assert rank_for_energy(values, total, 0.99) == 2
    with pytest.raises(ValueError, match="size"):
        rank_for_energy(values, total, 1.0)


def test_choose_rank_fixed_ignores_zero_singular_values():
    assert choose_rank(torch.tensor([3.0, 1.0, 0.0, 0.0]), 10.0, RankRule(fixed_rank=4)) == 2


def test_stored_as_lowrank_breakeven():
    assert stored_as_lowrank(31, 64, 64)
    assert not stored_as_lowrank(32, 64, 64)


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("engine", ["exact", "randomized"])
def test_cuda_engines_match_cpu(engine):
    delta = low_rank_plus_noise(300, 200, rank=16, noise=0.1)
    cpu = factorize(delta, RankRule("energy", 0.9), "exact")
    gpu = factorize(delta.cuda(), RankRule("energy", 0.9), engine, generator=torch.Generator("cuda").manual_seed(0))
    assert gpu.B.is_cuda and abs(gpu.rank - cpu.rank) <= 1


def planted_update(rows: int, cols: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    """A rank-``rank`` update with equal singular values plus Gaussian noise of relative energy
    ``noise``: a flat signal over a flat floor, the hardest case for a range finder."""
    generator = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, rank, generator=generator, dtype=torch.float64))
    signal = U @ V.T
    extra = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    extra *= (noise * signal.square().sum() / extra.square().sum()).sqrt()
    return (signal + extra).float()


@pytest.mark.parametrize("rows,cols,rank", [
    (384, 96, 10),  # the case found 1.09% above optimal: a basis of n/8 = 12 left no oversampling
    (96, 384, 10), (32, 32, 4), (64, 256, 8), (512, 512, 40), (1024, 256, 24), (256, 1024, 60),
    (1024, 1024, 100),  # 1.0101x the optimum at t = 0.9 without oversampling
])
@pytest.mark.parametrize("noise", [0.05, 0.3])
@pytest.mark.parametrize("threshold", [0.8, 0.9])
def test_the_auto_engine_is_within_one_percent_of_the_optimal_truncation(rows, cols, rank, noise, threshold):
    delta = planted_update(rows, cols, rank, noise, seed=rows + cols)
    found = factorize(delta, RankRule("energy", threshold), engine="auto", generator=torch.Generator().manual_seed(0))
    assert 0 < found.rank <= min(rows, cols)
    error = torch.linalg.matrix_norm(delta.double() - found.B.double() @ found.A.double())
    optimal = torch.linalg.svdvals(delta.double())[found.rank:].square().sum().sqrt()  # the float64 oracle
    assert error <= 1.01 * optimal, (found.engine, found.rank, float(error / optimal))


@pytest.mark.parametrize("rows,cols,rank", [(384, 96, 10), (96, 384, 10), (64, 256, 8), (512, 512, 40), (1024, 256, 24),
                                            (256, 1024, 60)])
@pytest.mark.parametrize("noise", [0.05, 0.3])
def test_the_fixed_rank_engine_is_within_one_percent_of_the_optimal_truncation(rows, cols, rank, noise):
    """--rank r: the randomized engine (which may stop its power iterations early) at r = the planted rank."""
    delta = planted_update(rows, cols, rank, noise, seed=rows + cols)
    found = factorize(delta, RankRule(fixed_rank=rank), engine="auto", generator=torch.Generator().manual_seed(0))
    assert found.rank == rank
    error = torch.linalg.matrix_norm(delta.double() - found.B.double() @ found.A.double())
    optimal = torch.linalg.svdvals(delta.double())[rank:].square().sum().sqrt()
    assert error <= 1.01 * optimal, (found.engine, found.passes, float(error / optimal))


# Each block of the adaptive engine, refined by all its POWER_ITERATIONS, reads the update
# 2 * POWER_ITERATIONS + 2 times.
FULL_BLOCK_PASSES = 2 * POWER_ITERATIONS + 2


@pytest.mark.parametrize("rows,cols", [(1024, 512), (512, 1024), (2048, 256)])
@pytest.mark.parametrize("rule", [RankRule("energy", 0.9), RankRule(fixed_rank=16)])
def test_a_fast_decaying_spectrum_takes_fewer_passes_at_the_optimal_error(rows, cols, rule):
    """Rank 16 over a noise floor 1% of the energy: one power iteration already finds the range, so
    the engine stops there (4 passes, not 6), and its truncation is within 0.1% of the optimum."""
    delta = planted_update(rows, cols, 16, 0.01, seed=rows)
    found = factorize(delta, rule, engine="auto", generator=torch.Generator().manual_seed(0))
    assert found.engine == "randomized"
    assert found.passes < FULL_BLOCK_PASSES, found.passes
    error = torch.linalg.matrix_norm(delta.double() - found.B.double() @ found.A.double())
    optimal = torch.linalg.svdvals(delta.double())[found.rank:].square().sum().sqrt()
    assert error <= 1.001 * optimal, float(error / optimal)


def test_a_flat_spectrum_gets_every_power_iteration():
    """Rank 40 with equal singular values under 5% noise energy: no gap, so no early stop, neither
    for the energy rule (one block of 64, oversampled from the start) nor for --rank 16 (8 passes)."""
    delta = planted_update(512, 512, 40, 0.05, seed=1024)
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
    first = factorize(planted_update(1024, 512, 30, 0.01, seed=1), RankRule("energy", 0.9), "auto",
                      generator=torch.Generator().manual_seed(0), hints=hints)
    assert first.engine == "randomized" and hints[(1024, 512)] >= first.rank + oversampling(first.rank) > 32
    delta = planted_update(1024, 512, 30, 0.01, seed=2)
    second = factorize(delta, RankRule("energy", 0.9), "auto", generator=torch.Generator().manual_seed(0), hints=hints)
    alone = factorize(delta, RankRule("energy", 0.9), "auto", generator=torch.Generator().manual_seed(0))
    assert second.rank == alone.rank
    assert second.passes < alone.passes, (second.passes, alone.passes)
    error = torch.linalg.matrix_norm(delta.double() - second.B.double() @ second.A.double())
    optimal = torch.linalg.svdvals(delta.double())[second.rank:].square().sum().sqrt()
    assert error <= 1.001 * optimal


def test_a_noise_only_update_leaves_the_randomized_engine_after_two_passes():
    noise = torch.randn(2000, 256, generator=torch.Generator().manual_seed(0))
    found = factorize(noise, RankRule("energy", 0.9), "auto", generator=torch.Generator().manual_seed(0))
    assert found.engine == "gram"
    assert found.passes == 2  # one sketch and its projection, then the estimate says the limit is far off
    assert found.rank == energy_rank_float64(noise, 0.9)


@pytest.mark.parametrize("shape", [(900, 120), (120, 900)])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_the_gram_engine_is_the_optimal_truncation(shape, threshold):
    """Past the adaptive basis: the rank of the float64 SVD, the optimal error, balanced factors,
    and the leading right singular vectors, for tall and wide updates."""
    delta = planted_update(*shape, 60, 0.3, seed=7)
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
