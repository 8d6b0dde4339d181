"""The adaptive randomized engine: a range basis grown in blocks until it holds the energy the rule
asks for (against the update's exact total), then one small exact SVD; and the fixed-rank range
finder for ``--rank r``. Both hand back None where an exact engine is cheaper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from inrank_convert.linalg.criteria import (
    frobenius_energy,
    numerical_args,
    numerical_tolerance,
    rank_for_energy,
)
from inrank_convert.linalg.svd import PRODUCT_BLOCK_BYTES

# The adaptive range finder stops growing and hands over to the exact SVD once its basis
# would pass this fraction of min(rows, cols): beyond it a full SVD is cheaper (measured: at
# 46-74% of full rank the adaptive path costs 1-4x a full SVD).
RANDOMIZED_MAX_FRACTION = 1 / 8
RANDOMIZED_FIRST_BLOCK = 32
POWER_ITERATIONS = 2
# The adaptive range finder gives up early when even an optimistic count of the directions still
# needed (as if each held the last block's average energy) passes this multiple of its size limit:
# the blocks it would still grow are wasted passes before the hand-over (a noise-only update).
OVERFLOW_MARGIN = 2.0
# Safety factor of the power-iteration stopping test (``_gap_allows``): calibrated on planted,
# steep and power-law spectra, where the true excess over the optimum after j = 0 iterations was
# up to 42x the estimate; after one iteration it was at rounding level (< 1e-5 of the error^2).
GAP_SAFETY = 1000.0
# Stopping before the last power iteration needs the excess over the optimal error^2 under this
# share of it (0.1% of the error): ten times inside the 1% the engine promises.
EARLY_SHARE = 0.002


def orthonormal(Y: torch.Tensor) -> torch.Tensor:
    Q, _ = torch.linalg.qr(Y)
    return Q


def oversampling(rank: int) -> int:
    """Extra range directions beyond the rank a randomized SVD returns: max(10, rank / 4), enough
    for its truncation error to stay within 1% of the optimum (tested across shapes)."""
    return max(10, rank // 4)


def _new_directions(delta: torch.Tensor, Q: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Y [rows, b] orthonormalized against Q [rows, k] and itself: (Qb [rows, b], Qb.T @ delta [b, cols])."""
    # Twice: one Gram-Schmidt pass loses orthogonality in float32 when Y is nearly inside span(Q).
    for _ in range(2):
        Y = Y - Q @ (Q.T @ Y)
    Qb = orthonormal(Y)
    return Qb, Qb.T @ delta


def _gap_allows(S: torch.Tensor, rank: int, error2: float, iterations: int) -> bool:
    """Whether ``iterations`` power iterations already give a truncation within 1% of the optimum,
    judged from the Ritz values S [k] (descending): a block refined j times misses direction i by
    about (s_k / s_i)^(4j + 2) of its energy, so the excess over the optimum is estimated as
    GAP_SAFETY * sum_i<r s_i^2 (s_k / s_i)^(4j+2), accepted when under EARLY_SHARE of the error^2
    (0.1% of the error). A fast-decaying spectrum (the planted rank-32 updates of the benchmarks: s_k / s_r ~ 0.06)
    passes after one iteration; a flat one never does and gets all of POWER_ITERATIONS."""
    if iterations < 1 or rank >= S.numel() or error2 <= 0.0:
        return False
    head = S[:rank].double()
    ratio = float(S[-1]) / head.clamp_min(1e-300)
    excess = GAP_SAFETY * float((head.square() * ratio.pow(4 * iterations + 2)).sum())
    return excess <= EARLY_SHARE * error2


def adaptive_randomized_svd(
    delta: torch.Tensor, total_energy: float, threshold: float, generator: torch.Generator | None = None,
    max_fraction: float = RANDOMIZED_MAX_FRACTION,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Grow an orthonormal range basis Q [rows, k] in blocks (32, 64, 128, ...) until the
    energy it captures, ||Q.T @ delta||_F^2, reaches ``threshold`` of the exact total, and until
    it holds ``oversampling(r)`` directions beyond the rank r that threshold needs; then one
    small exact SVD of Q.T @ delta [k, cols]. Without the oversampling a basis that barely holds
    the energy truncates worse than the optimum (1.09% worse on a 384 x 96 update of rank 10).
    Each block gets up to POWER_ITERATIONS power iterations, fewer when the spectrum the basis
    already shows decays fast enough (``_gap_allows``).

    At threshold >= 1 the rule is the numerical rank, and the basis is grown until the energy
    outside it is within the rounding floor instead (see ``adaptive_range_finder``).

    Returns the leading U, S, Vh, or None when the basis would pass ``max_fraction`` of
    min(rows, cols) (or, from the energy the blocks so far captured, clearly will): the caller
    should then use an exact engine, which is cheaper there (and is what small matrices get).
    """
    return adaptive_range_finder(delta, total_energy, threshold, generator, max_fraction).found


@dataclass
class AdaptiveRange:
    """What the adaptive range finder ended with."""

    found: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # U [rows, k], S [k], Vh [k, cols]
    rank: int  # the rule's rank; when ``found`` is None a low estimate of it
    basis: int  # the final basis size k (0 when it gave up)
    passes: int  # products with delta (each reads the whole update once)


def adaptive_range_finder(delta: torch.Tensor, total_energy: float, threshold: float, generator: torch.Generator | None,
              max_fraction: float, first_block: int | None = None) -> AdaptiveRange:
    """``adaptive_randomized_svd``, starting with ``first_block`` directions (default 32: a hint
    from an earlier update of the same shape saves the second block its oversampling would need)."""
    rows, cols = delta.shape
    limit = max(1, int(min(rows, cols) * max_fraction))
    target = threshold * total_energy
    lossless = threshold >= 1.0  # the rule is the numerical rank (rank_for_energy): its own stop below
    Q = delta.new_zeros(rows, 0)
    projected = delta.new_zeros(0, cols)  # Q.T @ delta, grown block by block
    block = first_block or RANDOMIZED_FIRST_BLOCK
    captured, passes, rank = 0.0, 0, 0
    while True:
        block = min(block, limit - Q.shape[1])
        if block <= 0:
            return AdaptiveRange(None, max(rank, limit + 1), 0, passes)
        before = captured
        Y = delta @ torch.randn(cols, block, device=delta.device, dtype=delta.dtype, generator=generator)
        passes += 1
        for iteration in range(POWER_ITERATIONS + 1):
            Qb, Pb = _new_directions(delta, Q, Y)  # Pb [block, cols]: one pass
            passes += 1
            basis, stacked = torch.cat([Q, Qb], dim=1), torch.cat([projected, Pb], dim=0)
            captured = float(torch.linalg.vector_norm(stacked, dtype=torch.float64) ** 2)
            if lossless:
                # The numerical rank r (rank_for_energy at threshold 1). ``total - captured`` cannot tell
                # when the basis holds every direction above the tolerance: float32 products measure the
                # captured energy only to ~1e-7 of the total, above the rounding floor of a small layer.
                # So once the basis reaches a Ritz value at or below the tolerance (it holds more than r
                # directions), the residual outside it is measured directly (one pass; exact to about
                # (eps ||delta||_F)^2) and must be at most (min(rows, cols) - r) * tol^2: the most energy
                # the values the convention calls zero can hold (each <= tol, min(rows, cols) - r of
                # them). A larger residual holds a direction above the tolerance: the engine grows on.
                # Ritz values are within the residual's norm of the true ones, so only values within
                # sqrt(min(rows, cols) - r) * tol of the tolerance may be counted unlike the exact SVD.
                Vb, S, Ubh = torch.linalg.svd(stacked.T, full_matrices=False)  # [cols, k], [k], [k, k]
                numerical = numerical_args(delta.shape, delta.dtype)
                rank = rank_for_energy(S, total_energy, threshold, **numerical) or S.numel()
                if rank < S.numel():
                    passes += 1
                    floor = (min(rows, cols) - rank) * numerical_tolerance(float(S[0]), **numerical) ** 2
                    if _residual_energy(delta, basis, stacked) <= floor:
                        return AdaptiveRange((basis @ Ubh.T, S, Vb.T), rank, basis.shape[1], passes)
            if not lossless and captured >= target * (1.0 - 1e-9):
                # LAPACK is 2-3x slower on a wide matrix: decompose [k, cols] transposed.
                Vb, S, Ubh = torch.linalg.svd(stacked.T, full_matrices=False)  # [cols, k], [k], [k, k]
                rank = rank_for_energy(S, total_energy, threshold) or S.numel()
                # The truncation's error^2 is at most the optimum's plus the energy outside span(Q), and the
                # optimum's is at least the projection's tail: a residual under 2% of that tail keeps the
                # error within 1% of the optimum without more directions (an update of exactly low rank,
                # whose residual is rounding, needs none).
                # Before the last power iteration the bar is ten times higher (0.1% of the optimal
                # error): stopping early must not cost what the iterations it skips would have bought.
                last = iteration == POWER_ITERATIONS
                share = 0.02 if last else EARLY_SHARE
                residual = max(0.0, total_energy - captured)
                tail = float((S[rank:].double() ** 2).sum())
                oversampled = basis.shape[1] >= rank + oversampling(rank)
                if residual <= max(share * tail, 1e-9 * total_energy) or oversampled and (
                        last or _gap_allows(S, rank, total_energy - captured + tail, iteration)):
                    return AdaptiveRange((basis @ Ubh.T, S, Vb.T), rank, basis.shape[1], passes)
            else:
                # Each further direction holds at most about what this block's did on average (the
                # blocks follow the spectrum down; an unrefined block holds less): when even that
                # count passes the limit by a margin, growing on is only passes wasted before the
                # hand-over (a noise-only update gives up after its first two passes).
                average = (captured - before) / block
                needed = basis.shape[1] + ((target - captured) / average if average > 0 else math.inf)
                if needed > OVERFLOW_MARGIN * limit:
                    return AdaptiveRange(None, int(min(needed, min(rows, cols))), 0, passes)
            if iteration < POWER_ITERATIONS:
                Y = delta @ orthonormal(Pb.T)  # [rows, block]: one power iteration (delta delta^T Qb)
                passes += 1
        Q, projected = basis, stacked
        if not lossless and captured >= target * (1.0 - 1e-9):
            block = rank + oversampling(rank) - Q.shape[1]  # the oversampling still missing
            if Q.shape[1] + block > limit:
                return AdaptiveRange(None, rank, 0, passes)
            continue
        block *= 2


def _residual_energy(delta: torch.Tensor, basis: torch.Tensor, projected: torch.Tensor) -> float:
    """||delta - basis @ projected||_F^2 (delta [rows, cols], basis [rows, k], projected [k, cols]),
    measured directly a block of rows at a time (no [rows, cols] temporary): one pass over delta."""
    rows, cols = delta.shape
    step = max(1, PRODUCT_BLOCK_BYTES // (cols * delta.element_size()))
    return sum(frobenius_energy(delta[start:start + step] - basis[start:start + step] @ projected)
               for start in range(0, rows, step))


def fixed_rank_randomized(delta: torch.Tensor, rank: int, generator: torch.Generator | None,
                           max_fraction: float, total: float
                           ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, int]:
    """Range finder of width rank + oversampling with up to POWER_ITERATIONS + 1 power iterations
    (fewer when the spectrum decays fast, ``_gap_allows``), for ``--rank r``: ((U, S, Vh), passes).

    None when that width passes ``max_fraction`` of min(rows, cols) (or the whole matrix):
    the exact SVD is cheaper and exact there."""
    rows, cols = delta.shape
    width = rank + oversampling(rank)
    if width >= min(rows, cols) * min(max_fraction, 1.0) or width >= min(rows, cols):
        return None, 0
    Y = delta @ torch.randn(cols, width, device=delta.device, dtype=delta.dtype, generator=generator)
    passes = 1
    for iteration in range(POWER_ITERATIONS + 2):
        Q = orthonormal(Y)  # [rows, width]
        projected_t = delta.T @ Q  # [cols, width] = (Q.T @ delta).T: one pass
        passes += 1
        Vb, S, Ubh = torch.linalg.svd(projected_t, full_matrices=False)  # tall: faster than the wide one
        error2 = total - float(S[:rank].double().square().sum())
        if iteration == POWER_ITERATIONS + 1 or _gap_allows(S, rank, error2, iteration):
            return (Q @ Ubh.T, S, Vb.T), passes
        Y = delta @ orthonormal(projected_t)  # one power iteration
        passes += 1
    raise AssertionError("unreachable")
