"""One update's truncated SVD with the rank a rule chooses: the choice of engine (exact,
adaptive randomized, Gram) and the hand-overs between them.
"""

from __future__ import annotations

import torch

from inrank_convert.linalg.criteria import RankRule, choose_rank, frobenius_energy, numerical_args
from inrank_convert.linalg.gram import GramSpectrum, gram_factorization
from inrank_convert.linalg.randomized import (
    RANDOMIZED_MAX_FRACTION,
    adaptive_range_finder,
    fixed_rank_randomized,
)
from inrank_convert.linalg.svd import Factorization, balanced_factors, exact_svd

ENGINES = ("auto", "exact", "randomized")
# The final basis size of the adaptive engine by update shape: a later update of the same shape
# starts with a block of that size (one block instead of a block plus its missing oversampling).
BasisHints = dict[tuple[int, ...], int]


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

    use_randomized = engine == "randomized" or (engine == "auto" and rule.criterion == "energy")
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


def leading_right_vectors(delta: torch.Tensor, found: Factorization, count: int) -> torch.Tensor:
    """The leading ``count`` right singular vectors of ``delta`` [count, cols] that ``found`` (a
    factorization of it) computed, made from its Gram spectrum when it stopped short of them."""
    if found.right_vectors is not None and found.right_vectors.shape[0] >= count:
        return found.right_vectors[:count]
    if found.gram is None:
        return found.A[:count]
    work = delta.float()
    return found.gram.with_vectors(work).right_vectors(work, count)
