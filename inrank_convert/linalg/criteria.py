"""Rank criteria: how many singular components of an update a rule keeps.

Pure functions of a spectrum (and the update's exact energy): the energy rule, the energy rule
past a dominant component (``energy-rest``), InRank's explained variance (and the reference's
buffered scan used in training), a fixed rank, and the numerical rank a lossless rule means.
Nothing here reads files or prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# energy: the smallest rank holding t of the energy, exactly (the explained-variance rule a user names).
# energy-rest: the same on the energy left after a dominant leading component (``effective_threshold``),
# compress's default: on a token embedding's update the plain rule is met by the drift alone.
CRITERIA = ("energy-rest", "energy", "inrank")
DEFAULT_CRITERION = "energy-rest"
ENERGY_CRITERIA = ("energy", "energy-rest")
# compress's default threshold: with int8 storage it holds on text the run never trained on
# (docs/rank-selection.md "The default threshold"); training's rank decisions have their own.
DEFAULT_THRESHOLD = 0.95
# A leading component holding this share of the energy or more is dominant (at most one can be).
DOMINANT_SHARE = 0.5


@dataclass(frozen=True)
class RankRule:
    """How to choose a rank from a spectrum: a criterion with a threshold, or a fixed rank."""

    criterion: str = DEFAULT_CRITERION
    threshold: float = DEFAULT_THRESHOLD
    fixed_rank: int | None = None

    def describe(self) -> str:
        if self.fixed_rank is not None:
            return f"rank={self.fixed_rank}"
        return f"{self.criterion}>={self.threshold:g}"


def effective_threshold(singular_values: torch.Tensor, total: float, threshold: float) -> tuple[int, float]:
    """(dominant rank 0 or 1, the energy fraction ``energy-rest`` keeps): ``threshold`` of the energy
    left after the leading component when that component alone holds DOMINANT_SHARE or more,
    kept >= E_d + t (E - E_d); ``threshold`` itself when it does not (``singular_values``: the leading
    values at least, descending; ``total``: the exact ||delta||_F^2).

    Threshold 1 stays exactly 1 and a threshold below 1 stays below it: the energy rule at 1 is the
    numerical rank (``rank_for_energy``), which a rounding of the fraction must not switch on or off."""
    if total <= 0.0 or singular_values.numel() == 0:
        return 0, threshold
    leading = float(singular_values[0].double() ** 2)
    if leading < DOMINANT_SHARE * total:
        return 0, threshold
    if threshold >= 1.0:
        return 1, threshold
    return 1, min(math.nextafter(1.0, 0.0), (leading + threshold * (total - leading)) / total)


def energy_fraction(rule: RankRule, singular_values: torch.Tensor, total: float) -> float:
    """The share of ``total`` an energy criterion keeps: the threshold itself for ``energy``, the
    effective threshold for ``energy-rest``."""
    if rule.criterion == "energy-rest":
        return effective_threshold(singular_values, total, rule.threshold)[1]
    return rule.threshold


def frobenius_energy(delta: torch.Tensor) -> float:
    """||delta||_F^2 with float64 accumulation, so the energy criterion's total is honest.

    Row norms in the tensor's own dtype, then their squares summed in float64: as accurate
    as a float64 norm (relative error ~1e-10) without a float64 copy of the whole update.
    NaN or Inf anywhere in ``delta`` makes the result non-finite.
    """
    rows = delta.reshape(delta.shape[0], -1) if delta.ndim >= 2 else delta.reshape(1, -1)
    return float(torch.linalg.vector_norm(rows, dim=1).double().square().sum())


def numerical_tolerance(largest: float, size: int, eps: float) -> float:
    """``torch.linalg.matrix_rank``'s tolerance: singular values at or below ``s_max * max(rows,
    cols) * eps`` (``size`` = max(rows, cols), ``eps`` that of the SVD's dtype) are rounding, not rank."""
    return largest * size * eps


def numerical_args(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> dict:
    """``rank_for_energy``/``choose_rank``'s ``size`` and ``eps`` for an update of ``shape`` whose SVD
    runs in ``dtype``: what the numerical rank at threshold >= 1 needs."""
    return {"size": max(shape), "eps": torch.finfo(dtype).eps}


def rank_for_energy(singular_values: torch.Tensor, total_energy: float, threshold: float, *,
                    size: int | None = None, eps: float | None = None) -> int | None:
    """Smallest r with sum(s[:r]**2) >= threshold * total_energy, or None if s does not reach it.

    ``total_energy`` is the exact ||delta||_F^2, so a partial (leading) spectrum is enough.

    At threshold >= 1 (lossless) the numerical rank instead: the count of values above
    ``numerical_tolerance`` (``size`` and ``eps`` required), None when every value given is above
    it. Why: a float32 SVD's values are off by ~eps * s_max each, so their energy sum misses the
    exact total by ~1e-7 of it, and no energy slack both reaches 1.0 and leaves rounding out (a
    rank-4 update rounded in float32 came out at rank 64 or 4 depending on the engine).
    """
    if total_energy <= 0.0:
        return 0
    if threshold >= 1.0:
        if size is None or eps is None:
            raise ValueError("the lossless energy rule (threshold >= 1) needs the matrix size and the SVD's eps")
        if singular_values.numel() == 0:
            return None
        tolerance = numerical_tolerance(float(singular_values[0]), size, eps)
        kept = int(torch.count_nonzero(singular_values > tolerance))
        return None if kept == singular_values.numel() else kept
    energy = torch.cumsum(singular_values.double() ** 2, dim=0)
    target = threshold * total_energy
    # Rounding in the SVD can leave the full cumulative sum a hair below ||delta||^2; a
    # relative slack of 1e-9 keeps threshold 1.0 reachable without changing any real choice.
    hits = torch.nonzero(energy >= target * (1.0 - 1e-9))
    if hits.numel() == 0:
        return None
    return int(hits[0, 0]) + 1


def rank_for_inrank(singular_values: torch.Tensor, threshold: float) -> int:
    """Smallest r whose InRank explained ratio reaches ``threshold`` (full spectrum needed)."""
    n = singular_values.numel()
    if n == 0 or float(singular_values.abs().max()) == 0.0:
        return 0
    if n == 1:
        return 1  # one nonzero value: the variance is undefined, and the rank is 1 either way
    if float(torch.var(singular_values.double())) <= 0:
        return n
    hits = torch.nonzero(explained_ratios(singular_values) >= threshold - 1e-12)
    return int(hits[0, 0]) if hits.numel() else n


def explained_ratios(singular_values: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """InRank's explained ratio of every rank r = 0..len(s) at once: ``1 - var(s[r:]) / var(s)``,
    the variance taken over ``s`` zero-padded to ``length`` values (a layer's full rank; default
    ``len(s)``) with entries below r zeroed. Returns [len(s) + 1] float64 (all ones when the
    padded spectrum is constant: nothing to explain).

    Zeroing s[:r] leaves a vector whose sum and sum of squares are suffix sums, so its unbiased
    variance is (sum_sq - sum**2 / n) / (n - 1) for every r in one pass.
    """
    s = singular_values.double()
    n = max(s.numel(), length or 0)
    prefix_sum = torch.cat([s.new_zeros(1), torch.cumsum(s, 0)])
    prefix_sq = torch.cat([s.new_zeros(1), torch.cumsum(s * s, 0)])
    if n < 2:
        return torch.ones_like(prefix_sum)
    tail_sum = prefix_sum[-1] - prefix_sum  # sum of the kept tail for r = 0..len(s)
    tail_sq = prefix_sq[-1] - prefix_sq
    tail_var = (tail_sq - tail_sum * tail_sum / n) / (n - 1)
    var_all = tail_var[0]
    if var_all <= 0:
        return torch.ones_like(prefix_sum)
    return 1.0 - tail_var / var_all


def inrank_scan(singular_values: torch.Tensor, full_rank: int, current: int, buffer: int, max_rank: int,
                threshold: float) -> int:
    """The InRank reference's rank decision (``_matrx_svd_approximation_explained_variance``):
    scan r = current .. min(current + buffer, max_rank - buffer) - 1 and stop at the first whose
    explained ratio over the spectrum zero-padded to ``full_rank`` is strictly above
    ``threshold``; if none is, the last r scanned. So a decision grows a layer by at most
    buffer - 1, never shrinks it, and keeps current + buffer <= max_rank; a layer already at
    max_rank - buffer or above keeps its rank."""
    stop = min(current + buffer, max_rank - buffer)
    if current >= stop:
        return current
    ratios = explained_ratios(singular_values, full_rank)
    for rank in range(current, stop):
        # Ranks beyond the measured spectrum explain what all of it does.
        if float(ratios[min(rank, ratios.numel() - 1)]) > threshold:
            return rank
    return stop - 1


def choose_rank(singular_values: torch.Tensor, total_energy: float, rule: RankRule, *,
                size: int | None = None, eps: float | None = None) -> int:
    """The rank a rule gives for a full spectrum (``size``, ``eps``: see ``rank_for_energy``,
    needed by the energy rules at threshold >= 1). ``energy-rest`` is the low-rank form's rank that
    compress keeps (a rows form may store less)."""
    n = singular_values.numel()
    if rule.fixed_rank is not None:
        nonzero = int(torch.count_nonzero(singular_values > 0))
        return min(rule.fixed_rank, n, nonzero)
    if rule.criterion == "inrank":
        return rank_for_inrank(singular_values, rule.threshold)
    rank = rank_for_energy(singular_values, total_energy, energy_fraction(rule, singular_values, total_energy),
                           size=size, eps=eps)
    return n if rank is None else rank


def stored_as_lowrank(rank: int, rows: int, cols: int) -> bool:
    """Low rank pays only when r * (rows + cols) < rows * cols."""
    return rank * (rows + cols) < rows * cols
