"""The optimizer of a run (docs/design.md §9): AdamW's parameter groups, the learning rate each group
takes, weight decay on factors (per factor, or Frobenius decay on their product), and fresh state
for factors that a re-split or a switch to low rank replaces.

Why a recipe needs more than AdamW's defaults on ``W = W_ref + B @ A``: decaying A and B separately
is a penalty on the product's nuclear norm (it lowers the rank), while decaying the product's
Frobenius norm is what dense weight decay does to W; and moments measured in one basis of the
factors mean nothing after an SVD re-split rotates it.
"""

from __future__ import annotations

import torch
from torch import nn

from inrank_convert.model.layers import LowRankLinear

FACTOR_DECAYS = ("factors", "frobenius")
BETAS = (0.9, 0.95)


def is_factor(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, factor_decay: str = "factors",
                    factor_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters in three groups: dense matrices (decayed), vectors (never
    decayed), and the LowRankLinear factors (decayed by AdamW only with ``factor_decay`` "factors";
    their learning rate is ``lr * factor_lr_scale``, see ``set_learning_rate``)."""
    dense, vectors, factors = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if is_factor(name):
            factors.append(param)
        elif param.ndim >= 2:
            dense.append(param)
        else:
            vectors.append(param)
    factor_wd = weight_decay if factor_decay == "factors" else 0.0
    groups = [{"params": dense, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": vectors, "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": factors, "weight_decay": factor_wd, "lr_scale": factor_lr_scale, "factors": True}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=BETAS)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def frobenius_decay_grads(B: torch.Tensor, A: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``strength / 2 * ||B @ A||_F^2`` with respect to B [out, k] and A [k, in],
    without forming the [out, in] product: d/dB = strength * B (A A^T), d/dA = strength * (B^T B) A."""
    return strength * (B @ (A @ A.T)), strength * ((B.T @ B) @ A)


@torch.no_grad()
def apply_frobenius_decay(model: nn.Module, lr: float, strength: float) -> None:
    """Decoupled Frobenius decay (as AdamW decouples its weight decay): every LowRankLinear's factors
    step against the gradient of strength/2 ||B A||^2, scaled by the learning rate, both from
    the factors before the step. On ``W = W_ref + B A`` this shrinks the update toward zero the
    way dense decay shrinks W; on InRank-Efficient (no reference) it shrinks W itself."""
    if strength == 0.0:
        return
    for module in model.modules():
        if isinstance(module, LowRankLinear) and module.lora_A.requires_grad and module.rank:
            grad_B, grad_A = frobenius_decay_grads(module.lora_B, module.lora_A, strength)
            module.lora_B.sub_(lr * grad_B)
            module.lora_A.sub_(lr * grad_A)


def factor_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The current learning rate of the factor group (the others' lr otherwise)."""
    for group in optimizer.param_groups:
        if group.get("factors"):
            return group["lr"]
    return optimizer.param_groups[0]["lr"]


def adopt_state(new: torch.optim.Optimizer, old: torch.optim.Optimizer) -> None:
    """Carry AdamW state over to a rebuilt optimizer for every parameter both hold; parameters new to
    ``new`` (fresh factors) start with no state, so their first steps are bias-corrected from zero."""
    held = {param for group in new.param_groups for param in group["params"]}
    for param, state in old.state.items():
        if param in held:
            new.state[param] = state
