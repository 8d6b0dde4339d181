"""Dense first, then low rank (docs/design.md §9): the reference an InRank run records for its init,
and the switch a ``--dense-warmup K`` run makes at step K, which is ``compress`` and ``resume`` in
one run: every factorized layer's update W_K - W_init (W_K itself with ``--efficient``) is cut to
the rank ``--criterion``/``--threshold`` give it, as factors split as ``--factor-split`` says
(balanced, U sqrt(S) and sqrt(S) V^T, by default; or dense-rate), and training goes on from there
with a buffer of columns and fresh optimizer state for the factors.

Why: factors that start near zero learn slowly under AdamW (the product moves like a power
iteration on the gradient), while a few hundred dense steps give each layer the directions that
matter; Cuttlefish (Wang et al., MLSys 2023) switches once the stable rank settles.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from inrank_convert.artifact import ReferenceRecord
from inrank_convert.core.tensors import sha256_tensor
from inrank_convert.inputs.reference import CheckpointReference, seed_reference
from inrank_convert.inputs.sources import open_checkpoint
from inrank_convert.linalg.criteria import RankRule, choose_rank, numerical_args
from inrank_convert.linalg.svd import balanced_factors
from inrank_convert.model.architecture import conv1d_class, replace_module
from inrank_convert.model.layers import split_factors
from inrank_convert.training.rank_control import (
    RankController,
    RankPolicy,
    empty_low_rank,
    factorized_layers,
    grow_layer,
    oriented_weight,
)
from inrank_convert.weights.run_folder import read_init_recipe


def init_reference(init_folder: Path, efficient: bool, seed: int | None,
                   init_state: dict[str, torch.Tensor]) -> ReferenceRecord:
    """The reference of an InRank run started from ``init_folder`` (``RUN/step-0``): none with
    ``efficient``; the seed recipe when ``seed`` regenerates exactly ``init_state`` (so checkpoints
    store no init bytes); else step-0 itself, by path and hashes."""
    if efficient:
        return ReferenceRecord("zero")
    if seed is not None:
        config = json.loads((init_folder / "config.json").read_text())
        reference = seed_reference(config, seed)
        hashes = reference.hashes()
        if all(hashes.get(name) == sha256_tensor(tensor) for name, tensor in init_state.items()):
            return reference.record()
    checkpoint = open_checkpoint(init_folder)
    try:
        return CheckpointReference(checkpoint).record()
    finally:
        checkpoint.close()


@torch.no_grad()
def factorize_trained(model: nn.Module, init_weights: dict[str, torch.Tensor] | None, policy: RankPolicy,
                      rule: RankRule, factorize: str, generator: torch.Generator, split: str) -> dict[str, int]:
    """Replace every layer ``factorize`` selects by ``W_init + B @ A`` (``B @ A`` alone when
    ``init_weights`` is None): B @ A the best rank-r approximation of W - W_init, r from ``rule``
    (capped at the policy's max rank), split as ``split`` (FACTOR_SPLITS) names, plus the policy's
    buffer of columns grown its way. Returns each layer's rank."""
    ranks = {}
    for name, module in factorized_layers(model, factorize):
        weight = oriented_weight(module)  # [out, in]
        reference = None
        if init_weights is not None:
            stored = init_weights[f"{name}.weight"].to(device=weight.device, dtype=weight.dtype)
            reference = (stored.T if isinstance(module, conv1d_class()) else stored).contiguous()  # [out, in]
        update = weight - reference if reference is not None else weight
        U, S, Vh = torch.linalg.svd(update.double(), full_matrices=False)
        layer = empty_low_rank(module, reference)
        energy = float(S.square().sum())
        # At threshold 1 the numerical rank of the update, at the precision of the trained weight.
        numerical = numerical_args(tuple(update.shape), weight.dtype)
        rank = min(choose_rank(S, energy, rule, **numerical) if energy > 0 else 0, policy.layer_max_rank(layer))
        B, A = split_factors(*balanced_factors(U, S, Vh, rank), split)  # [out, r], [r, in]; float64
        layer.lora_B = nn.Parameter(B.to(weight.dtype))
        layer.lora_A = nn.Parameter(A.to(weight.dtype))  # the buffer's new columns start as --growth says
        width = min(min(weight.shape), rank + policy.layer_buffer(layer))
        grow_layer(layer, width, None, generator, policy.growth, policy.layer_max_rank(layer))
        replace_module(model, name, layer)
        ranks[name] = rank
    return ranks


def switch_to_low_rank(model: nn.Module, init_folder: Path, efficient: bool, policy: RankPolicy, rule: RankRule,
                       factorize: str, generator: torch.Generator, split: str) -> tuple[RankController, ReferenceRecord]:
    """The switch of a dense warm-up: factorize the trained layers against the run's init in
    ``init_folder`` (``RUN/step-0``, read once; with ``efficient`` no reference) and return the rank
    controller and the reference the run's checkpoints record from then on."""
    if efficient:
        ranks = factorize_trained(model, None, policy, rule, factorize, generator, split)
        return RankController(policy, ranks), ReferenceRecord("zero")
    init_state = load_file(str(Path(init_folder) / "model.safetensors"))
    ranks = factorize_trained(model, init_state, policy, rule, factorize, generator, split)
    reference = init_reference(init_folder, False, read_init_recipe(init_folder), init_state)
    return RankController(policy, ranks), reference
