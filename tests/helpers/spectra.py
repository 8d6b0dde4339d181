"""Synthetic updates with a known spectrum, for the linear algebra tests (tests/linalg/)."""

from __future__ import annotations

import torch

from inrank_convert.linalg.randomized import POWER_ITERATIONS


def low_rank_plus_noise(rows: int, cols: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, cols, generator=generator, dtype=torch.float64)
    signal = (left * torch.logspace(0, -1, rank, dtype=torch.float64)) @ right
    signal /= signal.norm()
    extra = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return (signal + extra * (noise / extra.norm())).float()


EPS32 = torch.finfo(torch.float32).eps


def rounded_low_rank(rows: int, cols: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W0, W, delta): an update of exactly rank ``rank`` as compress sees it, delta = (W0 + U @ V) - W0
    in float32 with W0 of ten times the update's norm, so the sum rounds (~eps |W0| per entry)."""
    generator = torch.Generator().manual_seed(seed)
    update = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)
    W0 = torch.randn(rows, cols, generator=generator)
    W0 *= 10 * update.norm() / W0.norm()
    W = W0 + update
    return W0, W, W - W0


ENGINES = ("exact", "randomized", "auto")


def flat_planted_update(rows: int, cols: int, rank: int, noise: float, seed: int) -> torch.Tensor:
    """A rank-``rank`` update with equal singular values plus Gaussian noise of relative energy
    ``noise``: a flat signal over a flat floor, the hardest case for a range finder."""
    generator = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, rank, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, rank, generator=generator, dtype=torch.float64))
    signal = U @ V.T
    extra = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    extra *= (noise * signal.square().sum() / extra.square().sum()).sqrt()
    return (signal + extra).float()


FULL_BLOCK_PASSES = 2 * POWER_ITERATIONS + 2
