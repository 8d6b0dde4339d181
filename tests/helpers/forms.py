"""Updates with a planted structure and the byte costs of stored forms, for the tests of
linalg/forms.py, linalg/stored_error.py and linalg/budget.py."""

from __future__ import annotations

import torch

from inrank_convert.linalg import forms
from inrank_convert.linalg.forms import Costs

THRESHOLD = 0.9


BF16 = 2  # bytes per stored number at the default (bfloat16) storage


INDEX = 8  # bytes of a stored row's int64 index


def energy(delta: torch.Tensor) -> float:
    return float(delta.double().pow(2).sum())


def bf16_costs(delta: torch.Tensor) -> Costs:
    """bfloat16 factors and rows of a float32 source tensor."""
    return Costs(element=BF16, vector=0, dense=delta.numel() * 4)


def scattered(rows: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    dense = torch.zeros(rows, values.shape[1], dtype=values.dtype)
    dense[index] = values
    return dense


def stored_product(form: forms.Form, rows: int, cols: int) -> torch.Tensor:
    """B @ A (+ the rows in their places) in float64: what the form stores, before rounding."""
    product = form.B.double() @ form.A.double() if form.B is not None else torch.zeros(rows, cols, dtype=torch.float64)
    if form.rows is not None:
        product = product + scattered(rows, form.row_index, form.rows.double())
    return product


def planted_drift_and_rows(rows: int = 2000, cols: int = 32, planted: int = 100, drift_share: float = 0.95,
                           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta [rows, cols] float32, the planted row indices): the same drift vector added to every row,
    holding ``drift_share`` of the energy, plus an update of one common norm in a random direction
    on ``planted`` rows (an embedding: every token drifts, the tokens the text shows move on their own)."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(1, cols, generator=generator)
    drift = torch.ones(rows, 1) @ direction  # rank 1
    index = torch.randperm(rows, generator=generator)[:planted]
    own = torch.randn(planted, cols, generator=generator)
    own = own / own.norm(dim=1, keepdim=True)
    row_energy = energy(drift) * (1 - drift_share) / drift_share / planted
    delta = drift.clone()
    delta[index] += own * row_energy**0.5
    return delta, index


def counting_svd(calls: list):
    """torch.linalg.svd, counted: the full SVDs a decision took (factorize's ``solver``)."""
    def solver(matrix, full_matrices=False):
        calls.append(tuple(matrix.shape))
        return torch.linalg.svd(matrix, full_matrices=full_matrices)
    return solver


def bf16_source_costs(delta: torch.Tensor) -> Costs:
    """bfloat16 factors of a bfloat16 source (dense = 2 bytes a number): break-even near r (m + n) = m n."""
    return Costs(element=BF16, vector=0, dense=delta.numel() * BF16)


def form_bytes(form: forms.Form, costs: Costs, rows: int, cols: int) -> int:
    if form.kind == "dense":
        return costs.dense
    return costs.lowrank(form.rank, rows, cols) + costs.row_set(form.stored_rows, cols)


def planted_low_rank(rows: int = 768, cols: int = 256, rank: int = 32, noise: float = 0.05,
                     seed: int = 3) -> tuple[torch.Tensor, float]:
    """(delta, its energy): a rank-32 update (random factors) with ``noise`` of its energy as Gaussian noise."""
    generator = torch.Generator().manual_seed(seed)
    signal = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)
    extra = torch.randn(rows, cols, generator=generator)
    delta = signal / signal.norm() * (1 - noise) ** 0.5 + extra / extra.norm() * noise**0.5
    return delta, energy(delta)


def drift_plus_rows(rows: int = 600, cols: int = 24, planted: int = 40, seed: int = 0) -> torch.Tensor:
    """An embedding-like update: one drift shared by every row (rank 1, most of the energy) plus own rows."""
    generator = torch.Generator().manual_seed(seed)
    delta = torch.ones(rows, 1) @ torch.randn(1, cols, generator=generator)
    index = torch.randperm(rows, generator=generator)[:planted]
    delta[index] += 0.5 * torch.randn(planted, cols, generator=generator)
    return delta
