"""training/rank_control.py: InRank's rank control: the spectrum from thin QRs, function-preserving
growth, monotone decisions, ranks that follow a planted update whose rank rises, which layers are
factorized (--factorize), where ranks start (--initial-rank), the re-split of stage 2 and random growth."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inrank_convert.linalg.criteria import explained_ratios
from inrank_convert.model.layers import LowRankLinear
from inrank_convert.training.rank_control import (
    RankController,
    RankPolicy,
    factor_singular_values,
    factorize_model,
    factorized_layers,
    grow_layer,
    layer_role,
    low_rank_layers,
    orthogonalize_init,
    resplit_layer,
)
from tests.conftest import build_model, gpt2_config, llama_config


def test_qr_singular_values_equal_svdvals_of_the_product():
    generator = torch.Generator().manual_seed(0)
    B, A = torch.randn(300, 24, generator=generator), torch.randn(24, 180, generator=generator)
    assert torch.allclose(factor_singular_values(B, A), torch.linalg.svdvals(B @ A)[:24], rtol=1e-4, atol=1e-4)


def test_growth_leaves_the_function_and_grows_adam_state():
    generator = torch.Generator().manual_seed(1)
    layer = LowRankLinear(torch.randn(6, 40, generator=generator), torch.randn(50, 6, generator=generator),
                          torch.randn(50, 40, generator=generator), torch.randn(50, generator=generator))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x = torch.randn(3, 40, generator=generator)
    layer(x).sum().backward()
    optimizer.step()
    before = layer(x).detach()
    moments = optimizer.state[layer.lora_B]["exp_avg"].clone()
    grow_layer(layer, 10, optimizer)
    assert layer.lora_A.shape == (10, 40) and layer.lora_B.shape == (50, 10)
    assert torch.allclose(layer(x).detach(), before, rtol=0, atol=1e-5)  # new B columns are exactly zero
    grown = optimizer.state[layer.lora_B]["exp_avg"]
    assert torch.equal(grown[:, :6], moments) and not grown[:, 6:].any()
    assert any(p is layer.lora_A for group in optimizer.param_groups for p in group["params"])
    layer(x).sum().backward()
    optimizer.step()  # the grown parameters train


def test_controller_ranks_grow_never_shrink_and_respect_max_rank():
    generator = torch.Generator().manual_seed(2)
    model = nn.Sequential(LowRankLinear(torch.randn(8, 64, generator=generator), torch.randn(64, 8, generator=generator)))
    controller = RankController(RankPolicy(criterion="energy", threshold=0.99, buffer=4, warmup=0, every=1, max_rank=6),
                                {"0": 2})
    growth = controller.decide(model)
    assert controller.ranks["0"] == 6  # a full-rank-8 spectrum needs more than 6: capped
    assert growth == {"0": 10}
    with torch.no_grad():
        model[0].lora_B.mul_(torch.tensor([1.0] + [1e-6] * 7))  # spectrum collapses to rank 1
    controller.decide(model)
    assert controller.ranks["0"] == 6  # never shrinks
    restored = RankController.from_state_dict(controller.state_dict())
    assert restored.ranks == controller.ranks and restored.policy == controller.policy
    assert controller.policy.due(0) and RankPolicy(warmup=200, every=25).due(225)
    assert not RankPolicy(warmup=200, every=25).due(210)


def test_max_rank_is_half_the_full_rank_by_default_and_as_given_up_to_the_full_rank():
    layer = LowRankLinear(torch.zeros(2, 64), torch.zeros(16, 2))  # [16, 64]: full rank 16
    assert RankPolicy().layer_max_rank(layer) == 8
    assert RankPolicy(max_rank=12).layer_max_rank(layer) == 12  # above half: as given
    assert RankPolicy(max_rank=100).layer_max_rank(layer) == 16
    assert RankPolicy(max_rank=3).layer_max_rank(layer) == 3


def test_a_layer_that_starts_above_max_rank_keeps_its_rank():
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(LowRankLinear(torch.randn(10, 64, generator=generator), torch.randn(64, 10, generator=generator)))
    # A starting rank above the cap, e.g. an artifact compressed at a high threshold.
    controller = RankController(RankPolicy(criterion="energy", threshold=0.99, buffer=2, warmup=0, every=1, max_rank=4),
                                {"0": 10})
    assert controller.decide(model) == {"0": 12}  # keeps its buffer, never shrinks to the cap
    assert controller.ranks["0"] == 10


# --------------------------------------------------------------------------- ranks that follow a planted update


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


# --------------------------------------------------------------------------- which layers, where ranks start, stage 2


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


def test_random_growth_switches_on_kaiming_columns_that_the_next_decision_sees():
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


def test_spectral_init_at_full_rank_is_the_dense_init():
    model = build_model(gpt2_config(), seed=0)
    init = {name: module.weight.detach().clone() for name, module in factorized_layers(model, "mlp")}
    assert init
    policy = RankPolicy(buffer=4, growth="exact")  # with --efficient: B @ A the init's best rank-k part
    smallest = min(min(w.shape) for w in init.values())
    factorize_model(model, policy, True, torch.Generator().manual_seed(0), "mlp", initial_rank=smallest)
    layers = dict(low_rank_layers(model))
    for name, weight in init.items():
        layer = layers[name]
        product = layer.delta_weight()
        dense = weight.T if layer.stored_transposed else weight
        if layer.rank == min(dense.shape):  # the layers whose full rank the initial rank reaches
            assert (product - dense).abs().max() < 1e-6, name
    assert any(layer.rank == min(layer.in_features, layer.out_features) for layer in layers.values())


def test_lora_growth_keeps_the_function_and_starts_a_at_kaiming_scale():
    generator = torch.Generator().manual_seed(0)
    layer = LowRankLinear(torch.randn(2, 64, generator=generator), torch.randn(48, 2, generator=generator),
                          torch.randn(48, 64, generator=generator))
    x = torch.randn(3, 64, generator=generator)
    before = layer(x).detach()
    grow_layer(layer, 40, None, torch.Generator().manual_seed(1), "lora")
    new_rows, new_columns = layer.lora_A[2:].detach(), layer.lora_B[:, 2:].detach()
    assert torch.allclose(layer(x), before, atol=1e-5) and new_columns.eq(0).all()
    bound = 64 ** -0.5
    assert new_rows.abs().max() <= bound and new_rows.abs().max() > 0.9 * bound  # U(-1/sqrt(in), 1/sqrt(in))
    assert float(new_rows.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.05)


def test_orthogonal_init_keeps_each_layers_norm():
    model = build_model(gpt2_config(), seed=0)
    norms = {name: float(torch.linalg.matrix_norm(module.weight.detach())) for name, module in factorized_layers(model, "mlp")}
    changed = orthogonalize_init(model, "mlp", torch.Generator().manual_seed(0))
    assert sorted(changed) == sorted(norms)
    for name, module in factorized_layers(model, "mlp"):
        weight = module.weight.detach().double()
        rows, cols = weight.shape
        gram = weight.T @ weight if rows >= cols else weight @ weight.T  # [min, min]
        scale = norms[name] ** 2 / min(rows, cols)
        assert torch.allclose(gram, scale * torch.eye(min(rows, cols), dtype=torch.float64), atol=1e-5 * scale), name
        assert float(torch.linalg.matrix_norm(weight)) == pytest.approx(norms[name], rel=1e-5)


# --------------------------------------------------------------------------- the update signal


def test_the_update_signal_grows_a_rank_where_the_product_rule_does_not():
    """Two strong kept components and a buffer; the buffer then learns a new direction that the
    product's energy hardly notices (1 against 181). The product rule keeps rank 2; the update
    signal grows it by the one component the update needs, and its first decision only records."""
    generator = torch.Generator().manual_seed(6)
    U, _ = torch.linalg.qr(torch.randn(64, 6, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(40, 6, generator=generator))
    B = U * torch.tensor([10.0, 9.0, 0, 0, 0, 0])  # [64, 6]: rank 2 + a buffer of 4
    ranks = {}
    for signal in ("product", "update"):
        model = nn.Sequential(LowRankLinear(V.T.clone(), B.clone()))
        controller = RankController(RankPolicy(criterion="energy", threshold=0.9, buffer=4, signal=signal), {"0": 2})
        assert controller.decide(model) == {} and controller.ranks["0"] == 2  # nothing learned yet
        with torch.no_grad():
            model[0].lora_B[:, 2] = U[:, 2]  # the buffer learns a new direction
        growth = controller.decide(model)
        ranks[signal] = (controller.ranks["0"], growth)
        restored = RankController.from_state_dict(controller.state_dict())
        restored.load_tensors(controller.state_tensors())
        assert restored.policy == controller.policy and sorted(restored.previous) == sorted(controller.previous)
        assert all(torch.equal(a, b) for name in controller.previous
                   for a, b in zip(restored.previous[name], controller.previous[name], strict=True))
    assert ranks["product"] == (2, {})
    assert ranks["update"] == (3, {"0": 7})


def test_damaged_last_factors_are_refused_by_name():
    from inrank_convert.core.errors import CheckpointError

    model = nn.Sequential(LowRankLinear(torch.randn(4, 40), torch.randn(64, 4)))
    controller = RankController(RankPolicy(criterion="energy", buffer=2, signal="update"), {"0": 2})
    controller.load_tensors({"rank_control.previous.0.lora_B": torch.randn(63, 4),
                             "rank_control.previous.0.lora_A": torch.randn(4, 40)})
    with pytest.raises(CheckpointError, match="last factors of 0"):
        controller.decide(model)


def test_a_random_growth_is_not_read_as_an_update():
    """--growth random switches on live columns: the product jumps at the growth. Remembered after
    the growth, that jump is not the next decision's update (else the layer would grow again)."""
    generator = torch.Generator().manual_seed(7)
    results = []
    for remember in (True, False):
        layer = LowRankLinear(torch.randn(4, 40, generator=generator), torch.randn(64, 4, generator=generator))
        model = nn.Sequential(layer)
        controller = RankController(RankPolicy(criterion="energy", threshold=0.9, buffer=2, signal="update",
                                               growth="random"), {"0": 2})
        controller.decide(model)  # records
        grow_layer(layer, 8, None, torch.Generator().manual_seed(8), "random", 32)
        if remember:
            controller.remember("0", layer)
        results.append(controller.decide(model))  # nothing trained since
    assert results[0] == {}
    assert results[1]  # the random columns read as an update


def test_a_training_state_with_half_a_pair_is_refused():
    from inrank_convert.core.errors import CheckpointError

    controller = RankController(RankPolicy(signal="update"), {"0": 2})
    with pytest.raises(CheckpointError, match="beside its pair"):
        controller.load_tensors({"rank_control.previous.0.lora_B": torch.randn(8, 4)})
