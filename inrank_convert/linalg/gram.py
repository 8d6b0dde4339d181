"""The Gram engine: an update's exact spectrum from the Gram matrix of its small side.

What ``factorize`` hands the energy rule to once the adaptive randomized basis overflows (the rule
needs a rank beyond n / 8): one Gram product, one symmetric eigendecomposition and one product for
the factors, optionally in bfloat16 where the CPU multiplies it natively.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from inrank_convert.linalg.svd import PRODUCT_BLOCK_BYTES

# The Gram engine forms the lower triangle of its Gram in this many row blocks (blocks narrower than
# GRAM_MIN_BLOCK lose more to small products than the skipped upper triangle saves).
GRAM_BLOCKS = 8
GRAM_MIN_BLOCK = 128
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
        U_r.T @ delta (wide), each component balanced by sqrt(s) (as ``balanced_factors``).

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


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (a CPU with AMX-BF16): only there is a
    bfloat16 product faster than the float32 one (elsewhere it is emulated, often slower)."""
    if device.type != "cpu":
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.6
    return bool(capabilities is not None and capabilities().get("amx_bf16", False))
