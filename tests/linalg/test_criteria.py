"""linalg/criteria.py: the rank rules (energy, InRank's explained variance, a fixed rank, the
numerical rank at threshold 1) against float64 oracles, and InRank's buffered explained-ratio scan
against the reference's own loop."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.linalg.criteria import (
    RankRule,
    choose_rank,
    inrank_scan,
    numerical_tolerance,
    rank_for_energy,
    rank_for_inrank,
    stored_as_lowrank,
)
from inrank_convert.linalg.factorize import factorize
from inrank_convert.training.rank_control import factor_singular_values
from tests.conftest import dominant_update, energy_rank_float64, form_rank_float64, inrank_rank_float64
from tests.helpers.spectra import EPS32, low_rank_plus_noise


@pytest.mark.parametrize("share", [None, 0.55, 0.75, 0.97])  # none on a threshold: no ties
@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9, 0.99])
def test_the_energy_rules_equal_their_float64_oracles_with_and_without_a_dominant_component(share, threshold):
    """energy: the smallest rank holding t of the energy, whatever the spectrum; energy-rest: the same
    past a dominant leading component, and exactly the energy rule without one."""
    generator = torch.Generator().manual_seed(int(100 * threshold) + int(100 * (share or 0)))
    delta = low_rank_plus_noise(120, 80, rank=12, noise=0.2, seed=5) if share is None \
        else dominant_update((120, 80), 12, 1.0, generator, share)
    values = torch.linalg.svdvals(delta.double())
    total = float(delta.double().square().sum())
    plain, rest = energy_rank_float64(delta, threshold), form_rank_float64(delta, threshold)
    assert choose_rank(values, total, RankRule("energy", threshold)) == plain
    assert choose_rank(values, total, RankRule("energy-rest", threshold)) == rest
    assert factorize(delta, RankRule("energy", threshold), "exact").rank == plain
    if share is None:
        assert rest == plain
    elif threshold < 0.99:
        assert rest > plain  # the planted spectra where the rules part ways


def test_factorize_takes_energy_rest_only_at_a_fixed_rank():
    delta = low_rank_plus_noise(40, 30, rank=4, noise=0.1, seed=1)
    with pytest.raises(ValueError, match="energy-rest"):
        factorize(delta, RankRule("energy-rest", 0.9), "exact")
    assert factorize(delta, RankRule("energy-rest", 0.9, fixed_rank=3), "auto").rank == 3


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


# --------------------------------------------------------------------------- InRank's buffered scan


def reference_scan(s: torch.Tensor, full_rank: int, current: int, buffer: int, max_rank: int, threshold: float) -> int:
    """The reference's loop, literally, in float64: the spectrum zero-padded to the full rank,
    ``1 - var(s - s_k) / var(s)`` with s_k = s zeroed from k on, first k strictly above."""
    padded = torch.zeros(full_rank, dtype=torch.float64)
    padded[: s.numel()] = s.double()
    index = current
    for index in range(current, min(current + buffer, max_rank - buffer)):
        kept = padded.clone()
        kept[index:] = 0
        ratio = 1 - torch.var(padded - kept) / torch.var(padded)
        if ratio > threshold:
            break
    return index


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.99, 1.0])
def test_the_buffer_scan_agrees_with_a_float64_oracle(decay):
    generator = torch.Generator().manual_seed(int(decay * 100))
    checked = 0
    for out_features, in_features, width in [(96, 64, 20), (64, 200, 40), (128, 128, 70)]:
        full = min(out_features, in_features)
        # B @ A with a chosen spectrum: decaying geometrically (1.0: flat, a random product's shape).
        U, _ = torch.linalg.qr(torch.randn(out_features, width, generator=generator, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(in_features, width, generator=generator, dtype=torch.float64))
        values = decay ** torch.arange(width, dtype=torch.float64) * (1 + 0.1 * torch.rand(width, generator=generator, dtype=torch.float64))
        B, A = (U * values).float(), V.T.float()  # [out, k], [k, in]
        oracle_values = torch.linalg.svdvals(B.double() @ A.double())  # full-length spectrum of the product
        measured = factor_singular_values(B, A)  # k values, from thin QRs
        for current in (0, 2, width // 3, width - 12):
            for buffer in (4, 12):
                for threshold in (0.5, 0.9, 0.99):
                    ours = inrank_scan(measured, full, current, buffer, full // 2, threshold)
                    oracle = reference_scan(oracle_values, full, current, buffer, full // 2, threshold)
                    assert ours == oracle, (out_features, in_features, width, current, buffer, threshold)
                    checked += 1
    assert checked == 3 * 4 * 2 * 3


def test_the_scan_grows_by_less_than_the_buffer_and_never_past_the_width_cap():
    flat = torch.ones(60, dtype=torch.float64)  # nothing explains a flat spectrum: every decision grows
    assert inrank_scan(flat, 128, 10, 8, 64, 0.9) == 17  # at most buffer - 1
    assert inrank_scan(flat, 128, 50, 8, 64, 0.9) == 55  # rank + buffer stays within max_rank
    assert inrank_scan(flat, 128, 56, 8, 64, 0.9) == 56  # at the cap: kept
    assert inrank_scan(torch.zeros(10), 128, 3, 8, 64, 0.9) == 3  # an empty update asks for nothing
