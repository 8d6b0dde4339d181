"""linalg/tangent.py: the rank an update needs beyond a kept rank, against a dense float64 oracle."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.linalg.tangent import rank_beyond_tangent


def oracle(B, A, B_before, A_before, rank, threshold) -> int:
    """The same rule on dense float64 matrices: N = (I - U U^T) D (I - V V^T)."""
    B, A, B_before, A_before = (t.double() for t in (B, A, B_before, A_before))
    P, D = B @ A, B @ A - B_before @ A_before
    U, _, Vh = torch.linalg.svd(P, full_matrices=False)
    U, V = U[:, :rank], Vh[:rank].T
    N = D - U @ (U.T @ D) - (D @ V) @ V.T + U @ (U.T @ D @ V) @ V.T
    total, normal = float(D.square().sum()), torch.linalg.svdvals(N) ** 2
    tangent = total - float(normal.sum())
    if tangent >= threshold * total:
        return 0
    for j in range(1, normal.numel() + 1):
        if tangent + float(normal[:j].sum()) >= threshold * total * (1 - 1e-12):
            return j
    return normal.numel()


def factors(rows, cols, k, seed, scales):
    generator = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))
    return U * torch.tensor(scales, dtype=torch.float64), V.T.clone()  # [rows, k], [k, cols]


@pytest.mark.parametrize("rank", [0, 2, 4])
@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_the_rank_beyond_the_tangent_space_equals_a_dense_oracle(rank, threshold):
    B, A = factors(40, 30, 7, 0, [10.0, 8.0, 5.0, 3.0, 1.0, 0.5, 0.2])
    generator = torch.Generator().manual_seed(1)
    # The update moves every factor: kept and buffer components alike, and a component outside all of them.
    B_before = B + 0.3 * torch.randn(B.shape, generator=generator, dtype=torch.float64)
    A_before = A + 0.3 * torch.randn(A.shape, generator=generator, dtype=torch.float64)
    got = rank_beyond_tangent(B.float(), A.float(), B_before.float(), A_before.float(), rank, threshold)
    assert got == oracle(B.float(), A.float(), B_before.float(), A_before.float(), rank, threshold)
    if threshold == 0.99 and rank == 2:
        assert got > 0  # the planted update does reach outside the kept rank's tangent space


def test_an_update_the_kept_rank_can_follow_needs_no_growth():
    B, A = factors(40, 30, 6, 2, [9.0, 7.0, 4.0, 0.1, 0.1, 0.1])
    # D = U_3 X + Y V_3^T: in the tangent space of the leading 3 components, however large.
    generator = torch.Generator().manual_seed(3)
    X, Y = torch.randn(3, 30, generator=generator, dtype=torch.float64), torch.randn(40, 3, generator=generator,
                                                                                      dtype=torch.float64)
    U, V = B[:, :3] / B[:, :3].norm(dim=0), A[:3].T
    B_before, A_before = torch.cat([B, -U, -Y], dim=1), torch.cat([A, X, V.T], dim=0)  # B A - B_before A_before = U X + Y V^T
    assert rank_beyond_tangent(B, A, B_before, A_before, 3, 0.999) == 0
    assert rank_beyond_tangent(B, A, B, A, 3, 0.9) == 0  # no update at all


def test_a_new_direction_in_the_buffer_asks_for_one_more_component():
    B, A = factors(40, 30, 4, 4, [10.0, 9.0, 0.0, 0.0])
    grown = B.clone()
    grown[:, 2] = torch.linalg.qr(torch.randn(40, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))[0][:, 2]
    # The product's energy barely moves (1 against 181), but the whole update is a new direction.
    assert rank_beyond_tangent(grown, A, B, A, 2, 0.9) == 1
    assert rank_beyond_tangent(grown, A, B, A, 3, 0.9) == 0  # a rank that already holds it
