"""--rank-cut R --rank-cut-at STEP: from STEP on every factorized layer keeps the best R + buffer
components of its B @ A with fresh moments, no rank grows past R, and a run resumed after the cut
holds it; option combinations the cut cannot take are refused in one line."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.core.errors import UsageError
from inrank_convert.linalg.criteria import RankRule
from inrank_convert.training.entrypoints import train
from inrank_convert.training.options import check_options
from inrank_convert.training.rank_control import RankPolicy, low_rank_layers, resplit_layer
from inrank_convert.training.warm_start import factorize_trained
from inrank_convert.weights.run_folder import read_metrics
from tests.helpers.training import (
    HAS_DATA,
    losses,
    options,
    planted_rank_3_updates,
    resume_without_last_checkpoints,
    tiny_config,
)

needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data (GPT-2 tokenizer and Tiny Shakespeare)")


def test_a_cut_keeps_the_best_approximation_of_the_product_and_drops_the_moments():
    model, _, init_weights = planted_rank_3_updates(efficient=False, seed=5)
    policy = RankPolicy(buffer=2, growth="lora", max_rank=8)
    factorize_trained(model, init_weights, policy, RankRule("energy", 1.0), "mlp", torch.Generator().manual_seed(0),
                      "balanced")
    layers = low_rank_layers(model)
    assert layers
    for _, layer in layers:
        with torch.no_grad():  # the lora buffer columns start with B zero: give them a product of their own
            layer.lora_B.add_(0.01 * torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(1)))
        optimizer = torch.optim.AdamW([layer.lora_B, layer.lora_A], lr=1e-3)
        (layer.lora_B @ layer.lora_A).square().sum().backward()
        optimizer.step()
        product = (layer.lora_B @ layer.lora_A).detach().double()  # [out, in]
        U, S, Vh = torch.linalg.svd(product, full_matrices=False)
        assert layer.rank > 2 and float(S[2]) > 1e-6 * float(S[0])  # the cut drops something real
        assert resplit_layer(layer, optimizer, width=2) == 2
        best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
        assert layer.lora_B.shape[1] == layer.lora_A.shape[0] == 2
        torch.testing.assert_close((layer.lora_B @ layer.lora_A).double(), best, rtol=0, atol=1e-5 * float(S[0]))
        params = optimizer.param_groups[0]["params"]
        assert params[0] is layer.lora_B and params[1] is layer.lora_A
        assert layer.lora_B not in optimizer.state and layer.lora_A not in optimizer.state


@needs_data
def test_a_run_cut_holds_its_ranks_from_the_cut_and_resumes_exactly(tmp_path):
    config = tiny_config(tmp_path / "config", n_embd=64)
    settings = dict(steps=12, save_every=3, factorize="mlp", rank_warmup=2, rank_every=2, growth="lora", buffer=2,
                    criterion="energy", threshold=1.0, max_rank=8, initial_rank=6)
    train(config, tmp_path / "held", options(**settings))
    train(config, tmp_path / "cut", options(**settings, rank_cut=2, rank_cut_at=5))
    held, cut = read_metrics(tmp_path / "held"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in held] == [r["step"] for r in cut] == list(range(1, 13))
    for before, after in zip(held, cut, strict=True):
        assert (before["ranks"] == after["ranks"]) == (after["step"] < 5), after["step"]
        if after["step"] >= 5:
            assert set(after["ranks"].values()) == {2}
    assert any(rank > 2 for rank in held[-1]["ranks"].values())
    copy = tmp_path / "copy"
    result = resume_without_last_checkpoints(tmp_path / "cut", copy, (9, 12))
    assert result.start_step == 6 and result.step == 12
    assert losses(copy) == losses(tmp_path / "cut")
    assert [r.get("ranks") for r in read_metrics(copy)] == [r.get("ranks") for r in cut]


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(rank_cut=4), "rank.cut needs rank.cut.at"),
    (dict(rank_cut_at=6), "rank.cut.at needs rank.cut"),
    (dict(rank_cut=4, rank_cut_at=6, dense_warmup=6), "after the switch"),
    (dict(rank_cut=4, rank_cut_at=13), "after the switch"),
    (dict(rank_cut=9, rank_cut_at=6, max_rank=8), "from 1 to"),
    (dict(rank_cut=0, rank_cut_at=6), "from 1 to"),
    (dict(mode="dense", rank_cut=4, rank_cut_at=6), "InRank option"),
])
def test_cuts_the_run_cannot_make_are_refused(overrides, message):
    with pytest.raises(UsageError, match=message):
        check_options(options(**overrides))


@needs_data
def test_a_cut_before_the_recipes_warmup_ends_is_refused_before_training(tmp_path):
    config = tiny_config(tmp_path / "config")
    run = tmp_path / "run"
    with pytest.raises(UsageError, match="after the switch"):  # the warm-start recipe warms up 12 // 5 = 2 steps
        train(config, run, options(recipe="warm-start", rank_cut=2, rank_cut_at=2))
    assert not run.exists()
