"""linalg/forms.py: the stored forms (zero, low rank, low rank + rows, dense) on real torch tensors,
the rule that a dominant component cannot satisfy alone, early dense decisions without a full SVD,
and the forms of a size a budget allocated.

The central case is the one the rows form exists for: a tall update (an embedding) whose energy
is almost all one drift shared by every row, plus individual updates on a few rows.
"""

from __future__ import annotations

import pytest
import torch

from inrank_convert.artifact.storage import round_trip
from inrank_convert.linalg import criteria, forms
from inrank_convert.linalg.criteria import RankRule, effective_threshold
from inrank_convert.linalg.forms import Costs, choose_form
from inrank_convert.linalg.stored_error import stored_error
from tests.helpers.forms import (
    BF16,
    INDEX,
    THRESHOLD,
    bf16_costs,
    bf16_source_costs,
    counting_svd,
    drift_plus_rows,
    energy,
    form_bytes,
    planted_drift_and_rows,
    planted_low_rank,
    stored_product,
)

# --------------------------------------------------------------------------- the dominant drift


def test_planted_update_has_a_dominant_component(planted):
    delta, _, total, values = planted
    leading_share = float(values[0] ** 2) / total
    assert leading_share > 0.9
    dominant, effective = effective_threshold(values, total, THRESHOLD)
    assert dominant == 1
    assert effective == pytest.approx((float(values[0] ** 2) + THRESHOLD * (total - float(values[0] ** 2))) / total,
                                      rel=1e-12)


def test_effective_threshold_stays_one_at_one_and_below_one_below():
    """Threshold 1's energy rule is the numerical rank: the dominant rule's fraction must neither
    round up to 1 from below (switching it on) nor down from 1 (switching it off)."""
    values = torch.tensor([3.0, 1e-20])  # the leading component holds all of the energy a float can say
    total = float((values.double() ** 2).sum())
    assert effective_threshold(values, total, 0.9) == (1, pytest.approx(1.0))
    assert effective_threshold(values, total, 0.9)[1] < 1.0
    assert effective_threshold(values, total, 1.0) == (1, 1.0)


def test_plain_energy_rule_keeps_only_the_drift(planted):
    """The failure the new criterion exists for: at 0.9 the plain rule is met by the drift alone,
    which throws away every token's own update."""
    _, _, total, values = planted
    assert criteria.choose_rank(values, total, RankRule("energy", THRESHOLD)) == 1


@pytest.mark.parametrize("engine", ["exact", "auto"])
def test_planted_update_is_stored_as_rank_one_plus_rows(planted, engine):
    delta, index, total, values = planted
    rows, cols = delta.shape
    costs = bf16_costs(delta)
    form = choose_form(delta, total, RankRule("energy-rest", THRESHOLD), costs, engine=engine,
                       generator=torch.Generator().manual_seed(3))
    assert form.kind == "lowrank+rows", form.notes
    assert form.rank == 1 and form.B.shape == (rows, 1) and form.A.shape == (1, cols)

    # The rule: keep the dominant component and THRESHOLD of the energy left after it.
    dominant_energy = float(values[0] ** 2)
    target = dominant_energy + THRESHOLD * (total - dominant_energy)
    kept = 1.0 - energy(delta.double() - stored_product(form, rows, cols)) / total
    assert kept * total >= target * (1 - 1e-6), (kept, target / total)
    assert form.energy == pytest.approx(kept, abs=1e-6)
    assert form.energy * total >= target * (1 - 1e-6)

    # The rows are the planted ones: every chosen row is planted, and nearly all planted rows are chosen.
    chosen = set(form.row_index.tolist())
    assert form.row_index.dtype == torch.int64 and form.row_index.numel() == len(chosen)
    assert torch.equal(form.row_index, torch.sort(form.row_index).values)
    assert chosen <= set(index.tolist())
    assert len(chosen) >= 0.85 * index.numel()
    assert form.rows.shape == (len(chosen), cols)

    # Cheaper than plain low rank at the rank the rule needs, and than dense.
    form_bytes = 1 * (rows + cols) * BF16 + len(chosen) * (cols * BF16 + INDEX)
    assert form_bytes == costs.lowrank(1, rows, cols) + costs.row_set(len(chosen), cols)
    _, effective = effective_threshold(values, total, THRESHOLD)
    lowrank_rank = criteria.choose_rank(values, total, RankRule("energy", effective))
    assert lowrank_rank > 1
    lowrank_bytes = lowrank_rank * (rows + cols) * BF16
    assert form_bytes < lowrank_bytes
    assert form_bytes < costs.dense


def test_plain_low_rank_at_the_rule_would_meet_it_too(planted):
    """The comparison above is fair: low rank at the effective threshold does meet the rule."""
    delta, _, total, values = planted
    _, effective = effective_threshold(values, total, THRESHOLD)
    rank = criteria.choose_rank(values, total, RankRule("energy", effective))
    assert float((values[:rank] ** 2).sum()) >= effective * total * (1 - 1e-9)
    assert float((values[:rank - 1] ** 2).sum()) < effective * total


def test_low_rank_wins_when_rows_do_not_pay(planted):
    """A tall update whose individual part is on every row: rows cannot compete, low rank keeps the rule."""
    generator = torch.Generator().manual_seed(5)
    rows, cols = 2000, 32
    drift = torch.ones(rows, 1) @ torch.randn(1, cols, generator=generator)
    spread = torch.randn(rows, 2, generator=generator) @ torch.randn(2, cols, generator=generator)
    delta = drift + spread * (0.2 * drift.norm() / spread.norm())
    total = energy(delta)
    values = torch.linalg.svdvals(delta.double())
    dominant, effective = effective_threshold(values, total, THRESHOLD)
    assert dominant == 1
    form = choose_form(delta, total, RankRule("energy-rest", THRESHOLD), bf16_costs(delta), engine="exact")
    assert form.kind == "lowrank", form.notes
    assert form.rank == criteria.choose_rank(values, total, RankRule("energy", effective)) > 1
    assert form.rows is None and form.stored_rows == 0


# --------------------------------------------------------------------------- no dominant component


@pytest.mark.parametrize("threshold", [0.6, 0.9, 0.99])
def test_no_dominant_component_gives_the_plain_rank(threshold):
    """Rank 4 with equal singular values (+ tiny noise): the new criterion changes nothing."""
    generator = torch.Generator().manual_seed(11)
    rows, cols, rank = 96, 64, 4
    left, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(cols, rank, generator=generator))
    signal = left @ right.T  # singular values all 1
    noise = torch.randn(rows, cols, generator=generator)
    delta = (signal + noise * (1e-3 * signal.norm() / noise.norm())).float()
    total = energy(delta)
    values = torch.linalg.svdvals(delta.double())
    dominant, effective = effective_threshold(values, total, threshold)
    assert dominant == 0 and effective == threshold
    plain = criteria.choose_rank(values, total, RankRule("energy", threshold))
    assert plain == (3 if threshold == 0.6 else 4)
    form = choose_form(delta, total, RankRule("energy-rest", threshold), bf16_costs(delta), engine="exact")
    assert form.kind == "lowrank", form.notes
    assert form.rank == plain
    assert form.energy == pytest.approx(float((values[:plain] ** 2).sum()) / total, abs=1e-5)


def test_full_rank_random_update_is_not_stored_as_rows():
    """90% of a Gaussian update's energy needs ~90% of its rows: more than MAX_ROW_FRACTION, so no
    rows form even where those rows would cost fewer bytes than the low rank that is chosen."""
    generator = torch.Generator().manual_seed(2)
    rows, cols = 200, 400
    delta = torch.randn(rows, cols, generator=generator)
    total = energy(delta)
    values = torch.linalg.svdvals(delta.double())
    costs = bf16_costs(delta)
    row_energy = torch.sort(delta.double().pow(2).sum(dim=1), descending=True).values
    needed = int(torch.nonzero(torch.cumsum(row_energy, 0) >= THRESHOLD * total)[0, 0]) + 1
    assert needed > forms.MAX_ROW_FRACTION * rows
    rank = criteria.choose_rank(values, total, RankRule("energy", THRESHOLD))
    assert costs.row_set(needed, cols) < costs.lowrank(rank, rows, cols) < costs.dense  # rows would be cheapest
    form = choose_form(delta, total, RankRule("energy-rest", THRESHOLD), costs, engine="exact")
    assert form.kind == "lowrank", form.notes
    assert form.rank == rank
    assert form.rows is None and form.row_index is None


# --------------------------------------------------------------------------- forced rows, zero, errors


@pytest.mark.parametrize("rule", [RankRule("energy-rest", THRESHOLD), RankRule("energy-rest", THRESHOLD, fixed_rank=2),
                                  RankRule("inrank", THRESHOLD)])
def test_forced_rows_are_always_stored(planted, rule):
    delta, index, total, _ = planted
    rows, cols = delta.shape
    untouched = sorted(set(range(rows)) - set(index.tolist()))
    forced = torch.tensor([untouched[0], untouched[1], untouched[-1]])
    form = choose_form(delta, total, rule, bf16_costs(delta), engine="exact", forced_rows=forced)
    assert form.kind == "lowrank+rows", form.notes
    assert set(forced.tolist()) <= set(form.row_index.tolist())
    assert torch.equal(form.row_index, torch.sort(form.row_index).values)
    # A forced row is stored exactly: after B @ A it holds the rest of that row.
    position = {row: k for k, row in enumerate(form.row_index.tolist())}
    for row in forced.tolist():
        rebuilt = form.B[row] @ form.A + form.rows[position[row]]
        assert torch.allclose(rebuilt, delta[row], atol=1e-5 * float(delta.abs().max()))


def test_forced_rows_of_a_low_rank_update(planted):
    """Forced rows (a grown vocabulary) make a plain low-rank update low rank + rows, never plain low rank."""
    generator = torch.Generator().manual_seed(4)
    delta = (torch.randn(120, 3, generator=generator) @ torch.randn(3, 48, generator=generator)).float()
    forced = torch.arange(110, 120)
    form = choose_form(delta, energy(delta), RankRule("energy-rest", THRESHOLD), bf16_costs(delta), engine="exact",
                       forced_rows=forced)
    assert form.kind == "lowrank+rows", form.notes
    assert set(forced.tolist()) <= set(form.row_index.tolist())


@pytest.mark.parametrize("rule", [RankRule("energy-rest", THRESHOLD), RankRule("energy-rest", 1.0), RankRule("inrank", 0.9),
                                  RankRule("energy-rest", THRESHOLD, fixed_rank=3)])
def test_zero_update_is_zero(rule):
    delta = torch.zeros(50, 20)
    form = choose_form(delta, 0.0, rule, bf16_costs(delta), engine="exact")
    assert form.kind == "zero"
    assert form.B is None and form.rows is None and form.rank == 0


def test_dense_when_nothing_is_smaller():
    """A small square full-rank update at a high threshold: no form beats the tensor itself."""
    generator = torch.Generator().manual_seed(6)
    delta = torch.randn(16, 16, generator=generator)
    costs = Costs(element=4, vector=0, dense=delta.numel() * 4)  # float32 factors of a float32 tensor
    form = choose_form(delta, energy(delta), RankRule("energy-rest", 0.999), costs, engine="exact")
    assert form.kind == "dense", form.notes
    assert form.B is None and form.rows is None


# --------------------------------------------------------------------------- early dense


def test_a_noise_only_update_past_the_break_even_is_dense_without_a_full_svd():
    """A full-rank update whose 90% needs ~70% of the rank of a square matrix (break-even: 50%):
    dense, decided from the Gram's eigenvalues, no full SVD, as the exact engine decides it."""
    delta = torch.randn(512, 512, generator=torch.Generator().manual_seed(1))
    total, costs = energy(delta), bf16_source_costs(delta)
    calls: list = []
    form = choose_form(delta, total, RankRule("energy-rest", THRESHOLD), costs, engine="auto", solver=counting_svd(calls))
    assert calls == []
    assert form.kind == "dense" and form.engine == "gram", form.notes
    assert form.rank > costs.breakeven_rank(512, 512)
    assert any("no factors computed" in note for note in form.notes)
    reference_calls: list = []
    exact = choose_form(delta, total, RankRule("energy-rest", THRESHOLD), costs, engine="exact",
                        solver=counting_svd(reference_calls))
    assert reference_calls == [(512, 512)]  # the full SVD the same decision costs without the Gram engine
    assert (exact.kind, exact.rank) == (form.kind, form.rank)


def test_a_noise_only_embedding_near_the_break_even_keeps_its_low_rank_and_says_so():
    """Embedding-shaped noise (tall, 3000 x 96): 90% of its energy needs ~85% of the rank, just under
    the break-even (93): low rank still pays a little, so it is kept (the same rank and bytes as the
    exact engine), with no full SVD, and the form says the rank is near the break-even."""
    delta = torch.randn(3000, 96, generator=torch.Generator().manual_seed(2))
    total, costs = energy(delta), bf16_source_costs(delta)
    calls: list = []
    form = choose_form(delta, total, RankRule("energy-rest", THRESHOLD), costs, engine="auto", solver=counting_svd(calls))
    exact = choose_form(delta, total, RankRule("energy-rest", THRESHOLD), costs, engine="exact")
    assert calls == []
    assert form.kind == exact.kind == "lowrank" and form.engine == "gram"
    assert form.rank == exact.rank < costs.breakeven_rank(3000, 96)
    assert form_bytes(form, costs, 3000, 96) == form_bytes(exact, costs, 3000, 96) >= forms.NEAR_BREAKEVEN * costs.dense
    assert any(note.startswith(forms.BREAKEVEN_MARK) for note in form.notes), form.notes
    assert not any(note.startswith(forms.BREAKEVEN_MARK) for note in choose_form(
        *planted_low_rank(), RankRule("energy", THRESHOLD), bf16_costs(planted_low_rank()[0])).notes)
    B, A, _ = round_trip(form.B, form.A, None, "bfloat16")
    assert stored_error(delta, total, B, A, None, None) <= (1 - THRESHOLD) ** 0.5 * 1.001


PLANTED_CASES = {
    "noise-only embedding": lambda: (lambda d: (d, energy(d)))(torch.randn(3000, 96, generator=torch.Generator().manual_seed(4))),
    "rank-1 drift + rows": lambda: (lambda d: (d, energy(d)))(planted_drift_and_rows()[0]),
    "rank-32 + 5% noise projection": lambda: planted_low_rank(1536, 512),  # randomized: 38 directions of 64
}


@pytest.mark.parametrize("case", list(PLANTED_CASES))
@pytest.mark.parametrize("threshold", [0.8, 0.9, 0.95])
def test_the_auto_engine_chooses_the_exact_engines_form(case, threshold):
    """The planted cases: the auto engine (randomized, Gram, early dense) chooses the
    form, rank and stored rows the exact SVD leads to, at no more bytes, keeping the rule."""
    delta, total = PLANTED_CASES[case]()
    rows, cols = delta.shape
    costs = bf16_source_costs(delta)
    rule = RankRule("energy-rest", threshold)
    fast = choose_form(delta, total, rule, costs, engine="auto", generator=torch.Generator().manual_seed(0))
    exact = choose_form(delta, total, rule, costs, engine="exact")
    assert (fast.kind, fast.rank, fast.stored_rows) == (exact.kind, exact.rank, exact.stored_rows), (fast.notes, exact.notes)
    assert form_bytes(fast, costs, rows, cols) <= form_bytes(exact, costs, rows, cols)
    if fast.kind != "dense":
        values = torch.linalg.svdvals(delta.double())
        _, effective = effective_threshold(values, total, threshold)
        kept = 1 - stored_error(delta, total, fast.B, fast.A, fast.rows, fast.row_index) ** 2
        assert kept >= effective - 1e-5


# --------------------------------------------------------------------------- forms of a given size


def test_allocated_forms_have_the_sizes_asked_for():
    delta = drift_plus_rows()
    total = float(delta.double().pow(2).sum())
    costs = Costs(2, 0, delta.numel() * 4)
    lowrank = choose_form(delta, total, RankRule(), costs, "exact", allocation=(3, None))
    assert lowrank.kind == "lowrank" and lowrank.rank == 3 and lowrank.B.shape == (600, 3)
    rows = choose_form(delta, total, RankRule(), costs, "exact", allocation=(1, 25))
    assert rows.kind == "lowrank+rows" and rows.rank == 1 and rows.stored_rows == 25
    assert rows.energy > lowrank.energy  # the planted rows are what low rank cannot keep
    rank_only = choose_form(delta, total, RankRule(), costs, "exact", allocation=(1, 0))
    assert rank_only.kind == "lowrank" and rank_only.rank == 1
    assert choose_form(delta, total, RankRule(), costs, "exact", allocation=(0, 0)).kind == "zero"
    assert choose_form(delta, total, RankRule(), costs, "exact", allocation=(0, None)).kind == "zero"
