"""How much rank an update needs beyond the rank a factorization keeps.

A rank-r factorization of P can follow, to first order, any change in the tangent space of the
rank-r matrices at P: {U_r X + Y V_r^T}, U_r and V_r P's leading r singular vectors. What lies
outside it, N = (I - U_r U_r^T) D (I - V_r V_r^T), can only be learned by new components. When the
recent update D of a low-rank layer holds more than 1 - t of its energy in N, the rank r no longer
explains t of what the layer is learning, and it should grow: the rank-growth signal that looks at
the update rather than at the product (whose energy, after a warm-started switch, stays on the
components kept at the switch; docs/results.md).
"""

from __future__ import annotations

import torch

from inrank_convert.linalg.svd import FactorProductSVD


def _energy(values: torch.Tensor) -> torch.Tensor:
    return values.double() ** 2


def rank_beyond_tangent(B: torch.Tensor, A: torch.Tensor, B_before: torch.Tensor, A_before: torch.Tensor,
                        rank: int, threshold: float) -> int:
    """The components beyond ``rank`` that the update D = B A - B_before A_before needs so that
    ``threshold`` of its energy is held: 0 when the tangent space of P = B A's leading ``rank``
    components holds it, else the smallest j with ||D||^2 - ||N||^2 + sum(s_i(N)^2, i <= j) >=
    threshold ||D||^2, N the normal part. Never forms a [rows, cols] matrix: D = L R with
    L = [B, -B_before] ([rows, k + k']) and R = [A; A_before] ([k + k', cols])."""
    B, A = B.detach().double(), A.detach().double()
    L = torch.cat([B, -B_before.detach().double().to(B.device)], dim=1)  # [rows, k + k']
    R = torch.cat([A, A_before.detach().double().to(A.device)], dim=0)  # [k + k', cols]
    # ||D||^2 from D's spectrum, not trace(L^T L R R^T): that trace is a difference of the two
    # products' energies and cancels to noise when the update is small beside them.
    total = float(_energy(FactorProductSVD.of(L, R).S).sum())
    if total == 0.0:
        return 0
    kept = max(0, min(rank, B.shape[1]))
    if kept:
        svd = FactorProductSVD.of(B, A)
        U = svd.Q_B @ svd.U[:, :kept]  # [rows, r]: P's leading left singular vectors
        V = svd.Q_A @ svd.Vh[:kept].T  # [cols, r]: its leading right singular vectors
        L = L - U @ (U.T @ L)
        R = R - (R @ V) @ V.T
    normal = _energy(FactorProductSVD.of(L, R).S)  # descending: N's spectrum
    tangent = total - float(normal.sum())
    if tangent >= threshold * total:
        return 0
    held = tangent + torch.cumsum(normal, dim=0)
    reached = torch.nonzero(held >= threshold * total * (1 - 1e-12))
    return int(reached[0]) + 1 if reached.numel() else normal.numel()
