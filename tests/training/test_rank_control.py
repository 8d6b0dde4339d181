"""InRank rank control: spectrum from thin QRs, function-preserving growth, monotone decisions."""

from __future__ import annotations

import torch
from torch import nn

from inrank_convert.model.layers import LowRankLinear
from inrank_convert.training.rank_control import (
    RankController,
    RankPolicy,
    factor_singular_values,
    grow_layer,
)


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


def test_a_layer_that_starts_above_max_rank_keeps_its_rank():
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(LowRankLinear(torch.randn(10, 64, generator=generator), torch.randn(64, 10, generator=generator)))
    # A starting rank above the cap, e.g. an artifact compressed at a high threshold.
    controller = RankController(RankPolicy(criterion="energy", threshold=0.99, buffer=2, warmup=0, every=1, max_rank=4),
                                {"0": 10})
    assert controller.decide(model) == {"0": 12}  # keeps its buffer, never shrinks to the cap
    assert controller.ranks["0"] == 10
