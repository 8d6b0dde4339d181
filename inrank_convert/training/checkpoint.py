"""Training checkpoints: what a ``RUN/step-N`` folder holds. An InRank run's model is written as an
artifact (its factors at their full width r + buffer, through ``ArtifactWriter``), a dense run's
as a Hugging Face checkpoint; beside it the config, the tokenizer and the training state (optimizer
moments by parameter name, RNG states) that make a resume exact. Where those files go is
``weights.run_folder``'s business.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from inrank_convert.artifact import (
    ArtifactWriter,
    ReferenceRecord,
    RuleRecord,
    SourceRecord,
    TrainingRecord,
)
from inrank_convert.core.errors import CheckpointError
from inrank_convert.core.tensors import storage_key, without_aliases
from inrank_convert.model.layers import LowRankLinear, RowsLowRankEmbedding, TiedHead
from inrank_convert.weights.outputs import atomic_output_dir, save_tensors
from inrank_convert.weights.run_folder import step_folder, write_training_state

OPTIMIZER_PREFIX = "optimizer."
RNG_PREFIX = "rng."


def add_model_tensors(writer: ArtifactWriter, model: nn.Module) -> int:
    """Store the model's tensors with ``writer``; returns the dense bytes they stand for.

    Names are those of the dense model's state dict (so the artifact decompresses to a normal
    checkpoint): a LowRankLinear ``m`` stores ``m.weight`` as factors in the source orientation,
    at their full width (r + buffer). Tied tensors (GPT-2's lm_head and wte) are stored once and
    listed as aliases.
    """
    low_rank = {name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)}
    rows_form = {name: module for name, module in model.named_modules() if isinstance(module, RowsLowRankEmbedding)}
    seen: dict[tuple[int, int], str] = {}
    original = 0
    for name, tensor in model.state_dict(keep_vars=False).items():
        owner, _, attr = name.rpartition(".")
        if owner in rows_form and attr in ("lora_A", "lora_B", "rows", "row_index", "weight_ref", "fixed_rows",
                                           "fixed_index"):
            if attr == "lora_A":  # an embedding trained as lowrank+rows is stored as one
                layer = rows_form[owner]
                row_index, rows = layer.all_rows()
                entry = writer.add_lowrank(f"{owner}.weight", layer.lora_B.detach(), layer.lora_A.detach(),
                                           shape=(layer.num_embeddings, layer.embedding_dim), dtype=layer.lora_A.dtype,
                                           rows=rows, row_index=row_index)
                original += entry.original_bytes
            continue
        if owner in low_rank and attr in ("lora_A", "lora_B", "weight_ref"):
            if attr == "lora_A":
                layer = low_rank[owner]
                B, A = layer.stored_factors()
                shape = (layer.in_features, layer.out_features) if layer.stored_transposed else \
                    (layer.out_features, layer.in_features)
                entry = writer.add_lowrank(f"{owner}.weight", B, A, shape=shape, dtype=A.dtype)
                original += entry.original_bytes
            continue
        key = storage_key(tensor)
        if key in seen:
            writer.add_alias(name, seen[key], shape=tuple(tensor.shape), dtype=tensor.dtype)
            continue
        seen[key] = name
        original += writer.add_dense(name, tensor.detach()).original_bytes
    names = {id(module): name for name, module in rows_form.items()}
    for name, module in model.named_modules():
        if isinstance(module, TiedHead):  # the head is the embedding's weight: an alias
            embedding = module.embedding
            writer.add_alias(f"{name}.weight", f"{names[id(embedding)]}.weight",
                             shape=(embedding.num_embeddings, embedding.embedding_dim), dtype=embedding.lora_A.dtype)
    return original


def save_checkpoint(run: Path, step: int, model: nn.Module, tokenizer, reference: ReferenceRecord | None,
                    rule: RuleRecord, trainer_state: dict, state_tensors: dict[str, torch.Tensor],
                    embedded_init: Path | None = None) -> Path:
    """Write ``RUN/step-N`` atomically: an artifact (``reference`` given: InRank) or a dense
    Hugging Face folder, the tokenizer, and the training state."""
    folder = step_folder(run, step)
    if reference is None:
        with atomic_output_dir(folder, force=True) as temp:
            save_model_weights(model, temp)
            _save_beside_weights(temp, model, tokenizer, trainer_state, state_tensors)
        return folder
    with ArtifactWriter(folder, force=True) as writer:
        original = add_model_tensors(writer, model)
        if embedded_init is not None:
            writer.link_reference_file(embedded_init)
        run_path = str(Path(run).resolve())
        writer.finish(source=SourceRecord(run_path, "training", run_path, []), reference=reference, rule=rule,
                      original_bytes=original, training=TrainingRecord(step, str(trainer_state.get("mode"))))
        _save_beside_weights(writer.folder, model, tokenizer, trainer_state, state_tensors)
    return folder


def _save_beside_weights(folder: Path, model: nn.Module, tokenizer, trainer_state: dict,
                         state_tensors: dict[str, torch.Tensor]) -> None:
    """config.json, the tokenizer and the training state of a checkpoint folder."""
    save_config(model, folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_training_state(folder, trainer_state, state_tensors)


def save_config(model: nn.Module, folder: Path) -> None:
    """config.json, naming the model's class in ``architectures`` (a model built from a bare config
    has none, and vLLM and llama.cpp's converter need it)."""
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)


def save_model_weights(model: nn.Module, folder: Path) -> None:
    """``model.safetensors`` as save_pretrained writes it (tied tensors once), without its progress bar."""
    state = {k: v.detach().contiguous().cpu() for k, v in without_aliases(model.state_dict()).items()}
    save_tensors(state, Path(folder) / "model.safetensors", metadata={"format": "pt"})
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Optimizer state keyed by parameter name (stable across a rebuild, unlike indices)."""
    names = {id(param): name for name, param in model.named_parameters()}
    tensors = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{OPTIMIZER_PREFIX}{names[id(param)]}.{key}"] = value
    return tensors


def load_optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        prefix = f"{OPTIMIZER_PREFIX}{name}."
        state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        if not state:
            continue
        for key, value in state.items():
            if key != "step" and tuple(value.shape) != tuple(param.shape):
                raise CheckpointError(f"optimizer state {name}.{key} has shape {list(value.shape)}, the parameter "
                                      f"{list(param.shape)}", None, "the checkpoint is damaged")
        optimizer.state[param] = {key: value if key == "step" else value.to(param.device) for key, value in state.items()}
