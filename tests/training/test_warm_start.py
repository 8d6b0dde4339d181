"""Dense first, then low rank (--dense-warmup): the switch is compress-and-resume in one run, its
checkpoints are dense before it and artifacts after, and a run interrupted on either side of it
resumes exactly; the recipes' resumed and continued runs are deterministic for a seed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from inrank_convert.artifact import is_artifact
from inrank_convert.compression.job import compress
from inrank_convert.linalg.criteria import RankRule, choose_rank
from inrank_convert.model.layers import FACTOR_SPLITS, LowRankLinear
from inrank_convert.runtime.modeling import load_compressed
from inrank_convert.training.entrypoints import resume, train
from inrank_convert.training.rank_control import RankPolicy, low_rank_layers
from inrank_convert.training.warm_start import factorize_trained
from inrank_convert.weights.run_folder import read_metrics
from tests.helpers.training import (
    HAS_DATA,
    TEXT,
    losses,
    options,
    planted_rank_3_updates,
    resume_without_last_checkpoints,
)

needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data (GPT-2 tokenizer and Tiny Shakespeare)")


@pytest.mark.parametrize("split", FACTOR_SPLITS)
@pytest.mark.parametrize("efficient", [False, True])
def test_the_switch_keeps_the_rules_rank_of_each_update(efficient, split):
    model, trained, init_weights = planted_rank_3_updates(efficient, seed=3)
    rule = RankRule("energy", 0.99)
    policy = RankPolicy(buffer=2, growth="lora")
    ranks = factorize_trained(model, init_weights, policy, rule, "mlp", torch.Generator().manual_seed(0), split)
    factored = dict(low_rank_layers(model))
    assert sorted(ranks) == sorted(trained)
    for name, weight in trained.items():
        layer: LowRankLinear = factored[name]
        dense = weight.T if layer.stored_transposed else weight  # [out, in]
        update = dense if efficient else dense - (layer.weight_ref if layer.weight_ref is not None else 0)
        S = torch.linalg.svdvals(update.double())
        expected = min(choose_rank(S, float(S.square().sum()), rule), policy.layer_max_rank(layer))
        assert ranks[name] == expected and (efficient or expected == 3)
        assert layer.rank == min(min(dense.shape), expected + policy.layer_buffer(layer))
        assert (layer.weight_ref is None) == efficient
        kept = float(S[:expected].square().sum() / S.square().sum())
        error = torch.linalg.matrix_norm((layer.weight.detach() - dense).double()) ** 2 / S.square().sum()
        assert float(error) == pytest.approx(1 - kept, abs=1e-5)  # only the dropped components are lost
        A, B = layer.lora_A.detach()[:expected].double(), layer.lora_B.detach()[:, :expected].double()  # the kept part
        if split == "dense-rate":  # A's rows at sqrt(in / k): the layer's rows move at the dense rate
            assert torch.allclose(A.norm(dim=1), torch.full((expected,), (A.shape[1] / expected) ** 0.5, dtype=A.dtype), rtol=1e-5)
        else:  # sqrt(s) on each side
            assert torch.allclose(A.norm(dim=1), B.norm(dim=0), rtol=1e-4)
            assert torch.allclose(A.norm(dim=1).square(), S[:expected], rtol=1e-4)


@pytest.mark.parametrize("efficient", [False, True])
def test_the_switch_at_threshold_1_keeps_each_updates_numerical_rank(efficient):
    """--threshold 1 at the switch is the lossless rule: the update's numerical rank (3, planted),
    the product the update itself to float32 rounding (the weight, capped, with --efficient)."""
    model, trained, init_weights = planted_rank_3_updates(efficient, seed=5)
    policy = RankPolicy(buffer=2, growth="exact")
    ranks = factorize_trained(model, init_weights, policy, RankRule("energy", 1.0), "mlp",
                              torch.Generator().manual_seed(0), "balanced")
    factored = dict(low_rank_layers(model))
    for name, weight in trained.items():
        layer = factored[name]
        cap = policy.layer_max_rank(layer)
        assert ranks[name] == (cap if efficient else 3)  # a random init is numerically full rank: capped
        if not efficient:
            dense = weight.T if layer.stored_transposed else weight
            assert torch.allclose(layer.weight.detach(), dense, atol=1e-6)  # exact growth: the buffer adds nothing


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory, dropout_config):
    """12 steps: dense to step 6, then W_init + B @ A (lora buffer columns); checkpoints every 3."""
    run = tmp_path_factory.mktemp("warm") / "run"
    opts = options(steps=12, save_every=3, dense_warmup=6, growth="lora", factorize="mlp", rank_warmup=3,
                   rank_every=3, threshold=0.5)
    train(dropout_config, run, opts)
    return run


@needs_data
def test_dense_warmup_checkpoints_are_dense_before_the_switch_and_artifacts_after(warm_run):
    for step, dense in ((3, True), (6, False), (9, False), (12, False)):
        folder = warm_run / f"step-{step}"
        assert is_artifact(folder) != dense, folder
        state = json.loads((folder / "train_state" / "trainer_state.json").read_text())
        assert state["mode"] == ("dense" if dense else "inrank")
    records = read_metrics(warm_run)
    assert all("ranks" not in r for r in records if r["step"] < 6)
    assert all(r["ranks"] and r["total_rank"] > 0 for r in records if r["step"] >= 6)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


@needs_data
@pytest.mark.parametrize("cut", [3, 6, 9])
def test_a_dense_warmup_run_resumes_exactly_on_either_side_of_the_switch(warm_run, tmp_path, cut):
    copy = tmp_path / "copy"
    shutil.copytree(warm_run, copy)
    for step in (6, 9, 12):
        if step > cut:
            shutil.rmtree(copy / f"step-{step}")
    result = resume(copy, None, {})
    assert result.start_step == cut and result.step == 12
    assert losses(copy) == losses(warm_run)  # bit for bit: float32 on the CPU, dropout on
    assert [r.get("ranks") for r in read_metrics(copy)] == [r.get("ranks") for r in read_metrics(warm_run)]


@needs_data
def test_a_resume_splits_the_artifacts_factors_as_named_and_starts_at_the_same_model(tmp_path, real_run):
    artifact = tmp_path / "artifact"
    compress(real_run.run, artifact)
    stored = {name: layer.lora_A.detach().clone()
              for name, layer in low_rank_layers(load_compressed(artifact, zero_as_lowrank=True))}
    assert stored and all(A.shape[0] > 0 for A in stored.values())
    settings = dict(data=str(TEXT), steps=1, batch_size=4, block_size=16, seed=5, buffer=3)
    for split in FACTOR_SPLITS:
        resume(artifact, tmp_path / split, {**settings, "factor_split": split})
    started = {split: dict(low_rank_layers(load_compressed(tmp_path / split / "step-0", zero_as_lowrank=True,
                                                           rows_as_factors="all"))) for split in FACTOR_SPLITS}
    for name, A in stored.items():
        rank, width = A.shape
        balanced, dense_rate = started["balanced"][name], started["dense-rate"][name]
        assert torch.allclose(balanced.lora_A.detach()[:rank], A, atol=1e-6)  # as the artifact stores them
        norms = dense_rate.lora_A.detach()[:rank].norm(dim=1)
        assert torch.allclose(norms, torch.full((rank,), (width / rank) ** 0.5), rtol=1e-4), name
        assert torch.allclose(dense_rate.weight, balanced.weight, atol=1e-5)  # the same model at step 0
    first = {split: read_metrics(tmp_path / split)[0]["loss"] for split in FACTOR_SPLITS}
    assert first["balanced"] == pytest.approx(first["dense-rate"], rel=1e-5)


@needs_data
def test_resumed_and_continued_runs_are_deterministic_for_a_seed(tmp_path, config_path):
    train(config_path, tmp_path / "dense", options(mode="dense", steps=6, lr=1e-2))
    compress(tmp_path / "dense", tmp_path / "artifact")
    again = dict(data=str(TEXT), steps=5, batch_size=4, block_size=16, seed=5, buffer=3, growth="lora", log_every=1,
                 on_growth="resplit", rank_warmup=2, rank_every=1, threshold=0.5)
    for name in ("a", "b"):
        resume(tmp_path / "artifact", tmp_path / f"resumed-{name}", again)
        train(tmp_path / "dense" / "step-6", tmp_path / f"continued-{name}",
              options(mode="dense", steps=5, seed=5))
    assert losses(tmp_path / "resumed-a") == losses(tmp_path / "resumed-b")
    assert losses(tmp_path / "continued-a") == losses(tmp_path / "continued-b")
    assert len(losses(tmp_path / "resumed-a")) == 5


@needs_data
def test_compare_runs_counts_the_warmup_at_full_rank_and_reports_trained_parameters(warm_run):
    from inrank_convert.measure.compare_runs import compare_runs

    summary = compare_runs(warm_run, warm_run).runs[1]
    records = read_metrics(warm_run)
    full = summary.full_rank
    assert full and summary.rank_curve[0] == (1, full)
    fractions = [(r.get("total_rank") or full) / full for r in records]
    assert summary.mean_rank_fraction == pytest.approx(sum(fractions) / len(fractions))
    assert summary.mean_rank_fraction > summary.final_rank_fraction  # the dense steps raise the mean
    state = json.loads((warm_run / "step-12" / "train_state" / "trainer_state.json").read_text())
    dense_state = json.loads((warm_run / "step-3" / "train_state" / "trainer_state.json").read_text())
    assert summary.trainable_parameters == state["trainable_parameters"]
    assert 0 < state["trainable_parameters"] and dense_state["trainable_parameters"] > 0


@needs_data
def test_the_default_recipe_warms_up_a_fifth_of_the_run_and_records_what_it_chose(tmp_path, config_path):
    from inrank_convert.training.options import TrainOptions

    opts = TrainOptions(**{**options(steps=20, save_every=20, log_every=1).to_json(), "recipe": "warm-start"})
    assert opts.resolved(from_scratch=True).dense_warmup == 4
    assert opts.resolved(from_scratch=False).dense_warmup is None  # a resume starts low rank already
    train(config_path, tmp_path / "run", opts)
    state = json.loads((tmp_path / "run" / "step-20" / "train_state" / "trainer_state.json").read_text())
    recorded = state["options"]
    assert (recorded["dense_warmup"], recorded["criterion"], recorded["threshold"], recorded["growth"]) == \
        (4, "energy", 0.9, "lora")
    records = read_metrics(tmp_path / "run")
    steps = {record["step"]: record for record in records}
    assert steps[3].get("dense_warmup") and "ranks" not in steps[3] and "ranks" in steps[5]
    explicit = TrainOptions(**{**opts.to_json(), "dense_warmup": 0, "criterion": "inrank"})
    assert explicit.resolved(from_scratch=True).dense_warmup is None  # 0: no warm-up, as named
    assert explicit.resolved(from_scratch=True).criterion == "inrank"  # a named rule is kept


@needs_data
def test_a_run_whose_ranks_grow_on_the_update_signal_resumes_exactly(tmp_path):
    """--rank-signal update keeps each layer's factors of its last decision in the checkpoint: a run
    cut between two decisions decides alike after the resume (without them its first decision would
    only record, and the ranks would differ). The signal acts: the product rule keeps its ranks here."""
    from tests.helpers.training import tiny_config

    config = tiny_config(tmp_path / "config", n_embd=64)
    settings = dict(steps=12, save_every=3, factorize="mlp", rank_warmup=2, rank_every=2, growth="lora",
                    criterion="energy", threshold=0.9)
    train(config, tmp_path / "product", options(**settings))
    train(config, tmp_path / "update", options(**settings, rank_signal="update"))
    ranks = {name: [r.get("total_rank") for r in read_metrics(tmp_path / name)] for name in ("product", "update")}
    assert ranks["product"][-1] == ranks["product"][1] < ranks["update"][-1], ranks
    copy = tmp_path / "copy"
    result = resume_without_last_checkpoints(tmp_path / "update", copy, (9, 12))
    assert result.start_step == 6 and result.step == 12
    assert losses(copy) == losses(tmp_path / "update")
    assert [r.get("ranks") for r in read_metrics(copy)] == [r.get("ranks") for r in read_metrics(tmp_path / "update")]
