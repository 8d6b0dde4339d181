"""InRank's incremental rank control (DESIGN §5): measure each factorized layer's spectrum
cheaply, decide its rank, and grow its factors (and their optimizer state) to keep a buffer.

A layer here is a ``LowRankLinear`` whose factors have width k = r + buffer:
``W = W_ref + B[:, :k] @ A[:k, :]``. Growing appends zero columns to B and small random rows
to A, so the function is unchanged at the step it grows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .architecture import conv1d_class, replace_module
from .layers import LowRankLinear
from .spectrum import RankRule, choose_rank
from .tensors import storage_key

GROWTH_INIT_SCALE = 1e-3  # std of the new rows of A, relative to 1/sqrt(in_features)


def factor_singular_values(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Singular values of B @ A ([out, k] @ [k, in]) without forming the product.

    B = Q_B R_B and A.T = Q_A R_A (thin QRs), so B @ A = Q_B (R_B @ R_A.T) Q_A.T and its
    singular values are those of the small k x k matrix R_B @ R_A.T. Cost O((out + in) k^2)
    instead of O(out * in * k) plus an SVD of an out x in matrix.
    """
    _, R_B = torch.linalg.qr(B.detach().double())  # [k, k]
    _, R_A = torch.linalg.qr(A.detach().double().T)  # [k, k]
    return torch.linalg.svdvals(R_B @ R_A.T).float()


@dataclass
class RankPolicy:
    """When and how ranks change. Defaults follow the InRank reference implementation."""

    criterion: str = "inrank"
    threshold: float = 0.9
    buffer: int = 100
    warmup: int = 200  # optimizer steps before the first decision
    every: int = 25  # optimizer steps between decisions
    max_rank: int | None = None  # default: min(rows, cols) // 2 per layer

    def due(self, step: int) -> bool:
        return step >= self.warmup and (step - self.warmup) % self.every == 0

    def layer_max_rank(self, layer: LowRankLinear) -> int:
        limit = min(layer.in_features, layer.out_features) // 2
        return max(1, min(limit, self.max_rank) if self.max_rank is not None else limit)

    def layer_buffer(self, layer: LowRankLinear) -> int:
        """The buffer, clipped for small layers (never more than a quarter of the full rank)."""
        return max(1, min(self.buffer, min(layer.in_features, layer.out_features) // 4))


@dataclass
class RankController:
    """Holds each layer's current rank r; the factor width is r + buffer (capped)."""

    policy: RankPolicy
    ranks: dict[str, int] = field(default_factory=dict)

    def width_for(self, layer: LowRankLinear, rank: int) -> int:
        full = min(layer.in_features, layer.out_features)
        return min(full, rank + self.policy.layer_buffer(layer))

    def decide(self, model: nn.Module) -> dict[str, int]:
        """New rank per layer from its current spectrum: never below the current rank, and never
        grown past max_rank. Returns the layers whose width must grow: name -> new width."""
        rule = RankRule(self.policy.criterion, self.policy.threshold)
        growth: dict[str, int] = {}
        for name, layer in low_rank_layers(model):
            values = factor_singular_values(layer.lora_B, layer.lora_A)
            total = float((values.double() ** 2).sum())
            chosen = choose_rank(values, total, rule) if total > 0 else 0
            # Never below the current rank (an artifact may start above the cap); the cap only limits growth.
            rank = max(self.ranks.get(name, 0), min(chosen, self.policy.layer_max_rank(layer)))
            self.ranks[name] = rank
            width = self.width_for(layer, rank)
            if width > layer.rank:
                growth[name] = width
        return growth

    @property
    def total_rank(self) -> int:
        return sum(self.ranks.values())

    def state_dict(self) -> dict:
        return {"policy": asdict(self.policy), "ranks": dict(self.ranks)}

    @classmethod
    def from_state_dict(cls, state: dict) -> RankController:
        return cls(RankPolicy(**state["policy"]), dict(state["ranks"]))


def low_rank_layers(model: nn.Module) -> list[tuple[str, LowRankLinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LowRankLinear)]


@torch.no_grad()
def grow_layer(layer: LowRankLinear, width: int, optimizer: torch.optim.Optimizer | None = None,
               generator: torch.Generator | None = None) -> None:
    """Widen the factors to ``width``: B gets zero columns, A small random rows (so B @ A and the
    layer's function are unchanged); Adam-style optimizer state gets zero entries for them."""
    old = layer.rank
    if width <= old:
        return
    extra = width - old
    scale = GROWTH_INIT_SCALE / layer.in_features ** 0.5
    new_rows = torch.randn(extra, layer.in_features, generator=generator, dtype=torch.float32)
    new_rows = (new_rows * scale).to(device=layer.lora_A.device, dtype=layer.lora_A.dtype)
    grown_A = torch.cat([layer.lora_A.data, new_rows], dim=0)  # [width, in]
    grown_B = torch.cat([layer.lora_B.data, layer.lora_B.new_zeros(layer.out_features, extra)], dim=1)  # [out, width]
    _replace_parameter(layer, "lora_A", grown_A, optimizer, pad_dim=0)
    _replace_parameter(layer, "lora_B", grown_B, optimizer, pad_dim=1)


def _replace_parameter(layer: nn.Module, attr: str, value: torch.Tensor, optimizer, pad_dim: int) -> None:
    old = getattr(layer, attr)
    new = nn.Parameter(value, requires_grad=old.requires_grad)
    setattr(layer, attr, new)
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        for index, param in enumerate(group["params"]):
            if param is old:
                group["params"][index] = new
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    grown = {}
    for key, tensor in state.items():
        if torch.is_tensor(tensor) and tensor.shape == old.shape:
            padding = list(tensor.shape)
            padding[pad_dim] = value.shape[pad_dim] - old.shape[pad_dim]
            grown[key] = torch.cat([tensor, tensor.new_zeros(padding)], dim=pad_dim)
        else:
            grown[key] = tensor  # e.g. Adam's scalar step count
    optimizer.state[new] = grown


def factorize_model(model: nn.Module, policy: RankPolicy, efficient: bool, generator: torch.Generator) -> dict[str, int]:
    """Turn every untied linear layer into a LowRankLinear; returns the starting rank of each.

    With a reference (InRank): W = W_init + B @ A, B zero and A random, so the function is the
    init's (rank 0 plus a buffer). ``efficient`` (no reference): B @ A is the best rank-k
    approximation of the init, k = 2 x buffer (rank = buffer, plus a buffer).
    """
    conv1d = conv1d_class()
    embeddings = model.get_input_embeddings()
    tied = {storage_key(embeddings.weight)} if embeddings is not None else set()
    ranks = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, conv1d)) or storage_key(module.weight) in tied:
            continue
        transposed = isinstance(module, conv1d)
        weight = module.weight.detach()
        weight = weight.T if transposed else weight  # [out, in]
        out_features, in_features = weight.shape
        layer = LowRankLinear(weight.new_zeros(0, in_features), weight.new_zeros(out_features, 0),
                              None if efficient else weight.clone(), module.bias)
        layer.stored_transposed = transposed
        buffer = policy.layer_buffer(layer)
        rank = buffer if efficient else 0
        width = min(min(in_features, out_features), rank + buffer)
        if efficient:
            U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
            root = S[:width].sqrt()
            layer.lora_B = nn.Parameter((U[:, :width] * root).to(weight.dtype))  # [out, k]
            layer.lora_A = nn.Parameter((root[:, None] * Vh[:width]).to(weight.dtype))  # [k, in]
        else:
            grow_layer(layer, width, None, generator)
        replace_module(model, name, layer)
        ranks[name] = rank
    return ranks
