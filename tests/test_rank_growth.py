"""InRank's rank decision as the reference makes it: the explained-ratio scan over the buffer
(against a float64 oracle written from the reference's loop), and ranks that follow a planted
update whose rank rises during training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inrank_convert.linalg.criteria import explained_ratios, inrank_scan
from inrank_convert.model.layers import LowRankLinear
from inrank_convert.training.rank_control import (
    RankController,
    RankPolicy,
    factor_singular_values,
    grow_layer,
)


def reference_scan(s: torch.Tensor, full_rank: int, current: int, buffer: int, max_rank: int, threshold: float) -> int:
    """The reference's loop, literally, in float64: the spectrum zero-padded to the full rank,
    ``1 - var(s - s_k) / var(s)`` with s_k = s zeroed from k on, first k strictly above."""
    padded = torch.zeros(full_rank, dtype=torch.float64)
    padded[: s.numel()] = s.double()
    index = current
    for index in range(current, min(current + buffer, max_rank - buffer)):
        kept = padded.clone()
        kept[index:] = 0
        ratio = 1 - torch.var(padded - kept) / torch.var(padded)
        if ratio > threshold:
            break
    return index


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.99, 1.0])
def test_the_buffer_scan_agrees_with_a_float64_oracle(decay):
    generator = torch.Generator().manual_seed(int(decay * 100))
    checked = 0
    for out_features, in_features, width in [(96, 64, 20), (64, 200, 40), (128, 128, 70)]:
        full = min(out_features, in_features)
        # B @ A with a chosen spectrum: decaying geometrically (1.0: flat, a random product's shape).
        U, _ = torch.linalg.qr(torch.randn(out_features, width, generator=generator, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(in_features, width, generator=generator, dtype=torch.float64))
        values = decay ** torch.arange(width, dtype=torch.float64) * (1 + 0.1 * torch.rand(width, generator=generator, dtype=torch.float64))
        B, A = (U * values).float(), V.T.float()  # [out, k], [k, in]
        oracle_values = torch.linalg.svdvals(B.double() @ A.double())  # full-length spectrum of the product
        measured = factor_singular_values(B, A)  # k values, from thin QRs
        for current in (0, 2, width // 3, width - 12):
            for buffer in (4, 12):
                for threshold in (0.5, 0.9, 0.99):
                    ours = inrank_scan(measured, full, current, buffer, full // 2, threshold)
                    oracle = reference_scan(oracle_values, full, current, buffer, full // 2, threshold)
                    assert ours == oracle, (out_features, in_features, width, current, buffer, threshold)
                    checked += 1
    assert checked == 3 * 4 * 2 * 3


def test_the_scan_grows_by_less_than_the_buffer_and_never_past_the_width_cap():
    flat = torch.ones(60, dtype=torch.float64)  # nothing explains a flat spectrum: every decision grows
    assert inrank_scan(flat, 128, 10, 8, 64, 0.9) == 17  # at most buffer - 1
    assert inrank_scan(flat, 128, 50, 8, 64, 0.9) == 55  # rank + buffer stays within max_rank
    assert inrank_scan(flat, 128, 56, 8, 64, 0.9) == 56  # at the cap: kept
    assert inrank_scan(torch.zeros(10), 128, 3, 8, 64, 0.9) == 3  # an empty update asks for nothing


def planted_layer(features: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    W_ref = torch.randn(features, features, generator=generator) / features ** 0.5
    U, _ = torch.linalg.qr(torch.randn(features, features, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(features, features, generator=generator))
    return generator, W_ref, U, V


def train_with_decisions(model: nn.Module, controller: RankController, target: torch.Tensor, steps: int,
                         optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
    """Regression of the layer onto ``target`` ([out, in]) with the rank decisions on their schedule."""
    features = target.shape[1]
    for step in range(steps):
        x = torch.randn(256, features, generator=generator)
        loss = (model(x) - x @ target.T).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if controller.policy.due(step + 1):
            for name, width in controller.decide(model).items():
                grow_layer(model.get_submodule(name), width, optimizer, generator)


def test_ranks_follow_a_planted_update_whose_rank_rises():
    """A layer W_ref + B @ A learns W_ref + D(t) by regression, where D's rank rises 2 -> 5 -> 9
    (equal singular values, so the explained ratio needs all of them). From rank 0 with exact
    growth, the rank after each phase must be the planted one: no less (it follows), and no more
    than the buffer above it."""
    torch.manual_seed(0)
    features, buffer = 48, 4
    generator, W_ref, U, V = planted_layer(features, 0)
    layer = LowRankLinear(torch.zeros(0, features), torch.zeros(features, 0), W_ref.clone())
    controller = RankController(RankPolicy(criterion="inrank", threshold=0.9, buffer=buffer, warmup=0, every=20), {"0": 0})
    model = nn.Sequential(layer)
    grow_layer(layer, buffer, None, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for planted in (2, 5, 9):
        train_with_decisions(model, controller, W_ref + (U[:, :planted] * 0.5) @ V[:, :planted].T, 300, optimizer,
                             generator)
        history.append(controller.ranks["0"])
        assert planted <= controller.ranks["0"] <= planted + buffer, history
        assert layer.rank == controller.ranks["0"] + buffer
    assert history == sorted(history) and history[0] < history[-1]


def test_a_resumed_truncation_grows_back_to_the_rank_its_update_needs():
    """Resume as from an artifact compressed at a low threshold: the layer starts with the top 3
    components of a rank-10 update (singular values 1.0 .. 0.55: about 40% of its energy) plus
    a buffer of exact-growth columns, and trains on the full update. Its rank must rise to the
    rank the criterion gives the planted update (at most the buffer above), while a layer whose update the artifact holds entirely
    keeps its rank."""
    torch.manual_seed(1)
    features, buffer, kept, planted = 48, 4, 3, 10
    generator, W_ref, U, V = planted_layer(features, 1)
    values = torch.linspace(1.0, 0.55, planted)
    update = (U[:, :planted] * values) @ V[:, :planted].T  # [out, in], rank 10
    root = values[:kept].sqrt()
    truncated = LowRankLinear((root[:, None] * V[:, :kept].T).contiguous(), (U[:, :kept] * root).contiguous(), W_ref.clone())
    complete = LowRankLinear((root[:, None] * V[:, :kept].T).contiguous(), (U[:, :kept] * root).contiguous(), W_ref.clone())
    controller = RankController(RankPolicy(criterion="inrank", threshold=0.9, buffer=buffer, warmup=20, every=20),
                                {"0": kept, "1": kept})
    for layer in (truncated, complete):
        grow_layer(layer, kept + buffer, None, generator)  # as training.resume does: B zero, A tiny
    model = nn.ModuleList([truncated, complete])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    truncated_target = W_ref + update
    complete_target = W_ref + (U[:, :kept] * values[:kept]) @ V[:, :kept].T  # what the artifact already holds
    for step in range(600):
        x = torch.randn(256, features, generator=generator)
        loss = (truncated(x) - x @ truncated_target.T).pow(2).mean() + (complete(x) - x @ complete_target.T).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if controller.policy.due(step + 1):
            for name, width in controller.decide(model).items():
                grow_layer(model[int(name)], width, optimizer, generator)
    # What the criterion asks of the planted update itself (rank 9 of 10 here: the last value is small).
    needed = int(torch.nonzero(explained_ratios(values, features) > 0.9)[0, 0])
    assert kept < needed <= controller.ranks["0"] <= needed + buffer
    assert controller.ranks["1"] == kept
