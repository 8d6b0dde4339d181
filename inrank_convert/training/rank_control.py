"""InRank's incremental rank control (docs/design.md §9): measure each factorized layer's spectrum
cheaply, decide its rank, and grow its factors (and their optimizer state) to keep a buffer.

A layer here is a ``LowRankLinear`` whose factors have width k = r + buffer:
``W = W_ref + B[:, :k] @ A[:k, :]``. Growing appends zero columns to B and small random rows
to A, so the function is unchanged at the step it grows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from inrank_convert.core.errors import CheckpointError, UsageError, flag
from inrank_convert.core.tensors import storage_key
from inrank_convert.linalg.criteria import RankRule, choose_rank, inrank_scan, numerical_args
from inrank_convert.linalg.svd import FactorProductSVD
from inrank_convert.linalg.tangent import rank_beyond_tangent
from inrank_convert.model.architecture import conv1d_class, replace_module
from inrank_convert.model.layers import LowRankLinear

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
    max_rank: int | None = None  # default: min(rows, cols) // 2 per layer; given, up to min(rows, cols)
    stage2_at: int | None = None  # from this step on, no decisions (InRank-Efficient's stage 2)
    growth: str = "exact"  # new factor columns: "exact" (B zero: the function is unchanged) or "random" (the reference's)
    on_growth: str = "pad"  # "pad": old columns and moments kept; "resplit": balanced SVD re-split, fresh moments
    signal: str = "product"  # what a decision reads: B @ A's spectrum, or also the update since the last decision

    def due(self, step: int) -> bool:
        if self.stage2_at is not None and step >= self.stage2_at:
            return False
        return step >= self.warmup and (step - self.warmup) % self.every == 0

    def layer_max_rank(self, layer: LowRankLinear) -> int:
        """The cap a layer's rank grows to: ``max_rank`` as given (up to the full rank), by default
        half the full rank (the reference's)."""
        full = min(layer.in_features, layer.out_features)
        return max(1, full // 2 if self.max_rank is None else min(full, self.max_rank))

    def layer_buffer(self, layer: LowRankLinear) -> int:
        """The buffer, clipped for small layers (never more than a quarter of the full rank)."""
        return max(1, min(self.buffer, min(layer.in_features, layer.out_features) // 4))


@dataclass
class RankController:
    """Holds each layer's current rank r; the factor width is r + buffer (capped)."""

    policy: RankPolicy
    ranks: dict[str, int] = field(default_factory=dict)
    # signal "update": each layer's factors (B [out, k], A [k, in]) at the last decision.
    previous: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def width_for(self, layer: LowRankLinear, rank: int) -> int:
        full = min(layer.in_features, layer.out_features)
        return min(full, rank + self.policy.layer_buffer(layer))

    def decide(self, model: nn.Module) -> dict[str, int]:
        """New rank per layer from its current spectrum: never below the current rank, and never
        grown past max_rank. Returns the layers whose width must grow: name -> new width.

        ``inrank`` is the reference's scan (spectrum.inrank_scan): over the buffer only, on the
        spectrum zero-padded to the layer's full rank, at most buffer - 1 per decision, and
        rank + buffer within max_rank (the reference's factor width). ``energy`` takes the
        smallest rank holding the threshold's share of B @ A's energy, capped at max_rank.

        With the ``update`` signal a layer also grows when the update since the last decision holds
        more than 1 - threshold of its energy outside what the kept rank can follow
        (``rank_beyond_tangent``), by the components that bring it back to the threshold, at most
        to the layer's width; a run's first decision only records the factors."""
        rule = RankRule(self.policy.criterion, self.policy.threshold)
        growth: dict[str, int] = {}
        for name, layer in low_rank_layers(model):
            values = factor_singular_values(layer.lora_B, layer.lora_A)
            current = self.ranks.get(name, 0)
            if self.policy.criterion == "inrank":
                chosen = inrank_scan(values, min(layer.in_features, layer.out_features), current,
                                     self.policy.layer_buffer(layer), self.policy.layer_max_rank(layer),
                                     self.policy.threshold)
            else:
                total = float((values.double() ** 2).sum())
                # At threshold 1 the numerical rank of B @ A, at the precision of its (float32) factors.
                numerical = numerical_args((layer.in_features, layer.out_features), layer.lora_B.dtype)
                chosen = min(choose_rank(values, total, rule, **numerical) if total > 0 else 0,
                             self.policy.layer_max_rank(layer))
            if self.policy.signal == "update":
                chosen = max(chosen, self._update_rank(name, layer, current))
            # Never below the current rank (an artifact may start above the cap); the cap only limits growth.
            rank = max(current, chosen)
            self.ranks[name] = rank
            width = self.width_for(layer, rank)
            if width > layer.rank:
                growth[name] = width
        return growth

    def _update_rank(self, name: str, layer: LowRankLinear, current: int) -> int:
        """The rank the update since the last decision asks for (0 at the first decision)."""
        before = self.previous.get(name)
        self.remember(name, layer)
        if before is None:
            return 0
        if before[0].shape[0] != layer.out_features or before[1].shape[1] != layer.in_features \
                or before[0].shape[1] != before[1].shape[0]:
            raise CheckpointError(f"the rank controller's last factors of {name} have shapes {list(before[0].shape)} "
                                  f"and {list(before[1].shape)}, the layer is {layer.out_features} x {layer.in_features}",
                                  None, "the checkpoint is damaged: resume from an earlier step")
        extra = rank_beyond_tangent(layer.lora_B, layer.lora_A, *before, current, self.policy.threshold)
        return min(current + extra, layer.rank, self.policy.layer_max_rank(layer)) if extra else 0

    def remember(self, name: str, layer: LowRankLinear) -> None:
        """Keep the layer's factors as the next update's start (signal ``update``): at each decision,
        and again after a growth, whose random columns (``--growth random``) are no update."""
        if self.policy.signal == "update":
            self.previous[name] = (layer.lora_B.detach().clone(), layer.lora_A.detach().clone())

    @property
    def total_rank(self) -> int:
        return sum(self.ranks.values())

    def state_dict(self) -> dict:
        return {"policy": asdict(self.policy), "ranks": dict(self.ranks)}

    @classmethod
    def from_state_dict(cls, state: dict) -> RankController:
        return cls(RankPolicy(**state["policy"]), dict(state["ranks"]))  # older states: signal's default

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The factors of the last decision (signal ``update``), so that a resumed run decides alike."""
        tensors = {}
        for name, (B, A) in self.previous.items():
            tensors[f"{PREVIOUS_PREFIX}{name}.lora_B"] = B.detach().cpu().contiguous()
            tensors[f"{PREVIOUS_PREFIX}{name}.lora_A"] = A.detach().cpu().contiguous()
        return tensors

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        names = {key[len(PREVIOUS_PREFIX):].rsplit(".", 1)[0] for key in tensors if key.startswith(PREVIOUS_PREFIX)}
        missing = sorted(f"{PREVIOUS_PREFIX}{name}.{part}" for name in names for part in ("lora_B", "lora_A")
                         if f"{PREVIOUS_PREFIX}{name}.{part}" not in tensors)
        if missing:
            raise CheckpointError(f"the training state has no {missing[0]} beside its pair", None,
                                  "the checkpoint is damaged: resume from an earlier step")
        self.previous = {name: (tensors[f"{PREVIOUS_PREFIX}{name}.lora_B"], tensors[f"{PREVIOUS_PREFIX}{name}.lora_A"])
                         for name in sorted(names)}


PREVIOUS_PREFIX = "rank_control.previous."  # in a checkpoint's training-state tensors
RANK_SIGNALS = ("product", "update")


def low_rank_layers(model: nn.Module) -> list[tuple[str, LowRankLinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LowRankLinear)]


GROWTH_MODES = ("exact", "lora", "random")
ON_GROWTH = ("pad", "resplit")


def _uniform(shape: tuple[int, int], bound: float, generator: torch.Generator | None) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2.0 - 1.0) * bound


@torch.no_grad()
def grow_layer(layer: LowRankLinear, width: int, optimizer: torch.optim.Optimizer | None = None,
               generator: torch.Generator | None = None, mode: str = "exact", max_width: int | None = None) -> None:
    """Widen the factors to ``width``; Adam-style optimizer state gets zero entries for the new ones.

    ``exact``: B gets zero columns, A small random rows, so B @ A and the layer's function are
    unchanged. ``lora``: B zero columns, A kaiming-uniform rows U(-1/sqrt(in), 1/sqrt(in)) as LoRA
    starts its adapters: the function is unchanged too, but B's new columns get gradients of the
    size the old ones get, so the buffer learns. ``random`` (the InRank reference's InRank-Efficient, whose factors are allocated at
    full width with nn.Linear's default init and switched on as the rank grows): both get
    kaiming-uniform entries, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in for A and the
    largest width ``max_width`` for B, so the function changes where the layer grows and the new
    components are visible to the next rank decision."""
    old = layer.rank
    if width <= old:
        return
    extra = width - old
    if mode == "random":
        new_rows = _uniform((extra, layer.in_features), layer.in_features ** -0.5, generator)
        new_columns = _uniform((layer.out_features, extra), max(1, max_width or width) ** -0.5, generator)
    elif mode == "lora":
        new_rows = _uniform((extra, layer.in_features), layer.in_features ** -0.5, generator)
        new_columns = torch.zeros(layer.out_features, extra)
    elif mode == "exact":
        new_rows = torch.randn(extra, layer.in_features, generator=generator, dtype=torch.float32)
        new_rows = new_rows * (GROWTH_INIT_SCALE / layer.in_features ** 0.5)
        new_columns = torch.zeros(layer.out_features, extra)
    else:
        raise ValueError(f"growth must be one of {GROWTH_MODES}, got {mode!r}")
    new_rows = new_rows.to(device=layer.lora_A.device, dtype=layer.lora_A.dtype)
    new_columns = new_columns.to(device=layer.lora_B.device, dtype=layer.lora_B.dtype)
    grown_A = torch.cat([layer.lora_A.data, new_rows], dim=0)  # [width, in]
    grown_B = torch.cat([layer.lora_B.data, new_columns], dim=1)  # [out, width]
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


FACTORIZE_CHOICES = ("all", "mlp", "attention")
_MLP_PARTS = {"mlp", "ffn", "feed_forward", "feedforward"}
_ATTENTION_PARTS = {"attn", "self_attn", "attention", "self_attention"}


def layer_role(name: str) -> str:
    """``mlp``, ``attention`` or ``other`` from a module's dotted name (``transformer.h.0.mlp.c_fc``)."""
    parts = set(name.split("."))
    if parts & _MLP_PARTS:
        return "mlp"
    if parts & _ATTENTION_PARTS:
        return "attention"
    return "other"


def factorized_layers(model: nn.Module, factorize: str = "all") -> list[tuple[str, nn.Module]]:
    """The (name, module) of every untied nn.Linear / Conv1D that ``factorize`` selects."""
    if factorize not in FACTORIZE_CHOICES:
        raise ValueError(f"factorize must be one of {FACTORIZE_CHOICES}, got {factorize!r}")
    conv1d = conv1d_class()
    embeddings = model.get_input_embeddings()
    embedding = embeddings.weight if embeddings is not None else None

    def tied(weight: torch.Tensor) -> bool:
        # The same Parameter, or (real tensors only: every meta tensor has data_ptr 0) the same storage.
        return embedding is not None and (weight is embedding or (
            not weight.is_meta and storage_key(weight) == storage_key(embedding)))

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, conv1d)) and not tied(module.weight)
            and (factorize == "all" or layer_role(name) == factorize)]


def check_initial_rank(model: nn.Module, factorize: str, initial_rank: int | None) -> None:
    """--initial-rank must fit every factorized layer (checked on a meta model, before a run starts)."""
    if initial_rank is None:
        return
    layers = factorized_layers(model, factorize)
    if not layers:
        raise UsageError(f"{flag('--factorize')} {factorize} selects no linear layer of this model",
                         flag("--factorize"), "choose all, mlp or attention to match the model's module names")
    name, module = min(layers, key=lambda item: min(item[1].weight.shape))
    full = min(module.weight.shape)
    if initial_rank > full:
        raise UsageError(f"{flag('--initial-rank')} {initial_rank} is above the full rank {full} of {name}",
                         flag("--initial-rank"), f"pass at most {full}")


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """A Linear's or Conv1D's weight as [out, in] (Conv1D stores [in, out]), detached."""
    weight = module.weight.detach()
    return weight.T if isinstance(module, conv1d_class()) else weight


def empty_low_rank(module: nn.Module, reference: torch.Tensor | None) -> LowRankLinear:
    """A rank-0 LowRankLinear standing in for ``module`` (its bias, its storage orientation) over
    ``reference`` [out, in] (None: pure B @ A); the caller gives it factors."""
    out_features, in_features = oriented_weight(module).shape
    layer = LowRankLinear(module.weight.new_zeros(0, in_features), module.weight.new_zeros(out_features, 0),
                          reference, module.bias)
    layer.stored_transposed = isinstance(module, conv1d_class())
    return layer


DEFAULT_FACTORIZE = "mlp"  # the InRank reference factorizes the MLP projections only
DEFAULT_INITIAL_RANK = 2  # the reference's init_modes


def factorize_model(model: nn.Module, policy: RankPolicy, efficient: bool, generator: torch.Generator,
                    factorize: str = DEFAULT_FACTORIZE, initial_rank: int | None = None) -> dict[str, int]:
    """Turn the untied linear layers ``factorize`` names (``mlp``, as the InRank reference does;
    ``attention``; ``all``) into LowRankLinears; returns the starting rank of each (``initial_rank``,
    default 2 as in the reference, clipped to the layer's full rank), with a buffer of columns.

    With a reference (InRank): W = W_init + B @ A; exact growth starts B zero and A small random, so
    the function is the init's. ``efficient`` (no reference): B @ A is the best rank-k
    approximation of the init, k = rank + buffer, or with ``random`` growth two kaiming-uniform
    factors as in the reference's InRank-Efficient.
    """
    check_initial_rank(model, factorize, initial_rank)
    ranks = {}
    for name, module in factorized_layers(model, factorize):
        weight = oriented_weight(module)  # [out, in]
        out_features, in_features = weight.shape
        layer = empty_low_rank(module, None if efficient else weight.clone())
        buffer = policy.layer_buffer(layer)
        full = min(in_features, out_features)
        rank = min(full, initial_rank if initial_rank is not None else DEFAULT_INITIAL_RANK)
        width = min(full, rank + buffer)
        if efficient and policy.growth == "random":
            # The reference's InRank-Efficient: W = B @ A from random factors, not from the init.
            layer.lora_B = nn.Parameter(weight.new_zeros(out_features, 0))
            layer.lora_A = nn.Parameter(weight.new_zeros(0, in_features))
            grow_layer(layer, width, None, generator, "random", policy.layer_max_rank(layer))
        elif efficient:
            U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
            root = S[:width].sqrt()
            layer.lora_B = nn.Parameter((U[:, :width] * root).to(weight.dtype))  # [out, k]
            layer.lora_A = nn.Parameter((root[:, None] * Vh[:width]).to(weight.dtype))  # [k, in]
        else:
            grow_layer(layer, width, None, generator, policy.growth, policy.layer_max_rank(layer))
        replace_module(model, name, layer)
        ranks[name] = rank
    return ranks


# Components of B @ A below this fraction of the largest singular value are dropped at stage 2:
# they are numerically zero (a buffer column never trained), so the function does not change.
RESPLIT_FLOOR = 1e-7


@torch.no_grad()
def resplit_layer(layer: LowRankLinear, optimizer: torch.optim.Optimizer | None = None, width: int | None = None) -> int:
    """InRank-Efficient's stage 2 for one layer: B @ A re-split by its SVD into balanced factors
    (B' = U sqrt(S), A' = sqrt(S) V^T, from thin QRs: the product is never formed), keeping every
    component above RESPLIT_FLOOR, so the layer's function is unchanged; ``width`` keeps at most that
    many (a cut: the best rank-``width`` approximation of B @ A). The factors' optimizer state is
    dropped: the old coordinates' moments mean nothing in the new basis. Returns the new width."""
    if layer.rank == 0:
        return 0
    svd = FactorProductSVD.of(layer.lora_B.detach().double(), layer.lora_A.detach().double())  # [out, k] @ [k, in]
    S = svd.S
    keep = int((S > RESPLIT_FLOOR * S[0]).sum()) if S.numel() and float(S[0]) > 0 else 0
    keep = keep if width is None else min(keep, width)
    new_B, new_A = svd.balanced(keep)  # [out, keep], [keep, in]
    for attr, value in (("lora_B", new_B), ("lora_A", new_A)):
        old = getattr(layer, attr)
        new = nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=old.requires_grad)
        setattr(layer, attr, new)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [new if param is old else param for param in group["params"]]
            optimizer.state.pop(old, None)
    return keep


@torch.no_grad()
def orthogonalize_init(model: nn.Module, factorize: str, generator: torch.Generator) -> list[str]:
    """Replace the init of every layer ``factorize`` selects by a random (semi-)orthogonal matrix of
    the same Frobenius norm, the W_0 that InRank's analysis of incremental learning assumes.
    Returns the names of the layers changed (their weights keep their storage orientation)."""
    names = []
    for name, module in factorized_layers(model, factorize):
        weight = module.weight  # [out, in] (Linear) or [in, out] (Conv1D): orthogonal either way
        rows, cols = weight.shape
        gaussian = torch.randn(max(rows, cols), min(rows, cols), generator=generator, dtype=torch.float64)
        Q, R = torch.linalg.qr(gaussian)  # [max, min], orthonormal columns
        Q = Q * torch.sign(torch.diagonal(R))  # Haar-distributed
        Q = Q if rows >= cols else Q.T  # [rows, cols]
        norm = torch.linalg.matrix_norm(weight.double())
        weight.copy_((Q * (norm / min(rows, cols) ** 0.5)).to(weight.dtype))
        names.append(name)
    return names
