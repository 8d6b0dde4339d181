"""One update's truncated SVD with the rank a rule chooses: what every engine returns
(``Factorization``), the choice of engine (exact, adaptive randomized, Gram) and the hand-overs
between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from inrank_convert.linalg import gram
from inrank_convert.linalg.criteria import (
    ENERGY_CRITERIA,
    RankRule,
    choose_rank,
    frobenius_energy,
    numerical_args,
)
from inrank_convert.linalg.gram import GramSpectrum
from inrank_convert.linalg.randomized import (
    RANDOMIZED_MAX_FRACTION,
    adaptive_range_finder,
    fixed_rank_randomized,
)
from inrank_convert.linalg.svd import balanced_factors, exact_svd

ENGINES = ("auto", "exact", "randomized")
# The final basis size of the adaptive engine by update shape: a later update of the same shape
# starts with a block of that size (one block instead of a block plus its missing oversampling).
BasisHints = dict[tuple[int, ...], int]


@dataclass
class Factorization:
    """``delta ~= B @ A`` with B [rows, r] and A [r, cols], balanced (each carries sqrt(s)); float32,
    except the factor a reduced-precision product computed (``product_error``), in its dtype."""

    B: torch.Tensor
    A: torch.Tensor
    rank: int
    energy: float  # fraction of ||delta||_F^2 kept by the rank-r truncation
    total_energy: float  # ||delta||_F^2 (float64 accumulation)
    singular_values: torch.Tensor  # the ones computed (all for exact, the leading ones for randomized)
    engine: str  # "exact" | "randomized" | "gram" | "gram-bfloat16" | "exact-float64" (after a convergence failure)
    notes: list[str] = field(default_factory=list)
    # The leading right singular vectors computed on the way ([k, cols], k >= rank, orthonormal
    # rows; None when ``factored`` is False: ``leading_right_vectors`` makes them from ``gram``):
    # the stored-form search (forms.py) builds its small low-rank parts from them.
    right_vectors: torch.Tensor | None = None
    # The Gram engine's exact spectrum, kept so that a second rule on the same update (forms.py's
    # effective threshold) reuses it instead of decomposing again.
    gram: GramSpectrum | None = None
    # Products of the randomized engines with delta (each reads the whole update once): their unit of cost.
    passes: int = 0
    # A factor computed by a reduced-precision product (the Gram engine's bfloat16 one): the squared
    # error of each of its components against the float32 product ([r] float64: B's columns for a
    # tall update, A's rows for a wide one), measured on a sample of rows.
    product_error: torch.Tensor | None = None

    @property
    def factored(self) -> bool:
        """False when the rank passed factorize's ``max_rank``: B and A are empty, only the rank,
        the spectrum and the energy are known (the update is stored dense, no factors computed)."""
        return self.B.shape[1] == self.rank

    @property
    def relative_error(self) -> float:
        """||delta - B @ A||_F / ||delta||_F of the truncation (from the spectrum, no dense product)."""
        return math.sqrt(max(0.0, 1.0 - self.energy))


def factorize(
    delta: torch.Tensor, rule: RankRule, engine: str = "auto", float64: bool = False,
    generator: torch.Generator | None = None, solver=torch.linalg.svd, total_energy: float | None = None,
    max_rank: int | None = None, prior: Factorization | None = None, hints: BasisHints | None = None,
    products: torch.dtype | None = None,
) -> Factorization:
    """Truncated SVD of one update with the rank chosen by ``rule``.

    ``engine``: "exact" (full SVD), "randomized" (adaptive range finder; energy criterion or
    fixed rank) or "auto" (randomized where the criterion allows and the rank turns out
    small; for the energy criterion past that the exact spectrum of the Gram matrix, see
    ``GramSpectrum``; the full SVD otherwise). ``delta`` must be 2-D and float32 or float64.

    ``max_rank``: the largest rank worth factors (the break-even of the stored form). When the
    Gram engine finds that the rule needs more, no factors are computed: the result has the rank,
    the spectrum and the energy, ``factored`` False, and no vectors.
    ``prior``: an earlier factorization of the same update whose Gram spectrum can be reused.
    ``hints``: basis sizes the adaptive engine ended with on earlier updates, by shape (read and updated).
    ``products``: a dtype the Gram engine may compute its factor product in (bfloat16, when the
    factors are stored that coarsely and the hardware multiplies it natively); it does so only
    where the rule drops REDUCED_PRODUCT_MIN_TAIL of the energy or more (engine "gram-bfloat16").
    ``solver`` is the full SVD (torch.linalg.svd): a parameter so its calls can be counted and
    its retry path exercised.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown SVD engine {engine!r}")
    work = delta.double() if float64 else delta.float()
    total = frobenius_energy(work) if total_energy is None else total_energy
    n = min(work.shape)
    # The numerical rank's tolerance at threshold >= 1 (rank_for_energy): the SVD's dtype is work's.
    numerical = numerical_args(work.shape, work.dtype)
    notes: list[str] = []
    if total == 0.0:
        empty = work.new_zeros(0)
        return Factorization(work.new_zeros(work.shape[0], 0), work.new_zeros(0, work.shape[1]),
                             0, 1.0, 0.0, empty, "none")

    if rule.criterion == "energy-rest" and rule.fixed_rank is None:
        # Its fraction depends on the spectrum: forms.choose_form factorizes at the plain rule, then at that fraction.
        raise ValueError("factorize takes the energy rule at a fraction; resolve energy-rest first (choose_form)")
    use_randomized = engine == "randomized" or (engine == "auto" and rule.criterion in ENERGY_CRITERIA)
    if rule.criterion == "inrank" and rule.fixed_rank is None:
        use_randomized = False  # InRank's ratio needs every singular value
    # The Gram engine serves the energy rule's overflow below threshold 1: not a fixed rank, whose
    # exactly-zero singular values it would not see as zero; not a lossless rule, whose factors must
    # rebuild the update to rounding (the float32 Gram squares the condition: 1.5e-5 where the SVD
    # gives 1e-7); not --float64, which asks for the full SVD's precision.
    gram_allowed = (engine == "auto" and rule.criterion == "energy" and rule.fixed_rank is None and not float64
                    and rule.threshold < 1.0)
    if gram_allowed and prior is not None and prior.gram is not None:
        return gram_factorization(work, prior.gram, rule, total, max_rank, [], products)  # the caller holds prior's notes
    estimate = passes = 0
    if use_randomized:
        max_fraction = 1.0 if engine == "randomized" else RANDOMIZED_MAX_FRACTION
        if rule.fixed_rank is not None:
            found, passes = fixed_rank_randomized(work, min(rule.fixed_rank, n), generator, max_fraction, total)
        else:
            shape = tuple(work.shape)
            adaptive = adaptive_range_finder(work, total, rule.threshold, generator, max_fraction,
                                 None if hints is None else hints.get(shape))
            found, estimate, passes = adaptive.found, adaptive.rank, adaptive.passes
            if hints is not None and found is not None:
                hints[shape] = adaptive.basis
        if found is not None:
            U, S, Vh = found
            # S holds only the leading values, but choose_rank's energy total is the exact one.
            rank = min(choose_rank(S, total, rule, **numerical), S.numel())
            B, A = balanced_factors(U, S, Vh, rank)
            kept = float((S[:rank].double() ** 2).sum()) / total
            return Factorization(B.float(), A.float(), rank, min(kept, 1.0), total, S.float(), "randomized", notes,
                                 Vh.float(), passes=passes)
        if gram_allowed:
            # Not a warning: auto hands high ranks to an exact engine by design. The eigenvectors
            # are left out when even the low estimate of the rank is past the break-even.
            notes.append("randomized basis would pass its size limit: used the Gram matrix's exact spectrum")
            surely_dense = max_rank is not None and estimate > max_rank
            found = gram_factorization(work, GramSpectrum.of(work, vectors=not surely_dense), rule, total,
                                        max_rank, notes, products)
            found.passes = passes  # those the randomized engine spent before handing over
            return found
        notes.append("randomized basis would pass its size limit: used the exact SVD")

    U, S, Vh, svd_notes = exact_svd(work, float64=float64, solver=solver)
    notes.extend(svd_notes)
    rank = choose_rank(S, total, rule, **numerical)
    B, A = balanced_factors(U, S, Vh, rank)
    kept = float((S[:rank].double() ** 2).sum()) / total
    used = "exact-float64" if (float64 or svd_notes) else "exact"
    return Factorization(B.float(), A.float(), rank, min(kept, 1.0), total, S.float(), used, notes, Vh.float())


def gram_factorization(work: torch.Tensor, spectrum: GramSpectrum, rule: RankRule, total: float, max_rank: int | None,
                        notes: list[str], products: torch.dtype | None = None) -> Factorization:
    """The factorization ``rule`` asks for from an exact Gram spectrum; no factors past ``max_rank``."""
    rows, cols = work.shape
    values = spectrum.values  # [n] float64
    # Never a rule at threshold 1 (gram_allowed; effective_threshold keeps a rule below 1 below it).
    rank = choose_rank(values, total, rule, **numerical_args(work.shape, work.dtype))
    energy = min(1.0, float(values[:rank].square().sum()) / total)
    if max_rank is not None and rank > max_rank:
        # Dense is decided: no factors; ``leading_right_vectors`` makes the leading right vector from
        # the spectrum if the rows form asks for it (only with a dominant component).
        return Factorization(work.new_zeros(rows, 0), work.new_zeros(0, cols), rank, energy, total, values.float(),
                             "gram", [*notes, f"the rule needs rank {rank}, past the break-even rank {max_rank}: "
                                      "no factors computed"], None, spectrum)
    spectrum = spectrum.with_vectors(work)
    # The thresholds are read through the module: a change to them (a test's) takes effect here.
    reduced = (products is not None and products != work.dtype and 1.0 - energy >= gram.REDUCED_PRODUCT_MIN_TAIL
               and rows * cols * rank >= gram.REDUCED_PRODUCT_MIN_WORK)
    made = spectrum.factors(work, rank, products if reduced else None)
    engine = f"gram-{str(products).removeprefix('torch.')}" if reduced else "gram"
    # A factor the bfloat16 product computed stays bfloat16: exactly what its storage keeps, and half
    # the memory (a float32 copy of a 32000 x 1733 B is 222 MB more to fault in and convert back).
    return Factorization(made.B, made.A, rank, energy, total, values.float(), engine, notes,
                         made.right.float(), spectrum, product_error=made.product_error)

def leading_right_vectors(delta: torch.Tensor, found: Factorization, count: int) -> torch.Tensor:
    """The leading ``count`` right singular vectors of ``delta`` [count, cols] that ``found`` (a
    factorization of it) computed, made from its Gram spectrum when it stopped short of them."""
    if found.right_vectors is not None and found.right_vectors.shape[0] >= count:
        return found.right_vectors[:count]
    if found.gram is None:
        return found.A[:count]
    work = delta.float()
    return found.gram.with_vectors(work).right_vectors(work, count)
