"""Pure math: truncated SVD of an update, rank criteria, and the SVD engines.

Nothing here reads files or prints. Every function takes a 2-D float tensor ``delta`` of
shape [rows, cols] and works on whatever device it lives on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

CRITERIA = ("energy", "inrank")
ENGINES = ("auto", "exact", "randomized")

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
# The Gram engine forms the lower triangle of its Gram in this many row blocks (blocks narrower than
# GRAM_MIN_BLOCK lose more to small products than the skipped upper triangle saves).
GRAM_BLOCKS = 8
GRAM_MIN_BLOCK = 128
# The Gram engine's factor product (B = delta @ V_r) runs a block of rows at a time: a block's
# temporaries (its float32 -> bfloat16 copy) stay under glibc's 32 MiB mmap threshold, so they are
# reused instead of page-faulted in afresh (0.07 s of kernel time per 222 MB tensor here).
PRODUCT_BLOCK_BYTES = 16 << 20
# A bfloat16 factor product (AMX: 1.4 s -> 0.4 s for 32000 x 2048 at rank 1733, one thread) is used
# only when the rule drops at least this share of the energy: its rounding (about 2^-8 of each
# factor entry against bfloat16 storage's 2^-9) then adds under 0.03% to the stored error.
REDUCED_PRODUCT_MIN_TAIL = 0.01
# ... and only for a product of at least this many multiply-adds (long side x n x r; 4 ms in float32
# on one core here): a smaller one gains nothing worth its rounding (nor the 9 header bytes of the
# longer engine name: a 4 x 128 GPT-2 has 26 such tensors, 156 bytes).
REDUCED_PRODUCT_MIN_WORK = 1 << 28
# Rows of delta the reduced-precision product is checked against in float32, to measure (not
# assume) the error it adds: every k-th row, about this many.
PRODUCT_CHECK_ROWS = 2048


@dataclass(frozen=True)
class RankRule:
    """How to choose a rank from a spectrum: a criterion with a threshold, or a fixed rank."""

    criterion: str = "energy"
    threshold: float = 0.90
    fixed_rank: int | None = None

    def describe(self) -> str:
        if self.fixed_rank is not None:
            return f"rank={self.fixed_rank}"
        return f"{self.criterion}>={self.threshold:g}"


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
    needed by the energy rule at threshold >= 1)."""
    n = singular_values.numel()
    if rule.fixed_rank is not None:
        nonzero = int(torch.count_nonzero(singular_values > 0))
        return min(rule.fixed_rank, n, nonzero)
    if rule.criterion == "inrank":
        return rank_for_inrank(singular_values, rule.threshold)
    rank = rank_for_energy(singular_values, total_energy, rule.threshold, size=size, eps=eps)
    return n if rank is None else rank


def _balanced(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = S[:rank].sqrt()
    B = U[:, :rank] * root  # [rows, r]
    A = root[:, None] * Vh[:rank]  # [r, cols]
    return B.contiguous(), A.contiguous()


@dataclass
class FactorProductSVD:
    """The SVD of B @ A (B [rows, k], A [k, cols]) without forming the product: thin QRs B = Q_B R_B
    and A.T = Q_A R_A give B @ A = Q_B (R_B R_A^T) Q_A^T, so only the k x k middle is decomposed
    (U S Vh). Cost O((rows + cols) k^2) instead of O(rows cols k) plus a [rows, cols] SVD."""

    Q_B: torch.Tensor  # [rows, k]
    U: torch.Tensor  # [k, k]
    S: torch.Tensor  # [k], descending
    Vh: torch.Tensor  # [k, k]
    Q_A: torch.Tensor  # [cols, k]

    @classmethod
    def of(cls, B: torch.Tensor, A: torch.Tensor, svd=torch.linalg.svd) -> FactorProductSVD:
        """In B's and A's dtype; ``svd``: (matrix) -> (U, S, Vh)."""
        Q_B, R_B = torch.linalg.qr(B)
        Q_A, R_A = torch.linalg.qr(A.T)
        U, S, Vh = svd(R_B @ R_A.T)
        return cls(Q_B, U, S, Vh, Q_A)

    def balanced(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The leading ``count`` components as balanced factors: (Q_B U) sqrt(S) [rows, count] and
        sqrt(S) (Vh Q_A^T) [count, cols] (as ``_balanced``)."""
        root = self.S[:count].sqrt()
        return (self.Q_B @ self.U[:, :count]) * root, root[:, None] * (self.Vh[:count] @ self.Q_A.T)


def exact_svd(delta: torch.Tensor, float64: bool = False, solver=torch.linalg.svd
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Thin SVD ``delta = U diag(S) Vh``; retries in float64 (and gesvd on CUDA) if it fails.

    LAPACK is 2-3x slower on wide matrices, so a wide update is decomposed transposed.
    ``solver`` is torch.linalg.svd; it is a parameter so the retry path can be exercised.
    """
    notes: list[str] = []
    wide = delta.shape[0] < delta.shape[1]
    work = delta.T if wide else delta  # [max, min]
    dtype = torch.float64 if float64 else torch.float32
    try:
        U, S, Vh = solver(work.to(dtype), full_matrices=False)
    except RuntimeError as err:  # torch.linalg.LinAlgError (a RuntimeError) on non-convergence
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        notes.append(f"SVD in {str(dtype).removeprefix('torch.')} did not converge ({reason}); retried in float64"
                     + (" with gesvd" if work.is_cuda else ""))
        kwargs = {"driver": "gesvd"} if work.is_cuda else {}
        U, S, Vh = torch.linalg.svd(work.to(torch.float64), full_matrices=False, **kwargs)
    if wide:
        U, Vh = Vh.T, U.T
    return U.float(), S.float(), Vh.float(), notes


def singular_values(delta: torch.Tensor, float64: bool = False) -> torch.Tensor:
    """Every singular value of ``delta`` (in float64 on request), retried in float64 when the SVD
    does not converge, as ``exact_svd`` retries."""
    work = delta.double() if float64 else delta
    try:
        return torch.linalg.svdvals(work)
    except RuntimeError:  # torch.linalg.LinAlgError on non-convergence
        return torch.linalg.svdvals(work.double())


# The final basis size of the adaptive engine by update shape: a later update of the same shape
# starts with a block of that size (one block instead of a block plus its missing oversampling).
BasisHints = dict[tuple[int, ...], int]


@dataclass
class GramSpectrum:
    """The exact spectrum of ``delta`` [rows, cols] from the Gram matrix of its small side: ``G =
    delta.T @ delta`` [cols, cols] when tall (its eigenvectors are the right singular vectors),
    ``delta @ delta.T`` [rows, rows] when wide (the left ones).

    Why: once the adaptive basis overflows, the rule needs a rank beyond n / 8 and only the whole
    spectrum decides it. One Gram product, one symmetric eigendecomposition and B = delta @ V_r cost
    a fraction of a full SVD (32000 x 2048, one thread: 3 + 1.4 + 2.3 s against 26 s for the SVD),
    no U is ever formed, and past the break-even only the eigenvalues are needed.

    Precision: the Gram and its eigendecomposition are in delta's dtype (float32). Its rounding is
    ~1e-7 of the largest eigenvalue per value; measured on 4096 x 512 updates with steep (8 decades),
    power-law, dominant-component and flat spectra at thresholds 0.5 to 0.9999, every energy-rule rank
    equals the float64 SVD's, as the float32 SVD's does (and float64 eigenvalues changed none)."""

    values: torch.Tensor  # [n] float64, descending: the singular values
    vectors: torch.Tensor | None  # [n, n] delta's dtype, column i for values[i]; None: eigenvalues only
    wide: bool  # True: vectors are left singular vectors
    matrix: torch.Tensor | None = None  # the Gram [n, n], kept while the vectors are not made

    @classmethod
    def of(cls, delta: torch.Tensor, vectors: bool = True, gram: torch.Tensor | None = None) -> GramSpectrum:
        wide = delta.shape[0] < delta.shape[1]
        if gram is None:
            gram = lower_gram(delta.T if wide else delta)  # [n, n], lower triangle
        if vectors:
            eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
            return cls(eigenvalues.double().flip(0).clamp_min(0.0).sqrt(), eigenvectors.flip(1), wide)
        return cls(torch.linalg.eigvalsh(gram).double().flip(0).clamp_min(0.0).sqrt(), None, wide, gram)

    def with_vectors(self, delta: torch.Tensor) -> GramSpectrum:
        return self if self.vectors is not None else GramSpectrum.of(delta, vectors=True, gram=self.matrix)

    def right_vectors(self, delta: torch.Tensor, count: int) -> torch.Tensor:
        """The leading ``count`` right singular vectors [count, cols] (orthonormal rows): the
        eigenvectors themselves when tall; from the one product with ``delta`` that ``factors``
        makes when wide."""
        if self.vectors is None:
            raise ValueError("GramSpectrum.right_vectors needs the eigenvectors (with_vectors first)")
        if self.wide:
            return self.factors(delta, count).right
        return self.vectors[:, :count].to(delta.dtype).T.contiguous()

    def factors(self, delta: torch.Tensor, rank: int, products: torch.dtype | None = None) -> GramFactors:
        """B [rows, r], A [r, cols] and the right vectors [r, cols] of the projection of ``delta`` on
        its leading ``rank`` singular vectors: B = delta @ V_r, A = V_r.T (tall) or B = U_r, A =
        U_r.T @ delta (wide), each component balanced by sqrt(s) (as ``_balanced``).

        ``products``: the dtype of the one product with ``delta`` (bfloat16: see
        REDUCED_PRODUCT_MIN_TAIL); its error is measured on a sample of delta's long side."""
        if self.vectors is None:
            raise ValueError("GramSpectrum.factors needs the eigenvectors (with_vectors first)")
        basis = self.vectors[:, :rank].to(delta.dtype)  # [n, r] orthonormal columns
        root = self.values[:rank].clamp_min(1e-30).sqrt().to(delta.dtype)  # [r]
        # The balancing's 1 / sqrt(s) is folded into the small side first: the product gives the
        # balanced factor itself, with no [long, r] pass to divide it.
        scaled = basis / root  # [n, r]
        long = delta.T if self.wide else delta  # [long, n]
        product = _blocked_product(long, scaled, products or delta.dtype)  # [long, r]
        error = _product_error(long, scaled, product) if product.dtype != delta.dtype else None
        if self.wide:
            A = product.T.contiguous()  # [r, cols]: S_r^(1/2) V_r^T
            return GramFactors((basis * root).contiguous(), A, (A.to(delta.dtype) / root[:, None]).contiguous(), error)
        return GramFactors(product, (basis.T * root[:, None]).contiguous(), basis.T.contiguous(), error)


class GramFactors(NamedTuple):
    """What ``GramSpectrum.factors`` computes (see there)."""

    B: torch.Tensor  # [rows, r]
    A: torch.Tensor  # [r, cols]
    right: torch.Tensor  # [r, cols], orthonormal rows
    product_error: torch.Tensor | None  # [r] float64, see Factorization.product_error (None: a float32 product)


def _blocked_product(X: torch.Tensor, Y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """X [m, k] @ Y [k, r] in ``dtype`` (float32 accumulation), a block of X's rows at a time
    (PRODUCT_BLOCK_BYTES): [m, r] in ``dtype``."""
    out = torch.empty(X.shape[0], Y.shape[1], dtype=dtype, device=X.device)
    right = Y.to(dtype)
    step = max(1, PRODUCT_BLOCK_BYTES // max(1, X.shape[1] * X.element_size()))
    for start in range(0, X.shape[0], step):
        torch.matmul(X[start:start + step].to(dtype), right, out=out[start:start + step])
    return out


def _product_error(X: torch.Tensor, Y: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """The squared error of each column of ``product`` (a reduced-precision X @ Y, [m, r]) against
    the float32 product, estimated from every k-th row (PRODUCT_CHECK_ROWS of them) and scaled to
    all m: [r] float64. Deterministic (no sampling seed), so the recorded error is reproducible."""
    rows = X.shape[0]
    step = max(1, rows // PRODUCT_CHECK_ROWS)
    exact = X[::step] @ Y  # [m / step, r] float32
    return (product[::step].to(exact.dtype) - exact).double().square().sum(dim=0) * (rows / exact.shape[0])


def lower_gram(X: torch.Tensor, blocks: int = GRAM_BLOCKS) -> torch.Tensor:
    """The lower triangle of ``X.T @ X`` [n, n] for X [m, n] (the upper one is zeros): what
    ``torch.linalg.eigh`` reads. A block of rows at a time against the columns up to its own, so
    about (blocks + 1) / (2 * blocks) of the full product's flops (32000 x 2048, 8 blocks: 1.13 s
    against 1.65 s on one thread)."""
    n = X.shape[1]
    step = -(-n // blocks)
    if n < 2 * GRAM_MIN_BLOCK or step < GRAM_MIN_BLOCK:
        return torch.tril(X.T @ X)
    gram = X.new_zeros(n, n)
    for start in range(0, n, step):
        gram[start:start + step, :start + step] = X[:, start:start + step].T @ X[:, :start + step]
    return gram


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
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
    Qb = _orthonormal(Y)
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
    outside it is within the rounding floor instead (see ``_adaptive``).

    Returns the leading U, S, Vh, or None when the basis would pass ``max_fraction`` of
    min(rows, cols) (or, from the energy the blocks so far captured, clearly will): the caller
    should then use an exact engine, which is cheaper there (and is what small matrices get).
    """
    return _adaptive(delta, total_energy, threshold, generator, max_fraction).found


@dataclass
class _Adaptive:
    """What the adaptive range finder ended with."""

    found: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # U [rows, k], S [k], Vh [k, cols]
    rank: int  # the rule's rank; when ``found`` is None a low estimate of it
    basis: int  # the final basis size k (0 when it gave up)
    passes: int  # products with delta (each reads the whole update once)


def _adaptive(delta: torch.Tensor, total_energy: float, threshold: float, generator: torch.Generator | None,
              max_fraction: float, first_block: int | None = None) -> _Adaptive:
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
            return _Adaptive(None, max(rank, limit + 1), 0, passes)
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
                        return _Adaptive((basis @ Ubh.T, S, Vb.T), rank, basis.shape[1], passes)
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
                    return _Adaptive((basis @ Ubh.T, S, Vb.T), rank, basis.shape[1], passes)
            else:
                # Each further direction holds at most about what this block's did on average (the
                # blocks follow the spectrum down; an unrefined block holds less): when even that
                # count passes the limit by a margin, growing on is only passes wasted before the
                # hand-over (a noise-only update gives up after its first two passes).
                average = (captured - before) / block
                needed = basis.shape[1] + ((target - captured) / average if average > 0 else math.inf)
                if needed > OVERFLOW_MARGIN * limit:
                    return _Adaptive(None, int(min(needed, min(rows, cols))), 0, passes)
            if iteration < POWER_ITERATIONS:
                Y = delta @ _orthonormal(Pb.T)  # [rows, block]: one power iteration (delta delta^T Qb)
                passes += 1
        Q, projected = basis, stacked
        if not lossless and captured >= target * (1.0 - 1e-9):
            block = rank + oversampling(rank) - Q.shape[1]  # the oversampling still missing
            if Q.shape[1] + block > limit:
                return _Adaptive(None, rank, 0, passes)
            continue
        block *= 2


def _residual_energy(delta: torch.Tensor, basis: torch.Tensor, projected: torch.Tensor) -> float:
    """||delta - basis @ projected||_F^2 (delta [rows, cols], basis [rows, k], projected [k, cols]),
    measured directly a block of rows at a time (no [rows, cols] temporary): one pass over delta."""
    rows, cols = delta.shape
    step = max(1, PRODUCT_BLOCK_BYTES // (cols * delta.element_size()))
    return sum(frobenius_energy(delta[start:start + step] - basis[start:start + step] @ projected)
               for start in range(0, rows, step))


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
        return _gram_factorization(work, prior.gram, rule, total, max_rank, [], products)  # the caller holds prior's notes
    estimate = passes = 0
    if use_randomized:
        max_fraction = 1.0 if engine == "randomized" else RANDOMIZED_MAX_FRACTION
        if rule.fixed_rank is not None:
            found, passes = _fixed_rank_randomized(work, min(rule.fixed_rank, n), generator, max_fraction, total)
        else:
            shape = tuple(work.shape)
            adaptive = _adaptive(work, total, rule.threshold, generator, max_fraction,
                                 None if hints is None else hints.get(shape))
            found, estimate, passes = adaptive.found, adaptive.rank, adaptive.passes
            if hints is not None and found is not None:
                hints[shape] = adaptive.basis
        if found is not None:
            U, S, Vh = found
            # S holds only the leading values, but choose_rank's energy total is the exact one.
            rank = min(choose_rank(S, total, rule, **numerical), S.numel())
            B, A = _balanced(U, S, Vh, rank)
            kept = float((S[:rank].double() ** 2).sum()) / total
            return Factorization(B.float(), A.float(), rank, min(kept, 1.0), total, S.float(), "randomized", notes,
                                 Vh.float(), passes=passes)
        if gram_allowed:
            # Not a warning: auto hands high ranks to an exact engine by design. The eigenvectors
            # are left out when even the low estimate of the rank is past the break-even.
            notes.append("randomized basis would pass its size limit: used the Gram matrix's exact spectrum")
            surely_dense = max_rank is not None and estimate > max_rank
            found = _gram_factorization(work, GramSpectrum.of(work, vectors=not surely_dense), rule, total,
                                        max_rank, notes, products)
            found.passes = passes  # those the randomized engine spent before handing over
            return found
        notes.append("randomized basis would pass its size limit: used the exact SVD")

    U, S, Vh, svd_notes = exact_svd(work, float64=float64, solver=solver)
    notes.extend(svd_notes)
    rank = choose_rank(S, total, rule, **numerical)
    B, A = _balanced(U, S, Vh, rank)
    kept = float((S[:rank].double() ** 2).sum()) / total
    used = "exact-float64" if (float64 or svd_notes) else "exact"
    return Factorization(B.float(), A.float(), rank, min(kept, 1.0), total, S.float(), used, notes, Vh.float())


def _gram_factorization(work: torch.Tensor, gram: GramSpectrum, rule: RankRule, total: float, max_rank: int | None,
                        notes: list[str], products: torch.dtype | None = None) -> Factorization:
    """The factorization ``rule`` asks for from an exact Gram spectrum; no factors past ``max_rank``."""
    rows, cols = work.shape
    values = gram.values  # [n] float64
    # Never a rule at threshold 1 (gram_allowed; effective_threshold keeps a rule below 1 below it).
    rank = choose_rank(values, total, rule, **numerical_args(work.shape, work.dtype))
    energy = min(1.0, float(values[:rank].square().sum()) / total)
    if max_rank is not None and rank > max_rank:
        # Dense is decided: no factors; ``leading_right_vectors`` makes the leading right vector from
        # the spectrum if the rows form asks for it (only with a dominant component).
        return Factorization(work.new_zeros(rows, 0), work.new_zeros(0, cols), rank, energy, total, values.float(),
                             "gram", [*notes, f"the rule needs rank {rank}, past the break-even rank {max_rank}: "
                                      "no factors computed"], None, gram)
    gram = gram.with_vectors(work)
    reduced = (products is not None and products != work.dtype and 1.0 - energy >= REDUCED_PRODUCT_MIN_TAIL
               and rows * cols * rank >= REDUCED_PRODUCT_MIN_WORK)
    made = gram.factors(work, rank, products if reduced else None)
    engine = f"gram-{str(products).removeprefix('torch.')}" if reduced else "gram"
    # A factor the bfloat16 product computed stays bfloat16: exactly what its storage keeps, and half
    # the memory (a float32 copy of a 32000 x 1733 B is 222 MB more to fault in and convert back).
    return Factorization(made.B, made.A, rank, energy, total, values.float(), engine, notes,
                         made.right.float(), gram, product_error=made.product_error)


def leading_right_vectors(delta: torch.Tensor, found: Factorization, count: int) -> torch.Tensor:
    """The leading ``count`` right singular vectors of ``delta`` [count, cols] that ``found`` (a
    factorization of it) computed, made from its Gram spectrum when it stopped short of them."""
    if found.right_vectors is not None and found.right_vectors.shape[0] >= count:
        return found.right_vectors[:count]
    if found.gram is None:
        return found.A[:count]
    work = delta.float()
    return found.gram.with_vectors(work).right_vectors(work, count)


def _fixed_rank_randomized(delta: torch.Tensor, rank: int, generator: torch.Generator | None,
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
        Q = _orthonormal(Y)  # [rows, width]
        projected_t = delta.T @ Q  # [cols, width] = (Q.T @ delta).T: one pass
        passes += 1
        Vb, S, Ubh = torch.linalg.svd(projected_t, full_matrices=False)  # tall: faster than the wide one
        error2 = total - float(S[:rank].double().square().sum())
        if iteration == POWER_ITERATIONS + 1 or _gap_allows(S, rank, error2, iteration):
            return (Q @ Ubh.T, S, Vb.T), passes
        Y = delta @ _orthonormal(projected_t)  # one power iteration
        passes += 1
    raise AssertionError("unreachable")


def stored_as_lowrank(rank: int, rows: int, cols: int) -> bool:
    """Low rank pays only when r * (rows + cols) < rows * cols."""
    return rank * (rows + cols) < rows * cols


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (a CPU with AMX-BF16): only there is a
    bfloat16 product faster than the float32 one (elsewhere it is emulated, often slower)."""
    if device.type != "cpu":
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.6
    return bool(capabilities is not None and capabilities().get("amx_bf16", False))
