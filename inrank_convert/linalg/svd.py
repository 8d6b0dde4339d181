"""The exact SVD helpers every engine shares: ``exact_svd`` / ``singular_values`` are the full
decompositions with their float64 retry, ``balanced_factors`` splits a truncation into B @ A with
sqrt(s) on each side, and ``FactorProductSVD`` decomposes a product B @ A without forming it.
Every function takes 2-D float tensors and works on whatever device they live on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The Gram engine's factor product (B = delta @ V_r) runs a block of rows at a time: a block's
# temporaries (its float32 -> bfloat16 copy) stay under glibc's 32 MiB mmap threshold, so they are
# reused instead of page-faulted in afresh (0.07 s of kernel time per 222 MB tensor here).
PRODUCT_BLOCK_BYTES = 16 << 20


def balanced_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
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
        sqrt(S) (Vh Q_A^T) [count, cols] (as ``balanced_factors``)."""
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
