"""Issue 12, item 1 (in part): which layers InRank factorizes (--factorize), where ranks start
(--initial-rank) and InRank-Efficient's stage 2 (--stage2-at): the function unchanged at the switch,
no rank decision after it; bad input through the CLI."""

from __future__ import annotations

import pytest
import torch
from cli_contract import expect_error, expect_ok

from inrank_convert.model.layers import LowRankLinear
from inrank_convert.training.rank_control import (
    RankPolicy,
    factorize_model,
    layer_role,
    low_rank_layers,
    resplit_layer,
)
from inrank_convert.weights.run_folder import read_metrics
from tests.conftest import SHARED_DATA, build_model, gpt2_config, llama_config
from tests.test_train_bad_input import SMALL, TEXT, TOKENIZER, tiny_config

needs_text = pytest.mark.skipif(not (TOKENIZER / "vocab.json").is_file() or not TEXT.is_file(),
                                reason=f"needs ../shared/data (GPT-2 tokenizer, Tiny Shakespeare) under {SHARED_DATA}")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("factorize", ["all", "mlp", "attention"])
def test_factorize_selects_the_layers_by_role(arch, factorize):
    model = build_model(gpt2_config() if arch == "gpt2" else llama_config(), seed=0)
    ranks = factorize_model(model, RankPolicy(buffer=4), False, torch.Generator().manual_seed(0), factorize)
    roles = {layer_role(name) for name in ranks}
    per_block = {"gpt2": {"mlp": 2, "attention": 2}, "llama": {"mlp": 3, "attention": 4}}[arch]
    expected = {"all": sum(per_block.values()), "mlp": per_block["mlp"], "attention": per_block["attention"]}[factorize]
    assert len(ranks) == 2 * expected + (1 if arch == "llama" and factorize == "all" else 0)  # + LLaMA's untied head
    assert roles <= ({"mlp", "attention", "other"} if factorize == "all" else {factorize})
    assert {name for name, _ in low_rank_layers(model)} == set(ranks)


@pytest.mark.parametrize("efficient", [False, True])
def test_initial_rank_sets_the_starting_rank_and_width(efficient):
    model = build_model(gpt2_config(), seed=0).eval()
    x = torch.randint(0, 320, (1, 16))
    before = model(x).logits.detach()
    ranks = factorize_model(model, RankPolicy(buffer=4), efficient, torch.Generator().manual_seed(0), "mlp",
                            initial_rank=2)
    assert set(ranks.values()) == {2}
    for _, layer in low_rank_layers(model):
        assert layer.rank == 2 + 4  # rank + buffer
    if not efficient:  # B is zero: the model is still the init
        assert torch.allclose(model(x).logits, before, atol=1e-6)


def test_resplit_keeps_the_function_and_drops_only_numerically_zero_components():
    model = build_model(gpt2_config(), seed=0).eval()
    factorize_model(model, RankPolicy(buffer=4), True, torch.Generator().manual_seed(0), "all", initial_rank=3)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking state: random factors
        for _, layer in low_rank_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.05)
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.05)
    x = torch.randint(0, 320, (2, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # with moments to drop
    model(x).logits.sum().backward()
    optimizer.step()
    name, dead = low_rank_layers(model)[0]
    with torch.no_grad():
        dead.lora_B[:, -1] = 0.0  # a buffer column that never trained
        before = model(x).logits.detach()
    widths = {n: layer.rank for n, layer in low_rank_layers(model)}
    kept = {n: resplit_layer(layer, optimizer) for n, layer in low_rank_layers(model)}
    assert torch.allclose(model(x).logits, before, atol=1e-5)
    assert kept[name] == widths[name] - 1 and all(kept[n] == widths[n] for n in kept if n != name)
    for _, layer in low_rank_layers(model):
        assert isinstance(layer, LowRankLinear) and layer.lora_B.shape[1] == layer.lora_A.shape[0] == layer.rank
        # Balanced: each component's B column and A row have the same norm.
        assert torch.allclose(layer.lora_B.norm(dim=0), layer.lora_A.norm(dim=1), rtol=1e-4)
        assert layer.lora_B not in optimizer.state  # moments of the old basis dropped
        assert any(layer.lora_B is p for group in optimizer.param_groups for p in group["params"])
    model(x).logits.sum().backward()
    optimizer.step()  # the optimizer trains the new factors


@needs_text
def test_stage_two_freezes_the_ranks(tmp_path):
    config = tiny_config(tmp_path / "config", n_layer=2)
    data = tmp_path / "text.txt"
    data.write_text(TEXT.read_text()[:20_000])
    run = tmp_path / "run"
    expect_ok(["train", config, "-o", run, "--data", data, "--steps", "16", *SMALL, "--mode", "inrank", "--efficient",
               "--factorize", "mlp", "--initial-rank", "2", "--buffer", "2", "--rank-warmup", "2", "--rank-every", "2",
               "--stage2-at", "8", "--log-every", "1", "--quiet"])
    records = read_metrics(run)
    ranks = {record["step"]: record["ranks"] for record in records}
    assert set(ranks[1]) == {"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                             "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"}
    assert set(ranks[1].values()) == {2}
    assert all(ranks[step] == ranks[8] for step in range(8, 17)), "a rank changed after stage 2"
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in records)


@needs_text
def test_inrank_option_bad_input(tmp_path):
    config = tiny_config(tmp_path / "config")
    data = tmp_path / "text.txt"
    data.write_text(TEXT.read_text()[:3000])
    out = tmp_path / "out"
    base = ["train", config, "-o", out, "--data", data, "--steps", "4", *SMALL]
    cases = [
        (["--mode", "inrank", "--factorize", "embeddings"], ("--factorize", "mlp")),
        (["--mode", "inrank", "--initial-rank", "-1"], ("--initial-rank", "negative")),
        (["--mode", "inrank", "--initial-rank", "33"], ("--initial-rank", "above the full rank 32")),
        (["--mode", "inrank", "--stage2-at", "5"], ("--stage2-at", "1 to --steps 4")),
        (["--mode", "dense", "--stage2-at", "2"], ("--stage2-at", "InRank option")),
        (["--factorize", "all"], ("--factorize", "InRank option")),
        (["--mode", "inrank", "--growth", "kaiming"], ("--growth", "random")),
        (["--growth", "random"], ("--growth", "InRank option")),
    ]
    for extra, says in cases:
        expect_error([*base, *extra], says, output=out, inputs=(config, data))


def test_random_growth_switches_on_kaiming_columns_that_the_next_decision_sees():
    from inrank_convert.training.rank_control import RankController, factor_singular_values, grow_layer

    model = build_model(gpt2_config(), seed=0).eval()
    policy = RankPolicy(buffer=4, growth="random")
    ranks = factorize_model(model, policy, True, torch.Generator().manual_seed(0), "mlp", initial_rank=2)
    name, layer = low_rank_layers(model)[0]
    assert layer.rank == 6 and layer.weight_ref is None  # W = B @ A, random factors at rank + buffer
    limit_B, limit_A = policy.layer_max_rank(layer) ** -0.5, layer.in_features ** -0.5
    B, A = layer.lora_B.detach(), layer.lora_A.detach()
    assert float(B.abs().max()) <= limit_B and float(A.abs().max()) <= limit_A
    assert float(B.abs().max()) > 0.5 * limit_B  # not a zero (function-preserving) start
    x = torch.randint(0, 320, (1, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(x).logits.sum().backward()
    optimizer.step()
    before = model(x).logits.detach()
    grow_layer(layer, 10, optimizer, torch.Generator().manual_seed(1), "random", policy.layer_max_rank(layer))
    assert layer.rank == 10 and not torch.allclose(model(x).logits, before, atol=1e-4)
    assert optimizer.state[layer.lora_B]["exp_avg"].shape == layer.lora_B.shape  # moments padded
    # The new columns are live components: the spectrum of B @ A has 10 non-negligible values.
    controller = RankController(policy, dict(ranks))
    values = factor_singular_values(layer.lora_B, layer.lora_A)
    assert int((values > 1e-3 * values[0]).sum()) == 10
    assert controller.total_rank == 2 * len(ranks)


def test_the_defaults_are_the_reference_s():
    from inrank_convert.training.options import TrainOptions

    assert TrainOptions(efficient=True).policy().growth == "random"  # InRank-Efficient: live kaiming columns
    assert TrainOptions().policy().growth == "exact"  # W_init + B @ A: the function unchanged as it grows
    assert TrainOptions(efficient=True, growth="exact").policy().growth == "exact"
    model = build_model(gpt2_config(), seed=0)
    ranks = factorize_model(model, RankPolicy(buffer=4, growth="random"), True, torch.Generator().manual_seed(0))
    assert ranks and set(ranks.values()) == {2} and all(".mlp." in name for name in ranks)
