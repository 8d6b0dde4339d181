"""The optimizer of a run: parameter groups, Frobenius decay on B @ A, the factors' learning rate,
and the state a grown or re-split layer's factors get."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.model.layers import LowRankLinear
from inrank_convert.training.optimizer import (
    adopt_state,
    apply_frobenius_decay,
    build_optimizer,
    frobenius_decay_grads,
    set_learning_rate,
)
from inrank_convert.training.rank_control import grow_layer, resplit_layer


def _layer(rank: int = 3, seed: int = 0) -> LowRankLinear:
    generator = torch.Generator().manual_seed(seed)
    return LowRankLinear(torch.randn(rank, 6, generator=generator), torch.randn(5, rank, generator=generator),
                         torch.randn(5, 6, generator=generator), torch.zeros(5))


def test_frobenius_decay_gradient_is_autograd_of_half_the_squared_product_norm():
    generator = torch.Generator().manual_seed(1)
    B = torch.randn(7, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    A = torch.randn(4, 9, dtype=torch.float64, generator=generator, requires_grad=True)
    strength = 0.1
    (strength / 2 * (B @ A).square().sum()).backward()
    grad_B, grad_A = frobenius_decay_grads(B.detach(), A.detach(), strength)
    assert torch.allclose(grad_B, B.grad, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad_A, A.grad, rtol=1e-12, atol=1e-12)


def test_frobenius_decay_shrinks_the_product_and_leaves_the_reference():
    layer = _layer()
    model = torch.nn.Sequential(layer)
    reference, before = layer.weight_ref.clone(), layer.delta_weight().clone()
    B, A = layer.lora_B.detach().clone(), layer.lora_A.detach().clone()
    apply_frobenius_decay(model, lr=0.01, strength=0.1)
    grad_B, grad_A = frobenius_decay_grads(B, A, 0.1)
    assert torch.allclose(layer.lora_B, B - 0.01 * grad_B) and torch.allclose(layer.lora_A, A - 0.01 * grad_A)
    assert torch.linalg.matrix_norm(layer.delta_weight()) < torch.linalg.matrix_norm(before)
    assert torch.equal(layer.weight_ref, reference)


def test_groups_decay_matrices_and_scale_the_factors_learning_rate():
    model = torch.nn.Sequential(_layer(), torch.nn.Linear(5, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, factor_decay="frobenius", factor_lr_scale=0.25)
    set_learning_rate(optimizer, 2e-3)
    by_param = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    layer = model[0]
    assert by_param[id(layer.lora_A)]["lr"] == pytest.approx(5e-4) and by_param[id(layer.lora_A)]["weight_decay"] == 0
    assert by_param[id(model[1].weight)]["weight_decay"] == 0.1 and by_param[id(model[1].weight)]["lr"] == 2e-3
    assert by_param[id(model[2].weight)]["weight_decay"] == 0.0
    per_factor = build_optimizer(model, lr=1e-3, weight_decay=0.1, factor_decay="factors")
    assert {g["weight_decay"] for g in per_factor.param_groups if g.get("factors")} == {0.1}


def _stepped(layer: LowRankLinear) -> torch.optim.Optimizer:
    optimizer = build_optimizer(torch.nn.Sequential(layer), lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(4, 6, generator=torch.Generator().manual_seed(2))).square().sum().backward()
        optimizer.step()
    return optimizer


def test_padded_growth_keeps_the_old_moments_and_zeroes_the_new_columns():
    layer = _layer()
    optimizer = _stepped(layer)
    old = {key: value.clone() for key, value in optimizer.state[layer.lora_B].items()}
    grow_layer(layer, 5, optimizer, torch.Generator().manual_seed(0), "lora")
    state = optimizer.state[layer.lora_B]
    assert state["exp_avg"].shape == (5, 5)
    assert torch.equal(state["exp_avg"][:, :3], old["exp_avg"]) and not state["exp_avg"][:, :3].eq(0).all()
    assert state["exp_avg"][:, 3:].eq(0).all() and state["exp_avg_sq"][:, 3:].eq(0).all()
    assert float(state["step"]) == 3.0


def test_resplit_growth_starts_the_layers_factors_fresh_and_keeps_the_function():
    layer = _layer()
    optimizer = _stepped(layer)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    before = layer(x).detach()
    resplit_layer(layer, optimizer)
    grow_layer(layer, 5, optimizer, torch.Generator().manual_seed(0), "lora")
    assert layer.rank == 5 and torch.allclose(layer(x), before, atol=1e-5)
    assert layer.lora_A not in optimizer.state and layer.lora_B not in optimizer.state  # fresh: no moments, step 0
    held = {p for group in optimizer.param_groups for p in group["params"]}
    assert layer.lora_A in held and layer.lora_B in held
    # The factors are balanced: B^T B = A A^T (both diag(S)) for the kept components.
    top = 3
    assert torch.allclose(layer.lora_B[:, :top].T @ layer.lora_B[:, :top], layer.lora_A[:top] @ layer.lora_A[:top].T,
                          atol=1e-4)


def test_a_rebuilt_optimizer_keeps_the_state_of_parameters_it_still_holds():
    layer = _layer()
    dense = torch.nn.Linear(6, 6)
    model = torch.nn.Sequential(dense, layer)
    old = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    model(torch.randn(2, 6)).sum().backward()
    old.step()
    layer.lora_A = torch.nn.Parameter(layer.lora_A.detach().clone())  # a replaced factor
    new = build_optimizer(model, lr=1e-2, weight_decay=0.0)
    adopt_state(new, old)
    assert new.state[dense.weight] is old.state[dense.weight]
    assert layer.lora_A not in new.state and layer.lora_B in new.state
