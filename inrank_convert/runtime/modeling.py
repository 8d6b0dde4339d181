"""Build a running Hugging Face model from an artifact, with LowRankLinear where it pays.

Every factorized weight of an ``nn.Linear`` or GPT-2 ``Conv1D`` becomes a ``LowRankLinear``
(frozen reference + factors, no dense product). Other factorized tensors (embeddings, whose
rows are gathered rather than multiplied) and every dense-stored tensor are rebuilt dense.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from inrank_convert.artifact import Artifact, Manifest
from inrank_convert.core.errors import ArtifactError, CheckpointError, InrankError, MismatchError
from inrank_convert.core.tensors import storage_key
from inrank_convert.inputs.sources import open_artifact, open_checkpoint
from inrank_convert.model.architecture import (
    checkpoint_keys,
    conv1d_class,
    empty_model,
    meta_model,
    replace_module,
)
from inrank_convert.model.layers import LowRankLinear, RowsLowRankEmbedding, TiedHead
from inrank_convert.weights.checkpoints import Checkpoint

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


def model_config(path: Path) -> PretrainedConfig:
    """The transformers config of an artifact (copied from the source at compress time)."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise ArtifactError("artifact has no config.json, so no model can be built from it", str(path),
                            "put the model's config.json in the artifact folder, or re-compress from a Hugging Face "
                            "folder or run that holds one")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as err:
        raise ArtifactError(f"cannot build a config from config.json ({str(err).splitlines()[0]})", str(path),
                            "fix config.json, or upgrade transformers for this model type") from err


# What to do when config.json and the tensors beside it describe different models.
MISFIT_FIX = "config.json and inrank.safetensors must be the pair compress wrote: restore them, or re-run compress"


def model_misfit(config: PretrainedConfig, shapes: Mapping[str, tuple[int, ...]],
                 model: nn.Module | None = None) -> str | None:
    """Why a folder holding the tensors ``shapes`` (name -> shape) would not load into the model
    ``config`` describes, or None when it would: a name with no place in the model's state dict, a
    shape that differs, or a tensor the model needs that is neither there nor tied to one that is
    (GPT-2's lm_head is wte: a tie is one Parameter under two names). The one place where tensor
    names meet the model's parameter names. ``model``: that model if already built; otherwise it is
    built on the meta device (no memory)."""
    model = model if model is not None else meta_model(config)
    state = model.state_dict(keep_vars=True)
    kind = getattr(config, "model_type", "this")
    # Saved names are mapped as from_pretrained maps them (GPT-NeoX saves lm_head as embed_out.weight).
    # A name transformers fuses or splits on load (Mixtral's experts: None) has no one-to-one key to check.
    places = checkpoint_keys(model, shapes)
    for name, shape in shapes.items():
        if places[name] is None:
            continue
        target = state.get(places[name])
        if target is None:
            return f"tensor {name!r} has no place in the {kind} model of config.json"
        if tuple(target.shape) != tuple(shape):
            return f"tensor {name!r} has shape {list(shape)}, the {kind} model of config.json {list(target.shape)}"
    present = {id(state[places[name]]) for name in shapes if places[name] is not None}
    missing = [name for name, tensor in state.items() if id(tensor) not in present]
    # Which keys the converted tensors fill is transformers' business: the check is skipped for such models.
    if missing and all(key is not None for key in places.values()):
        return (f"the {kind} model of config.json needs {len(missing)} tensor(s) the artifact lacks "
                f"({', '.join(missing[:3])}): from_pretrained would initialize them at random")
    return None


def check_fits_config(artifact: Artifact, model: nn.Module | None = None) -> None:
    """Refuse (ArtifactError) ``artifact`` when its tensors are not the model its config.json
    describes, or when it has no usable config.json. ``model``: that model if already built (its
    config is the one read)."""
    path = artifact.path
    config = model.config if model is not None else model_config(path)
    try:
        problem = model_misfit(config, {name: entry.shape for name, entry in artifact.tensors.items()}, model)
    except ValueError as err:  # transformers builds no causal LM from this config
        raise ArtifactError(f"cannot build a causal LM from config.json ({str(err).splitlines()[0]})", str(path),
                            "only causal language models can be rebuilt from an artifact") from err
    if problem is not None:
        raise ArtifactError(problem, str(path), MISFIT_FIX)


def unfilled_tensors(state: dict[str, torch.Tensor], filled: set[str]) -> list[str]:
    """Names of ``state`` that were not filled and are not tied to a tensor that was
    (GPT-2's lm_head shares storage with wte, so filling one fills both)."""
    filled_storage = {storage_key(state[name]) for name in filled if name in state}
    return sorted(name for name in set(state) - filled if storage_key(state[name]) not in filled_storage)


def load_compressed(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    merge: bool = False, init: str | Path | None = None,
                    zero_as_lowrank: bool = False, rows_as_factors: str = "none") -> PreTrainedModel:
    """A Hugging Face causal LM running from the artifact at ``path``.

    The reference is rebuilt and verified (path hashes, seed regeneration, embedded hashes);
    ``init`` overrides its location. ``merge=True`` folds every LowRankLinear into a dense weight
    (dense speed, dense memory). The model is returned in eval mode on ``device``.
    ``zero_as_lowrank=True`` (for training) makes zero-update linear weights rank-0 LowRankLinears
    too, so that they can grow; ``rows_as_factors`` (for training) makes a ``lowrank+rows``
    embedding a RowsLowRankEmbedding (its factors and rows train, not every row), and a head tied
    to it a TiedHead: ``"input"`` the model's input (token) embedding only, ``"all"`` every one
    (a run's checkpoint, which stores each embedding in the form it trained in), ``"none"`` none.
    """
    path = Path(path)
    artifact = open_artifact(path, init)
    try:
        config = model_config(path)
        model = empty_model(config, dtype)
        _fill(model, artifact, dtype, zero_as_lowrank, rows_as_factors)
    finally:
        artifact.close()
    model.to(device)
    if merge:
        for module in model.modules():
            if isinstance(module, LowRankLinear):
                module.merge()
    return model.eval()


ROWS_AS_FACTORS = ("none", "input", "all")


def _fill(model: nn.Module, artifact: Artifact, dtype: torch.dtype, zero_as_lowrank: bool = False,
          rows_as_factors: str = "none") -> None:
    conv1d = conv1d_class()
    modules = dict(model.named_modules())
    state = model.state_dict(keep_vars=True)
    # The artifact keeps the names its source was saved under; transformers loads some of them into
    # modules of another name (GPT-NeoX: embed_out.weight -> lm_head.weight).
    places = checkpoint_keys(model, artifact.tensors)
    covered: set[str] = set()
    filled_storage: set[tuple[int, int]] = set()  # tensors holding their final values
    if rows_as_factors not in ROWS_AS_FACTORS:
        raise ValueError(f"rows_as_factors must be one of {ROWS_AS_FACTORS}, got {rows_as_factors!r}")
    as_rows: tuple[nn.Module, ...] = ()  # the embeddings that train as rows and factors
    if rows_as_factors == "input":
        as_rows = (model.get_input_embeddings(),)
    elif rows_as_factors == "all":
        as_rows = tuple(module for module in modules.values() if isinstance(module, nn.Embedding))
    for name, entry in artifact.tensors.items():
        key = _place(model, state, places, name, artifact.path)
        covered.add(key)
        if entry.is_alias:
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = modules.get(owner_name)
        target = state[key]
        if tuple(target.shape) != entry.shape:
            raise ArtifactError(f"tensor {name!r} has shape {list(entry.shape)}, the model expects {list(target.shape)}",
                                str(artifact.path), "the artifact's config.json does not match its tensors")
        # Linear layers whose update is B @ A run as LowRankLinear; rows (a lowrank+rows update, or a
        # grown vocabulary) are gathered into a dense weight instead, like embeddings: a rows update
        # is rare on a projection, and the dense weight trains (resume) like any dense parameter.
        factorized = entry.kind == "lowrank" or (zero_as_lowrank and entry.kind == "zero")
        if factorized and entry.reference_rows is None and attr == "weight" and isinstance(owner, (nn.Linear, conv1d)):
            rows, cols = entry.shape
            artifact.check_overflow(name)  # the weight is never formed here: its bound is checked instead
            B, A = artifact.factors(name) if entry.kind == "lowrank" else (torch.zeros(rows, 0), torch.zeros(0, cols))
            reference = artifact.reference.get(name)
            layer = LowRankLinear.from_stored(B.to(dtype), A.to(dtype), None if reference is None else reference.to(dtype),
                                              conv1d=isinstance(owner, conv1d), bias=owner.bias)
            replace_module(model, owner_name, layer)
        elif entry.kind == "lowrank+rows" and entry.reference_rows is None and attr == "weight" \
                and isinstance(owner, nn.Embedding) and any(owner is m for m in as_rows):
            _rows_embedding(model, owner_name, owner, artifact, name, dtype)
        else:
            with torch.no_grad():
                target.copy_(artifact.reconstruct(name))
            filled_storage.add(storage_key(target))
    # An alias is one value stored under two names. When the model ties the two (GPT-2's lm_head
    # and wte) filling one filled both; when it does not (equal values in an untied model, or a
    # canonical swapped out for a LowRankLinear) the alias's own parameter must be filled too.
    for name, of in artifact.manifest.aliases().items():
        target = state[places[name]]  # _place checked it above
        if tuple(target.shape) != artifact.tensors[of].shape:
            raise ArtifactError(f"tied tensor {name!r} has shape {list(target.shape)} in the model, the tensor it is "
                                f"tied to {list(artifact.tensors[of].shape)}", str(artifact.path),
                                "the artifact's config.json does not match its tensors")
        if storage_key(target) not in filled_storage:
            with torch.no_grad():
                target.copy_(artifact.reconstruct(name))
            filled_storage.add(storage_key(target))
    missing = unfilled_tensors(state, covered)
    if missing:
        raise ArtifactError(f"artifact lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:3])}",
                            str(artifact.path), "the artifact's config.json does not match its tensors")


def _rows_embedding(model: nn.Module, owner_name: str, owner: nn.Embedding, artifact: Artifact, name: str,
                    dtype: torch.dtype) -> None:
    """Replace the embedding ``owner_name`` by the trainable form of its lowrank+rows entry, and any
    module whose weight is the same Parameter (a tied LM head) by a TiedHead on it."""
    artifact.check_overflow(name)
    B, A = artifact.factors(name)  # [V, k], [k, d]
    index, rows = artifact.rows(name)  # [K], [K, d]
    reference = artifact.reference.get(name)
    layer = RowsLowRankEmbedding(A.to(dtype), B.to(dtype), rows.to(dtype), index,
                                 None if reference is None else reference.to(dtype), owner.padding_idx)
    tied = [module_name for module_name, module in model.named_modules()
            if module is not owner and getattr(module, "weight", None) is owner.weight]
    replace_module(model, owner_name, layer)
    for module_name in tied:
        head = model.get_submodule(module_name)
        replace_module(model, module_name, TiedHead(layer, getattr(head, "bias", None)))


def _place(model: nn.Module, state: dict, places: dict[str, str | None], name: str, where: Path | str,
           error: type[InrankError] = ArtifactError, config_file: str = "the artifact's config.json") -> str:
    """The model's state-dict key for the saved tensor ``name``, or an error that says why it has none."""
    key = places[name]
    model_type = model.config.model_type
    if key is None:
        raise error(f"tensor {name!r} is one transformers fuses or splits with others when it loads a {model_type} "
                    "model, so inrank-convert cannot load it tensor by tensor", str(where),
                    "run 'inrank-convert decompress' and load the dense folder with from_pretrained")
    if key not in state:
        import transformers

        loaded_as = f" (loaded as {key!r})" if key != name else ""
        raise error(f"tensor {name!r}{loaded_as} is no parameter of the {model_type} model that transformers "
                    f"{transformers.__version__} builds from {config_file}", str(where),
                    "the config.json must be the one saved with these weights; if it is, the transformers that saved "
                    "them names this architecture's weights otherwise: use that version")
    return key


def checkpoint_config(checkpoint: Checkpoint, fallback: PretrainedConfig | None = None) -> PretrainedConfig | None:
    """The transformers config beside a checkpoint, or ``fallback`` when it has none."""
    from transformers import AutoConfig

    if checkpoint.config_dir is None or not (checkpoint.config_dir / "config.json").is_file():
        return fallback
    try:
        return AutoConfig.from_pretrained(str(checkpoint.config_dir))
    except (ValueError, KeyError, OSError) as err:
        raise CheckpointError(f"cannot build a config from config.json ({str(err).splitlines()[0]})",
                              str(checkpoint.config_dir), "fix config.json") from err


def check_same_architecture(checkpoint: Checkpoint, artifact_config: PretrainedConfig, manifest: Manifest,
                            label: str) -> None:
    """A dense model compared with an artifact must be the same architecture: config, names and shapes."""
    where = str(checkpoint.path)
    fix = "pass the checkpoint the artifact was compressed from"
    config = checkpoint.config()
    if config is not None:
        for key in ("model_type", "vocab_size"):
            theirs, ours = config.get(key), getattr(artifact_config, key, None)
            if theirs != ours:
                raise MismatchError(f"{label} is another architecture: its {key} is {theirs!r}, the artifact's {ours!r}",
                                    where, fix)
    tensors = manifest.tensors
    infos = checkpoint.infos()
    for name, info in infos.items():
        entry = tensors.get(name)
        if entry is None:
            raise MismatchError(f"{label} is another architecture: it has tensor {name!r}, the artifact does not",
                                where, fix)
        if tuple(info.shape) != entry.shape:
            raise MismatchError(f"{label} is another architecture: tensor {name!r} has shape {list(info.shape)}, "
                                f"the artifact's {list(entry.shape)}", where, fix)
    missing = [name for name in manifest.stored_entries() if name not in infos]
    if missing:
        raise MismatchError(f"{label} is another architecture: it lacks {len(missing)} tensor(s) of the artifact "
                            f"({', '.join(missing[:3])})", where, fix)


def load_dense(path: str | Path, config: PretrainedConfig, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A dense Hugging Face model from any CKPT form (HF folder, shards, single file, artifact).

    The module tree comes from ``config``; every tensor is copied in from the checkpoint, one
    at a time; weights the checkpoint leaves out must be tied to one it holds.
    """
    checkpoint = open_checkpoint(path)
    try:
        model = empty_model(config, dtype)
        state = model.state_dict(keep_vars=True)
        filled = set()
        names = checkpoint.names()
        places = checkpoint_keys(model, names)  # saved name -> the model's key, as from_pretrained maps it
        for name in names:
            key = _place(model, state, places, name, path, MismatchError, "its config.json")
            target = state[key]
            tensor = checkpoint.get(name)
            if tuple(tensor.shape) != tuple(target.shape):
                raise MismatchError(f"tensor {name!r} has shape {list(tensor.shape)}, the model expects "
                                    f"{list(target.shape)}", str(path), "its config.json does not describe these weights")
            with torch.no_grad():
                target.copy_(tensor)
            filled.add(key)
            del tensor
    finally:
        checkpoint.close()
    missing = unfilled_tensors(state, filled)
    if missing:
        raise MismatchError(f"checkpoint lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:3])}",
                            str(path), "its config.json does not describe these weights")
    return model.to(device).eval()
