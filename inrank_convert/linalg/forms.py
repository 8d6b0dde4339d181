"""The stored form of one update: the cheapest of zero, low rank, low rank + rows, and dense that
meets the rank rule (docs/design.md §4).

Why rows. In a from-scratch run the token embedding's update is one common drift shared by every
row of a token the text never shows (a rank-1 term holding >99% of the energy) plus an individual
update per token the text does show. An energy rule over the whole matrix is met by the drift
alone and drops the information; and for a tall matrix (vocab x width) low rank buys little,
since a rank-r pair costs r * (rows + cols) numbers while one stored row costs cols (+ its index).

The ``energy-rest`` criterion (the default; ``energy`` is the plain rule: every form keeps t of the
whole energy), so that a cheap dominant component cannot satisfy it:

- the *dominant* part of an update is its leading singular component when that component alone
  holds at least half of the energy (``criteria.DOMINANT_SHARE``; at most one component can); most block
  updates have none, and for them everything below is exactly the plain energy rule;
- a form must keep the dominant part, and ``threshold`` of the energy *left after it*:
  kept >= E_d + t * (E - E_d). On the embedding above (E_d = 99% of E, t = 0.9) that is 99.9% of
  the energy, of which 90% must come from the individual updates, not the drift;
- low rank meets it with the smallest rank that does (the energy rule at the effective threshold
  t + (1 - t) * E_d / E); low rank + rows with the dominant part as its low-rank part (rank 0 or
  1) plus the fewest rows of the residual (largest row energies first) that reach the target;
- of the forms that meet it the one with the fewest stored bytes wins (at the storage precision
  the artifact uses); dense when none is smaller than the tensor itself. Rows compete only when
  at most half of the rows are needed (``MAX_ROW_FRACTION``): the update is concentrated in rows.

Why the rows' low-rank part is the dominant component and nothing more: a larger one is cheaper
in bytes for the same energy, but it buys that energy by projecting every token's own update onto
a few shared directions, which the model notices. Measured on the reference run of docs/results.md (4x128 GPT-2,
token embedding only, t = 0.9): rank 1 + 9,263 rows, 8.8% of the dense bytes, perplexity +0.04%;
searching ranks 1-16 for the fewest bytes chose rank 8 + 5,326 rows, 7.6%, perplexity +3.1%.

Rows of a grown vocabulary (``forced_rows``: rows the reference does not have) are always stored
rows, so such a tensor is low rank + rows or dense. A fixed ``--rank`` or the ``inrank`` criterion
choose low rank as before (rows only for forced rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from inrank_convert.linalg.criteria import ENERGY_CRITERIA, RankRule, effective_threshold, energy_fraction
from inrank_convert.linalg.factorize import BasisHints, factorize, leading_right_vectors

# Rows are for updates concentrated in rows: a form that needs more than this fraction of the
# rows is not one (a full-rank update, e.g. a weight factorized with --no-init, would otherwise
# "compress" by dropping whole output channels, which low rank does far more gently).
MAX_ROW_FRACTION = 0.5
INDEX_BYTES = 8  # a stored row's int64 index
# A low-rank form that takes this share of the dense bytes or more buys little for its factors'
# work: the tensor's entry says so (a noise-like update, whose rule rank lands near the break-even).
NEAR_BREAKEVEN = 0.8
BREAKEVEN_MARK = "near the dense break-even"


@dataclass
class Form:
    """What to store for one update ``delta`` [rows, cols]."""

    kind: str  # "zero" | "lowrank" | "lowrank+rows" | "dense"
    B: torch.Tensor | None = None  # [rows, r]
    A: torch.Tensor | None = None  # [r, cols]
    rows: torch.Tensor | None = None  # [K, cols]: delta's residual after B @ A on those rows
    row_index: torch.Tensor | None = None  # [K] int64
    rank: int = 0
    energy: float = 1.0  # fraction of ||delta||_F^2 kept (before storage rounding)
    engine: str = ""
    notes: list[str] = field(default_factory=list)
    # B, A are a truncated SVD of delta (``factorize``'s): orthogonal B columns and A rows, and
    # B.T @ (delta - B @ A) = 0, which lets ``svd_stored_error`` price the stored error from norms.
    svd_factors: bool = False
    # The error a reduced-precision factor product added (``Factorization.product_error``): [r]
    # float64 squared errors of B's columns (tall) or A's rows (wide).
    product_error: torch.Tensor | None = None

    @property
    def stored_rows(self) -> int:
        return 0 if self.rows is None else int(self.rows.shape[0])


@dataclass(frozen=True)
class Costs:
    """Bytes of each stored number at the artifact's precision, and of the dense tensor.

    Per vector (``element``, ``vector``): float and int8 storage, every component costing the same.
    Group-wise (``group`` > 0, int4): a vector of n numbers at b bits is ceil(n b / 8) bytes plus
    ``vector`` bytes per group of ``group`` numbers; the ``lead`` leading components at ``lead_bits``,
    the others and the rows at ``bits``."""

    element: int  # per factor or row number
    vector: int  # per rank-1 component or row (an int8 scale); per group when grouped
    dense: int  # the tensor stored whole
    bits: int = 0
    group: int = 0
    lead: int = 0
    lead_bits: int = 0

    def _grouped(self, length: int, bits: int) -> int:
        return -(-length * bits // 8) + -(-length // self.group) * self.vector

    def component(self, index: int, rows: int, cols: int) -> int:
        """Bytes of component ``index`` (0: the largest) of a [rows, cols] tensor's factors."""
        if not self.group:
            return (rows + cols) * self.element + self.vector
        bits = self.lead_bits if index < self.lead else self.bits
        return self._grouped(rows, bits) + self._grouped(cols, bits)

    def component_at(self, bits: int, rows: int, cols: int) -> int:
        """Bytes of one component of a [rows, cols] tensor's factors with ``bits``-bit group-wise codes."""
        return self._grouped(rows, bits) + self._grouped(cols, bits)

    def lowrank(self, rank: int, rows: int, cols: int) -> int:
        lead = min(rank, self.lead)
        return lead * self.component(0, rows, cols) + (rank - lead) * self.component(self.lead, rows, cols)

    def row_set(self, count: int, cols: int) -> int:
        per_row = self._grouped(cols, self.bits) if self.group else cols * self.element + self.vector
        return count * (per_row + INDEX_BYTES)

    def breakeven_rank(self, rows: int, cols: int) -> int:
        """The largest rank whose factors take fewer bytes than the dense tensor (0: none does)."""
        lead = min(self.lead, max(0, -(-self.dense // self.component(0, rows, cols)) - 1))
        if lead < self.lead:  # not even the leading components all fit
            return lead
        left = self.dense - self.lowrank(lead, rows, cols)
        return lead + max(0, -(-left // self.component(lead, rows, cols)) - 1)


# (delta, V, B, residual row energies) -> a ranking of the residual rows ([rows] float64), or None
# for the plain energies: calibration ranks a token embedding's rows by what the outputs lose.
RowScores = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def choose_form(delta: torch.Tensor, total: float, rule: RankRule, costs: Costs, engine: str = "auto",
                float64: bool = False, generator: torch.Generator | None = None,
                forced_rows: torch.Tensor | None = None, allocation: tuple[int, int | None] | None = None,
                row_scores: RowScores | None = None, solver=torch.linalg.svd, hints: BasisHints | None = None,
                products: torch.dtype | None = None) -> Form:
    """The cheapest form of ``delta`` (float32 [rows, cols], ||delta||^2 = ``total``) that meets ``rule``.

    ``allocation`` (rank, rows) replaces the rule with a size already decided (a global budget,
    see budget.py): rows None is low rank at that rank; a row count is low rank + rows (rank 0
    or 1) with that many rows of the residual besides the forced ones, the highest by
    ``row_scores`` (default: by residual energy). ``solver``: the full SVD, as ``factorize`` takes it
    (a parameter so that tests can count the full SVDs a decision needed); ``hints``: the adaptive
    engine's basis sizes on earlier updates, by shape; ``products``: the dtype the Gram engine may
    multiply in (see ``factorize``).
    """
    rows, cols = delta.shape
    if allocation is not None:
        return _allocated_form(delta, total, allocation[0], allocation[1], engine, float64, generator, forced_rows,
                               row_scores)
    if total == 0.0 and forced_rows is None:
        return Form("zero", energy=1.0, engine="none")
    if rule.fixed_rank is not None or rule.criterion not in ENERGY_CRITERIA:
        return _lowrank_by_rule(delta, total, rule, costs, engine, float64, generator, forced_rows)

    # The plain energy rule first (the same factorization as a low-rank-only search would make):
    # its spectrum tells whether a dominant component is there, its vectors give the small ranks.
    # Past the break-even no low-rank form can win, so no factors are made there (max_rank).
    breakeven = costs.breakeven_rank(rows, cols) if forced_rows is None else 0
    low = factorize(delta, RankRule("energy", rule.threshold), engine, float64, generator, solver, total_energy=total,
                    max_rank=breakeven, hints=hints, products=products)
    # Under either rule a dominant part leads a rows form; only energy-rest raises the share kept.
    dominant, _ = effective_threshold(low.singular_values, total, rule.threshold)
    effective = energy_fraction(rule, low.singular_values, total)
    target = effective * total
    notes = list(low.notes)
    if dominant and rule.criterion == "energy-rest":
        share = float(low.singular_values[0].double() ** 2) / total
        notes.append(f"the leading component holds {share:.1%} of the energy: the rule keeps "
                     f"{rule.threshold:g} of the rest (energy {effective:.6g})")
        low = factorize(delta, RankRule("energy", effective), engine, float64, generator, solver, total_energy=total,
                        max_rank=breakeven, prior=low, hints=hints, products=products)
        notes.extend(low.notes)

    candidates: list[tuple[int, Form]] = []
    if forced_rows is None and low.rank > 0 and low.factored:
        candidates.append((costs.lowrank(low.rank, rows, cols),
                           Form("lowrank", low.B, low.A, rank=low.rank, energy=low.energy, engine=low.engine,
                                svd_factors=True, product_error=low.product_error)))
    vectors = leading_right_vectors(delta, low, dominant) if dominant else delta.new_zeros(0, cols)
    with_rows = _rows_form(delta, total, target, vectors, costs, forced_rows)
    if with_rows is not None:
        with_rows[1].engine = low.engine
        candidates.append(with_rows)
    if not candidates:
        if low.rank == 0 and forced_rows is None:
            return Form("zero", energy=0.0, engine=low.engine, notes=notes)
        return Form("dense", rank=low.rank, engine=low.engine,
                    notes=[*notes, *_breakeven_note(low.rank, rows, cols, costs, forced_rows),
                           "no form smaller than dense meets the rule"])
    nbytes, form = min(candidates, key=lambda item: (item[0], item[1].kind != "lowrank"))
    form.notes = notes + form.notes
    if nbytes >= costs.dense:
        return Form("dense", rank=form.rank, energy=1.0, engine=form.engine,
                    notes=[*form.notes, f"{form.kind} at rank {form.rank} is not smaller than dense"])
    if form.kind == "lowrank":
        form.notes += _breakeven_note(low.rank, rows, cols, costs, forced_rows)
    return form


def _breakeven_note(rank: int, rows: int, cols: int, costs: Costs, forced_rows: torch.Tensor | None) -> list[str]:
    """The report's line when the rule's rank lands near or past the dense break-even (a
    noise-like update: its factors buy little or nothing over the tensor itself)."""
    nbytes = costs.lowrank(rank, rows, cols)
    if forced_rows is not None or rank == 0 or nbytes < NEAR_BREAKEVEN * costs.dense:
        return []
    return [f"{BREAKEVEN_MARK}: the rule needs rank {rank} of {min(rows, cols)}, whose factors take "
            f"{nbytes / costs.dense:.0%} of the dense bytes (break-even rank {costs.breakeven_rank(rows, cols)})"]


def _rows_form(delta: torch.Tensor, total: float, target: float, V: torch.Tensor, costs: Costs,
               forced_rows: torch.Tensor | None) -> tuple[int, Form] | None:
    """Low rank + rows: the low-rank part spans ``V`` ([r, cols], r = 0 or 1: the dominant
    direction), the rows are the fewest rows of the residual that bring the kept energy to
    ``target``; None when that is not smaller than dense.

    The low-rank part is the projection ``delta @ V.T @ V`` (B = delta @ V.T, A = V), and the
    residual's row energies are ||delta_i||^2 - ||(delta @ V.T)_i||^2: no residual is formed
    until the rows are chosen.
    """
    rows, cols = delta.shape
    rank = V.shape[0]
    V, B, kept_lowrank, residual, forced = split_residual(delta, V, forced_rows)
    count = rows_needed(residual, forced, target - kept_lowrank)
    nbytes = costs.lowrank(rank, rows, cols) + costs.row_set(count, cols)
    if nbytes >= costs.dense or (count > MAX_ROW_FRACTION * rows and forced_rows is None):
        return None
    index = _top_rows(residual, forced, count)  # [K] int64, ascending
    return nbytes, _with_rows(delta, total, V, B, kept_lowrank, residual, index, f"rank {rank} + {count} rows of {rows}")


def _with_rows(delta: torch.Tensor, total: float, V: torch.Tensor, B: torch.Tensor, kept_lowrank: float,
               residual: torch.Tensor, index: torch.Tensor, note: str) -> Form:
    """The low rank + rows form: ``B @ V`` (from ``split_residual``) plus the residual's rows ``index``."""
    kept_rows = delta[index] - B[index] @ V  # [K, cols]
    energy = min(1.0, (kept_lowrank + float(residual[index].sum())) / total) if total else 1.0
    return Form("lowrank+rows", *balance(B, V), kept_rows, index, rank=V.shape[0], energy=energy, notes=[note])


def split_residual(delta: torch.Tensor, V: torch.Tensor, forced_rows: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """The low-rank part spanned by ``V`` [r, cols] and what it leaves: (V with unit rows,
    B = delta @ V.T [rows, r], its energy, the residual's row energies [rows] float64, the forced
    rows as a mask [rows] bool). The residual's row energies are ||delta_i||^2 - ||B_i||^2: no
    residual is formed until the rows are chosen."""
    V = V / V.norm(dim=1, keepdim=True).clamp_min(1e-30)  # unit rows (balanced factors carry sqrt(s))
    B = delta @ V.T  # [rows, r]
    kept_lowrank = float(B.double().pow(2).sum())
    residual = (row_energies(delta) - B.double().pow(2).sum(dim=1)).clamp_min(0.0)  # [rows] float64
    forced = torch.zeros(delta.shape[0], dtype=torch.bool)
    if forced_rows is not None:
        forced[forced_rows] = True
    return V, B, kept_lowrank, residual, forced


def row_energies(delta: torch.Tensor) -> torch.Tensor:
    """||delta_i||^2 of every row [rows] float64: each row's norm in delta's own dtype, squared in
    float64 (as ``frobenius_energy``; a float64 copy of the rows took 45x longer, 0.35 s on 8192 x 2048)."""
    return torch.linalg.vector_norm(delta, dim=1).double().square()


def rows_needed(residual: torch.Tensor, forced: torch.Tensor, need: float) -> int:
    """How many rows (the forced ones first, then by residual energy) reach ``need`` energy."""
    forced_count = int(forced.sum())
    have = float(residual[forced].sum())
    if have >= need:
        return forced_count
    free = torch.sort(residual[~forced], descending=True).values
    cumulative = torch.cumsum(free, dim=0)
    hits = torch.nonzero(cumulative >= (need - have) * (1.0 - 1e-12))
    return forced_count + (int(hits[0, 0]) + 1 if hits.numel() else free.numel())


def _top_rows(residual: torch.Tensor, forced: torch.Tensor, count: int) -> torch.Tensor:
    """The forced rows and the highest-energy others, ``count`` in all, as sorted int64 indices."""
    chosen = torch.nonzero(forced).flatten()
    others = torch.nonzero(~forced).flatten()
    extra = count - chosen.numel()
    if extra > 0:
        order = torch.argsort(residual[others], descending=True)[:extra]
        chosen = torch.cat([chosen, others[order]])
    return torch.sort(chosen).values.to(torch.int64)


def balance(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-1 component so that its B column and A row have equal norms (the
    convention of every factor pair here: int8 scales and PEFT's LoRA both prefer it)."""
    if B.shape[1] == 0:
        return B, A
    root = (B.norm(dim=0) / A.norm(dim=1).clamp_min(1e-30)).sqrt().clamp_min(1e-30)  # [r]
    return B / root[None, :], A * root[:, None]


def _lowrank_by_rule(delta: torch.Tensor, total: float, rule: RankRule, costs: Costs, engine: str, float64: bool,
                     generator: torch.Generator | None, forced_rows: torch.Tensor | None) -> Form:
    """--rank r or the inrank criterion: low rank as the rule says (plus the forced rows, if any)."""
    rows, cols = delta.shape
    found = factorize(delta, rule, engine, float64, generator, total_energy=total)
    notes = list(found.notes)
    if forced_rows is not None:
        index = torch.sort(forced_rows.to(torch.int64)).values
        kept_rows = delta[index] - found.B[index] @ found.A
        kept = total * found.energy + float((kept_rows.double() ** 2).sum())
        form = Form("lowrank+rows", found.B, found.A, kept_rows, index, found.rank, min(1.0, kept / total) if total else 1.0,
                    found.engine, notes)
        nbytes = costs.lowrank(found.rank, rows, cols) + costs.row_set(index.numel(), cols)
    elif found.rank == 0:
        return Form("zero", energy=1.0 if found.total_energy == 0.0 else 0.0, engine=found.engine, notes=notes)
    else:
        form = Form("lowrank", found.B, found.A, rank=found.rank, energy=found.energy, engine=found.engine, notes=notes,
                    svd_factors=True)
        nbytes = costs.lowrank(found.rank, rows, cols)
    if nbytes >= costs.dense:
        return Form("dense", rank=found.rank, energy=1.0, engine=found.engine,
                    notes=[*notes, f"rank {found.rank} is not smaller than dense"])
    return form


def _allocated_form(delta: torch.Tensor, total: float, rank: int, row_count: int | None, engine: str, float64: bool,
                    generator: torch.Generator | None, forced_rows: torch.Tensor | None,
                    row_scores: RowScores | None = None) -> Form:
    """The form of a given size: ``rank`` components, and with ``row_count`` not None that many
    residual rows (largest energy first) besides the forced rows. Its bytes follow from the sizes
    alone (Costs.lowrank + Costs.row_set), which is what lets a budget be honoured to the byte."""
    rows, cols = delta.shape
    count = (0 if forced_rows is None else int(forced_rows.numel())) + (row_count or 0)
    found = factorize(delta, RankRule(fixed_rank=rank), engine, float64, generator, total_energy=total) \
        if rank > 0 else None
    notes, used = (list(found.notes), found.engine) if found is not None else ([], "none")
    if found is None or found.rank == 0:
        if count == 0:
            return Form("zero", energy=1.0 if total == 0.0 else 0.0, engine=used, notes=notes)
        V = delta.new_zeros(0, cols)
    elif count == 0:
        return Form("lowrank", found.B, found.A, rank=found.rank, energy=found.energy, engine=used, notes=notes,
                    svd_factors=True)
    else:
        V = leading_right_vectors(delta, found, found.rank).to(delta.dtype)
    V, B, kept_lowrank, residual, forced = split_residual(delta, V, forced_rows)
    ranking = None if row_scores is None else row_scores(delta, V, B, residual)
    index = _top_rows((residual if ranking is None else ranking).cpu(), forced, min(count, rows)).to(delta.device)
    form = _with_rows(delta, total, V, B, kept_lowrank, residual, index,
                      f"rank {V.shape[0]} + {index.numel()} rows of {rows} (budget)")
    form.engine, form.notes = used, notes + form.notes
    return form
