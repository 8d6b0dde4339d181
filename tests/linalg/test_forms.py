"""The planner's stored forms (``inrank_convert.forms``) on real torch tensors: zero, low rank,
low rank + rows and dense, the rule that a dominant component cannot satisfy alone, and the
error of what is stored.

The central case is the one the rows form exists for: a tall update (an embedding) whose energy
is almost all one drift shared by every row, plus individual updates on a few rows.
"""

from __future__ import annotations

import pytest
import torch

from inrank_convert.artifact.storage import encode_factors, round_trip
from inrank_convert.linalg import criteria, forms, gram
from inrank_convert.linalg.criteria import RankRule
from inrank_convert.linalg.forms import Costs, choose_form, effective_threshold
from inrank_convert.linalg.stored_error import stored_error, svd_stored_error

THRESHOLD = 0.9
BF16 = 2  # bytes per stored number at the default (bfloat16) storage
INDEX = 8  # bytes of a stored row's int64 index


def energy(delta: torch.Tensor) -> float:
    return float(delta.double().pow(2).sum())


def bf16_costs(delta: torch.Tensor) -> Costs:
    """bfloat16 factors and rows of a float32 source tensor."""
    return Costs(element=BF16, vector=0, dense=delta.numel() * 4)


def scattered(rows: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    dense = torch.zeros(rows, values.shape[1], dtype=values.dtype)
    dense[index] = values
    return dense


def stored_product(form: forms.Form, rows: int, cols: int) -> torch.Tensor:
    """B @ A (+ the rows in their places) in float64: what the form stores, before rounding."""
    product = form.B.double() @ form.A.double() if form.B is not None else torch.zeros(rows, cols, dtype=torch.float64)
    if form.rows is not None:
        product = product + scattered(rows, form.row_index, form.rows.double())
    return product


def planted_drift_and_rows(rows: int = 2000, cols: int = 32, planted: int = 100, drift_share: float = 0.95,
                           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta [rows, cols] float32, the planted row indices): the same drift vector added to every row,
    holding ``drift_share`` of the energy, plus an update of one common norm in a random direction
    on ``planted`` rows (an embedding: every token drifts, the tokens the text shows move on their own)."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(1, cols, generator=generator)
    drift = torch.ones(rows, 1) @ direction  # rank 1
    index = torch.randperm(rows, generator=generator)[:planted]
    own = torch.randn(planted, cols, generator=generator)
    own = own / own.norm(dim=1, keepdim=True)
    row_energy = energy(drift) * (1 - drift_share) / drift_share / planted
    delta = drift.clone()
    delta[index] += own * row_energy**0.5
    return delta, index


@pytest.fixture(scope="module")
def planted():
    delta, index = planted_drift_and_rows()
    total = energy(delta)
    values = torch.linalg.svdvals(delta.double())  # float64 reference spectrum
    return delta, index, total, values


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
    form = choose_form(delta, total, RankRule("energy", THRESHOLD), costs, engine=engine,
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
    form = choose_form(delta, total, RankRule("energy", THRESHOLD), bf16_costs(delta), engine="exact")
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
    form = choose_form(delta, total, RankRule("energy", threshold), bf16_costs(delta), engine="exact")
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
    form = choose_form(delta, total, RankRule("energy", THRESHOLD), costs, engine="exact")
    assert form.kind == "lowrank", form.notes
    assert form.rank == rank
    assert form.rows is None and form.row_index is None


# --------------------------------------------------------------------------- forced rows, zero, errors


@pytest.mark.parametrize("rule", [RankRule("energy", THRESHOLD), RankRule("energy", THRESHOLD, fixed_rank=2),
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
    form = choose_form(delta, energy(delta), RankRule("energy", THRESHOLD), bf16_costs(delta), engine="exact",
                       forced_rows=forced)
    assert form.kind == "lowrank+rows", form.notes
    assert set(forced.tolist()) <= set(form.row_index.tolist())


@pytest.mark.parametrize("rule", [RankRule("energy", THRESHOLD), RankRule("energy", 1.0), RankRule("inrank", 0.9),
                                  RankRule("energy", THRESHOLD, fixed_rank=3)])
def test_zero_update_is_zero(rule):
    delta = torch.zeros(50, 20)
    form = choose_form(delta, 0.0, rule, bf16_costs(delta), engine="exact")
    assert form.kind == "zero"
    assert form.B is None and form.rows is None and form.rank == 0


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_stored_error_is_the_relative_error_of_what_is_read_back(planted, storage):
    delta, _, total, _ = planted
    rows, cols = delta.shape
    form = choose_form(delta, total, RankRule("energy", THRESHOLD), bf16_costs(delta), engine="exact")
    assert form.kind == "lowrank+rows"
    B, A, stored_rows = round_trip(form.B, form.A, form.rows, storage)
    # Small blocks, so that the blockwise walk crosses many block boundaries.
    measured = stored_error(delta, total, B, A, stored_rows, form.row_index, block=300)
    rebuilt = B.double() @ A.double() + scattered(rows, form.row_index, stored_rows.double())
    direct = (energy(delta.double() - rebuilt) / total) ** 0.5
    assert measured == pytest.approx(direct, rel=1e-4, abs=1e-7)
    # The truncation alone: the error the kept energy implies.
    assert stored_error(delta, total, form.B, form.A, form.rows, form.row_index) == pytest.approx(
        (1 - form.energy) ** 0.5, rel=1e-3)


def test_stored_error_of_a_plain_low_rank_form():
    generator = torch.Generator().manual_seed(9)
    delta = torch.randn(64, 40, generator=generator)
    total = energy(delta)
    form = choose_form(delta, total, RankRule("energy", THRESHOLD), bf16_costs(delta), engine="exact")
    assert form.kind == "lowrank"
    direct = (energy(delta.double() - form.B.double() @ form.A.double()) / total) ** 0.5
    assert stored_error(delta, total, form.B, form.A, None, None) == pytest.approx(direct, rel=1e-4)
    assert stored_error(torch.zeros(4, 4), 0.0, torch.zeros(4, 0), torch.zeros(0, 4), None, None) == 0.0


def test_dense_when_nothing_is_smaller():
    """A small square full-rank update at a high threshold: no form beats the tensor itself."""
    generator = torch.Generator().manual_seed(6)
    delta = torch.randn(16, 16, generator=generator)
    costs = Costs(element=4, vector=0, dense=delta.numel() * 4)  # float32 factors of a float32 tensor
    form = choose_form(delta, energy(delta), RankRule("energy", 0.999), costs, engine="exact")
    assert form.kind == "dense", form.notes
    assert form.B is None and form.rows is None


# --------------------------------------------------------------------------- early dense (issue 14)


def counting_svd(calls: list):
    """torch.linalg.svd, counted: the full SVDs a decision took (factorize's ``solver``)."""
    def solver(matrix, full_matrices=False):
        calls.append(tuple(matrix.shape))
        return torch.linalg.svd(matrix, full_matrices=full_matrices)
    return solver


def bf16_source_costs(delta: torch.Tensor) -> Costs:
    """bfloat16 factors of a bfloat16 source (dense = 2 bytes a number): break-even near r (m + n) = m n."""
    return Costs(element=BF16, vector=0, dense=delta.numel() * BF16)


def form_bytes(form: forms.Form, costs: Costs, rows: int, cols: int) -> int:
    if form.kind == "dense":
        return costs.dense
    return costs.lowrank(form.rank, rows, cols) + costs.row_set(form.stored_rows, cols)


def test_a_noise_only_update_past_the_break_even_is_dense_without_a_full_svd():
    """A full-rank update whose 90% needs ~70% of the rank of a square matrix (break-even: 50%):
    dense, decided from the Gram's eigenvalues, no full SVD, as the exact engine decides it."""
    delta = torch.randn(512, 512, generator=torch.Generator().manual_seed(1))
    total, costs = energy(delta), bf16_source_costs(delta)
    calls: list = []
    form = choose_form(delta, total, RankRule("energy", THRESHOLD), costs, engine="auto", solver=counting_svd(calls))
    assert calls == []
    assert form.kind == "dense" and form.engine == "gram", form.notes
    assert form.rank > costs.breakeven_rank(512, 512)
    assert any("no factors computed" in note for note in form.notes)
    reference_calls: list = []
    exact = choose_form(delta, total, RankRule("energy", THRESHOLD), costs, engine="exact",
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
    form = choose_form(delta, total, RankRule("energy", THRESHOLD), costs, engine="auto", solver=counting_svd(calls))
    exact = choose_form(delta, total, RankRule("energy", THRESHOLD), costs, engine="exact")
    assert calls == []
    assert form.kind == exact.kind == "lowrank" and form.engine == "gram"
    assert form.rank == exact.rank < costs.breakeven_rank(3000, 96)
    assert form_bytes(form, costs, 3000, 96) == form_bytes(exact, costs, 3000, 96) >= forms.NEAR_BREAKEVEN * costs.dense
    assert any(note.startswith(forms.BREAKEVEN_MARK) for note in form.notes), form.notes
    assert not any(note.startswith(forms.BREAKEVEN_MARK) for note in choose_form(
        *planted_low_rank(), RankRule("energy", THRESHOLD), bf16_costs(planted_low_rank()[0])).notes)
    B, A, _ = round_trip(form.B, form.A, None, "bfloat16")
    assert stored_error(delta, total, B, A, None, None) <= (1 - THRESHOLD) ** 0.5 * 1.001


def planted_low_rank(rows: int = 768, cols: int = 256, rank: int = 32, noise: float = 0.05,
                     seed: int = 3) -> tuple[torch.Tensor, float]:
    """(delta, its energy): a rank-32 update (random factors) with ``noise`` of its energy as Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    signal = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)
    extra = torch.randn(rows, cols, generator=generator)
    delta = signal / signal.norm() * (1 - noise) ** 0.5 + extra / extra.norm() * noise**0.5
    return delta, energy(delta)


PLANTED_CASES = {
    "noise-only embedding": lambda: (lambda d: (d, energy(d)))(torch.randn(3000, 96, generator=torch.Generator().manual_seed(4))),
    "rank-1 drift + rows": lambda: (lambda d: (d, energy(d)))(planted_drift_and_rows()[0]),
    "rank-32 + 5% noise projection": lambda: planted_low_rank(1536, 512),  # randomized: 38 directions of 64
}


@pytest.mark.parametrize("case", list(PLANTED_CASES))
@pytest.mark.parametrize("threshold", [0.8, 0.9, 0.95])
def test_the_auto_engine_chooses_the_exact_engines_form(case, threshold):
    """The planted cases of issue 14: the auto engine (randomized, Gram, early dense) chooses the
    form, rank and stored rows the exact SVD leads to, at no more bytes, keeping the rule."""
    delta, total = PLANTED_CASES[case]()
    rows, cols = delta.shape
    costs = bf16_source_costs(delta)
    rule = RankRule("energy", threshold)
    fast = choose_form(delta, total, rule, costs, engine="auto", generator=torch.Generator().manual_seed(0))
    exact = choose_form(delta, total, rule, costs, engine="exact")
    assert (fast.kind, fast.rank, fast.stored_rows) == (exact.kind, exact.rank, exact.stored_rows), (fast.notes, exact.notes)
    assert form_bytes(fast, costs, rows, cols) <= form_bytes(exact, costs, rows, cols)
    if fast.kind != "dense":
        values = torch.linalg.svdvals(delta.double())
        _, effective = effective_threshold(values, total, threshold)
        kept = 1 - stored_error(delta, total, fast.B, fast.A, fast.rows, fast.row_index) ** 2
        assert kept >= effective - 1e-5


@pytest.mark.parametrize("engine", ["exact", "randomized", "auto"])
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_the_stored_error_of_svd_factors_from_their_norms(engine, storage):
    """svd_stored_error (no [rows, cols] product) agrees with the measured stored error."""
    delta, total = planted_low_rank(noise=0.3)
    form = choose_form(delta, total, RankRule("energy", THRESHOLD), bf16_costs(delta), engine=engine,
                       generator=torch.Generator().manual_seed(0))
    assert form.kind == "lowrank" and form.svd_factors
    B, A, _ = round_trip(form.B, form.A, None, storage)
    measured = stored_error(delta, total, B, A, None, None)
    assert svd_stored_error(total, form.B, form.A, B, A) == pytest.approx(measured, rel=1e-4)
    B_q, A_q, scale = encode_factors(form.B, form.A, storage)  # as compress passes them: not decoded
    assert svd_stored_error(total, form.B, form.A, B_q, A_q, stored_scale=scale) == pytest.approx(measured, rel=1e-4)
    # Below SVD_ERROR_FLOOR of the energy it declines (the caller measures).
    assert svd_stored_error(total, form.B, form.A, B, A) is not None
    tight = choose_form(delta, total, RankRule("energy", 0.999), bf16_costs(delta), engine=engine,
                        generator=torch.Generator().manual_seed(0))
    if tight.kind == "lowrank":
        assert svd_stored_error(total, tight.B, tight.A, *round_trip(tight.B, tight.A, None, storage)[:2]) is None


@pytest.mark.parametrize("shape", [(3000, 96), (96, 3000)])
@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_the_stored_error_of_a_bfloat16_product_from_norms(shape, storage, monkeypatch):
    """A noise-only update past the adaptive basis, its factor computed by a bfloat16 product: the
    same form, rank and bytes as the float32 product; svd_stored_error, given the product's
    measured error, agrees with the stored error measured on the [rows, cols] reconstruction (and
    without it would not: it would miss what the product added)."""
    monkeypatch.setattr(gram, "REDUCED_PRODUCT_MIN_WORK", 0)  # a product this small would stay float32
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    total, costs = energy(delta), bf16_source_costs(delta)
    rule = RankRule("energy", THRESHOLD)
    plain = choose_form(delta, total, rule, costs)
    form = choose_form(delta, total, rule, costs, products=torch.bfloat16)
    assert plain.engine == "gram" and form.engine == "gram-bfloat16" and form.product_error is not None
    assert (form.kind, form.rank) == (plain.kind, plain.rank) == ("lowrank", plain.rank)
    B, A, _ = round_trip(form.B, form.A, None, storage)
    measured = stored_error(delta, total, B, A, None, None)
    estimated = svd_stored_error(total, form.B, form.A, B, A, form.product_error)
    assert estimated == pytest.approx(measured, rel=2e-5)
    B_q, A_q, scale = encode_factors(form.B, form.A, storage)  # as compress passes them: not decoded
    assert svd_stored_error(total, form.B, form.A, B_q, A_q, form.product_error,
                                  scale) == pytest.approx(estimated, rel=1e-6)
    plain_B, plain_A, _ = round_trip(plain.B, plain.A, None, storage)
    assert measured == pytest.approx(stored_error(delta, total, plain_B, plain_A, None, None), rel=1e-4)
    ignored = svd_stored_error(total, form.B, form.A, B, A)  # the product's error left out
    assert abs(ignored - measured) > 5 * abs(estimated - measured), (ignored, estimated, measured)
