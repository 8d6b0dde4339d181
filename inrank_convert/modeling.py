"""Build a running Hugging Face model from an artifact, with LowRankLinear where it pays.

Every factorized weight of an ``nn.Linear`` or GPT-2 ``Conv1D`` becomes a ``LowRankLinear``
(frozen reference + factors, no dense product). Other factorized tensors (embeddings, whose
rows are gathered rather than multiplied) and every dense-stored tensor are rebuilt dense.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .artifact import Artifact
from .errors import ArtifactError
from .layers import LowRankLinear


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def model_config(path: Path):
    """The transformers config of an artifact (copied from the source at compress time)."""
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise ArtifactError("artifact has no config.json, so no model can be built from it", str(path),
                            "re-compress from a Hugging Face folder or run that holds config.json")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError) as err:
        raise ArtifactError(f"cannot build a config from config.json ({str(err).splitlines()[0]})", str(path),
                            "fix config.json, or upgrade transformers for this model type") from err


def empty_model(config, dtype: torch.dtype):
    """The model's module tree on the CPU with uninitialized weights.

    Built for real rather than on the meta device so that non-persistent buffers (rotary
    frequencies, masks) are computed by the modules themselves; ``torch.empty`` pages that are
    never written cost no memory, and the weights of swapped-out layers never are.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as err:
        raise ArtifactError(f"cannot build a causal LM from this config ({str(err).splitlines()[0]})",
                            config.model_type, "only causal language models can run from an artifact") from err
    model.tie_weights()  # part of weight init, which no_init_weights skipped
    return model


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset()


def unfilled_tensors(state: dict[str, torch.Tensor], filled: set[str]) -> list[str]:
    """Names of ``state`` that were not filled and are not tied to a tensor that was
    (GPT-2's lm_head shares storage with wte, so filling one fills both)."""
    filled_storage = {_storage_key(state[name]) for name in filled if name in state}
    return sorted(name for name in set(state) - filled if _storage_key(state[name]) not in filled_storage)


def load_compressed(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    merge: bool = False, init: str | Path | None = None, zero_as_lowrank: bool = False):
    """A Hugging Face causal LM running from the artifact at ``path``.

    The reference is rebuilt and verified (path hashes, seed regeneration, embedded hashes);
    ``init`` overrides its location. ``merge=True`` folds every LowRankLinear into a dense weight
    (dense speed, dense memory). The model is returned in eval mode on ``device``.
    ``zero_as_lowrank=True`` (for training) makes zero-update linear weights rank-0 LowRankLinears
    too, so that they can grow.
    """
    path = Path(path)
    artifact = Artifact(path, Path(init) if init is not None else None)
    try:
        config = model_config(path)
        model = empty_model(config, dtype)
        _fill(model, artifact, dtype, zero_as_lowrank)
    finally:
        artifact.close()
    model.to(device)
    if merge:
        for module in model.modules():
            if isinstance(module, LowRankLinear):
                module.merge()
    return model.eval()


def _fill(model: nn.Module, artifact: Artifact, dtype: torch.dtype, zero_as_lowrank: bool = False) -> None:
    conv1d = _conv1d_class()
    modules = dict(model.named_modules())
    state = model.state_dict(keep_vars=True)
    covered: set[str] = set()
    for name, entry in artifact.tensors.items():
        covered.add(name)
        if entry["kind"] == "alias":
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None or name not in state:
            raise ArtifactError(f"tensor {name!r} has no place in a {model.config.model_type} model", str(artifact.path),
                                "the artifact's config.json does not describe the model it was made from")
        target = state[name]
        if tuple(target.shape) != tuple(entry["shape"]):
            raise ArtifactError(f"tensor {name!r} has shape {entry['shape']}, the model expects {list(target.shape)}",
                                str(artifact.path), "the artifact's config.json does not match its tensors")
        factorized = entry["kind"] == "lowrank" or (zero_as_lowrank and entry["kind"] == "zero")
        if factorized and attr == "weight" and isinstance(owner, (nn.Linear, conv1d)):
            rows, cols = entry["shape"]
            B, A = artifact.factors(name) if entry["kind"] == "lowrank" else (torch.zeros(rows, 0), torch.zeros(0, cols))
            reference = artifact.reference.get(name)
            layer = LowRankLinear.from_stored(B.to(dtype), A.to(dtype), None if reference is None else reference.to(dtype),
                                              conv1d=isinstance(owner, conv1d), bias=owner.bias)
            _replace_module(model, owner_name, layer)
        else:
            with torch.no_grad():
                target.copy_(artifact.reconstruct(name))
    missing = unfilled_tensors(state, covered)
    if missing:
        raise ArtifactError(f"artifact lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:3])}",
                            str(artifact.path), "the artifact's config.json does not match its tensors")
