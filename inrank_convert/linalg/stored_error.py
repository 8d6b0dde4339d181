"""The error of what a reader gets back: ||delta - (B @ A + rows)||_F / ||delta||_F of a stored form,
measured a block of rows at a time, or (for truncated-SVD factors) priced from norms alone.
"""

from __future__ import annotations

import torch

from inrank_convert.linalg.criteria import frobenius_energy
from inrank_convert.linalg.svd import PRODUCT_BLOCK_BYTES

SVD_ERROR_FLOOR = 1e-2  # see svd_stored_error


def stored_error(delta: torch.Tensor, total: float, B: torch.Tensor, A: torch.Tensor, rows: torch.Tensor | None,
                 row_index: torch.Tensor | None, block: int = 4096) -> float:
    """||delta - (B @ A + rows)||_F / ||delta||_F of what a reader gets back, a block of rows at a time."""
    if total == 0.0:
        return 0.0
    error = 0.0
    placed = None
    if rows is not None:
        placed = torch.full((delta.shape[0],), -1, dtype=torch.int64)
        placed[row_index] = torch.arange(row_index.numel())
    for start in range(0, delta.shape[0], block):
        residual = delta[start:start + block] - B[start:start + block] @ A  # [block, cols]
        if placed is not None:
            here = placed[start:start + block]
            mask = here >= 0
            residual[mask] -= rows[here[mask]]
        error += frobenius_energy(residual)
    return min(1.0, error / total) ** 0.5


# The norms below run a row block of PRODUCT_BLOCK_BYTES at a time (the Gram engine's reason: whole
# [rows, r] temporaries, 222 MB on a 32000 x 2048 rank-1733 embedding, were each page-faulted in afresh).


def _column_energies(X: torch.Tensor, scale: torch.Tensor | None = None, minus: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """sum_i (X[i] * scale - minus[i])^2 of each column of X [rows, r] (float32 arithmetic, float64
    sums), a block of rows at a time: [r] float64."""
    step = max(1, PRODUCT_BLOCK_BYTES // max(1, X.shape[1] * 4))
    sums = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    for start in range(0, X.shape[0], step):
        block = X[start:start + step].float()
        if scale is not None:
            block = block * scale[None, :]
        if minus is not None:
            block = block - minus[start:start + step]
        # Column sums, not vector_norm(dim=0): that strided reduction took 7x longer (1.07 s on 32000 x 1733).
        sums += block.square().sum(dim=0).double()
    return sums


def svd_stored_error(total: float, B: torch.Tensor, A: torch.Tensor, B_stored: torch.Tensor, A_stored: torch.Tensor,
                     product_error: torch.Tensor | None = None, stored_scale: torch.Tensor | None = None) -> float | None:
    """``stored_error`` of a low-rank form whose B [rows, r], A [r, cols] are a truncated SVD of
    delta (``Form.svd_factors``), from norms alone, with no [rows, cols] product: None when the
    truncation error is too small for that (then measure with ``stored_error``).

    With R = delta - B @ A, beta = B_stored - B and alpha = A_stored - A (the storage rounding):
    delta - B_stored @ A_stored = R - beta @ A - B @ alpha - beta @ alpha. ||R||^2 = ||delta||^2 -
    sum_j ||B_j||^2 ||A_j||^2; B.T @ R = 0 removes R's product with B @ alpha; A's orthogonal rows and
    B's orthogonal columns make ||beta @ A||^2 = sum_j ||beta_j||^2 ||A_j||^2 and ||B @ alpha||^2 =
    sum_j ||B_j||^2 ||alpha_j||^2. What is left out (R against beta @ A, beta @ A against B @ alpha,
    beta @ alpha) are products of independent roundings: second order (measured within 1e-4 of the
    measured error for float32, bfloat16 and int8 storage). The [rows, cols] product this saves costs
    as much as computing B (2 s of a 32000 x 2048 rank-1733 embedding on one thread).

    ``B_stored``, ``A_stored`` are what is stored, decoded or not: float, bfloat16 or int8 with
    ``stored_scale`` ([r], on B: ``storage.encode_factors``'s), so that no float32 copy of a large
    factor is made. ``product_error`` (``Form.product_error``): what a reduced-precision product
    already added to the factor it computed (B's columns for a tall update, A's rows for a wide
    one), independent of the storage rounding, so its squares add to that side's."""
    if total <= 0.0:
        return 0.0
    # A factor may be bfloat16 (the one a reduced-precision product computed): every norm below is
    # taken in float32 a block at a time, A's through its transpose.
    product_on_b = B.shape[0] >= A.shape[1]  # the Gram engine multiplies the long side: B when tall
    factor_a = _column_energies(A.T)  # [r]
    # The computed side's norms are off by its product's error, and not only second order (the
    # bfloat16 product's rounding shrank them: ||B||^2 8e-6 of the total low on the 32000 x 2048
    # case). The exact factors are balanced (||B_j|| = ||A_j|| = sqrt(s_j)): take the other side's.
    b_energies = None if product_error is not None and product_on_b else _column_energies(B)  # [r]
    factor_b = factor_a if b_energies is None else b_energies
    if product_error is not None and not product_on_b:
        factor_a = factor_b
    truncation = total - float((factor_b * factor_a).sum())
    # The float32 factors hold the identity ||R||^2 = ||delta||^2 - ||B @ A||^2 to ~1e-6 of the total:
    # below SVD_ERROR_FLOOR of it that would be more than 1e-4 of the error^2, so it is measured instead.
    if truncation < SVD_ERROR_FLOOR * total:
        return None
    # A stored component may carry its scale on either side (int8 puts both scales on B): move it
    # back to A's norm first, which leaves every product B_j A_j, and so the error, as it is.
    shift = (_column_energies(A_stored.T).sqrt() / factor_a.sqrt().clamp_min(1e-30)).clamp_min(1e-30).float()  # [r]
    b_scale = shift if stored_scale is None else shift * stored_scale.float()
    if B_stored is B:  # stored as computed (a bfloat16 product kept in bfloat16): beta = B (shift - 1)
        rounding_b = (b_scale.double() - 1.0).square() * (_column_energies(B) if b_energies is None else b_energies)
    else:
        rounding_b = _column_energies(B_stored, b_scale, B)
    rounding_a = _column_energies(A_stored.T, 1.0 / shift, A.T)
    if product_error is not None:
        if product_on_b:
            rounding_b = rounding_b + product_error
        else:
            rounding_a = rounding_a + product_error
    rounding = float((rounding_b * factor_a + factor_b * rounding_a).sum())
    return min(1.0, (truncation + rounding) / total) ** 0.5


def output_error(delta: torch.Tensor, B: torch.Tensor, A: torch.Tensor, rows: torch.Tensor | None,
                 row_index: torch.Tensor | None, gram: torch.Tensor, conv1d: bool = False) -> float:
    """||X (delta - stored)^T||_F / ||X delta^T||_F: the relative error of the layer's outputs on the
    inputs X whose Gram ``gram`` = X^T X ([in, in]) is, for the stored B [rows, r] @ A [r, cols]
    (+ ``rows`` at ``row_index``); ``delta`` is [out, in] (nn.Linear) or [in, out] (``conv1d``,
    GPT-2's Conv1D). With E = delta - stored in the [out, in] orientation, ||X E^T||^2 = tr(E G E^T),
    summed a block of output features at a time in float64 (the raw Gram, no damping: the error the
    calibration text's outputs really see). 0 when the update moves no output."""
    residual = delta.float() - B.float() @ A.float()  # [rows, cols], the stored orientation
    if rows is not None:
        residual.index_add_(0, row_index.to(residual.device), -rows.float())
    gram = gram.to(device=delta.device, dtype=torch.float64)
    error = total = 0.0
    width = delta.shape[1] if conv1d else delta.shape[0]  # output features
    step = max(1, PRODUCT_BLOCK_BYTES // max(1, 8 * gram.shape[0]))
    for start in range(0, width, step):
        # [block, in] slices of E and delta in the [out, in] orientation.
        if conv1d:
            parts = (residual[:, start:start + step].T, delta[:, start:start + step].T)
        else:
            parts = (residual[start:start + step], delta[start:start + step])
        E, D = (part.to(torch.float64) for part in parts)
        error += float(((E @ gram) * E).sum())
        total += float(((D @ gram) * D).sum())
    if total <= 0.0:
        return 0.0
    return (max(0.0, error) / total) ** 0.5  # not capped at 1: a stored form can move outputs more than the update
