"""Training checkpoints on disk: a model folder that every other command reads, plus the state
that makes a resume exact.

    RUN/step-N/                 written whole into a temp folder, then renamed (a SIGKILL leaves
                                the previous checkpoints as they were, never a half-written one)
      inrank.safetensors        InRank runs: an artifact (factors at their full width r + buffer)
      model.safetensors         dense runs: a Hugging Face checkpoint
      config.json, tokenizer files
      train_state/
        trainer_state.json      step, options, rank-controller state, tokenizer fingerprint
        state.safetensors       optimizer moments (by parameter name) and RNG states; no pickle
    RUN/metrics.jsonl           one JSON object per logged step
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .artifact import (
    INIT_FILE,
    atomic_output_dir,
    dtype_name,
    factor_names,
    new_manifest,
    write_artifact_file,
)
from .checkpoints import run_steps
from .errors import CheckpointError
from .layers import LowRankLinear

STATE_DIR = "train_state"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "state.safetensors"
METRICS_FILE = "metrics.jsonl"
OPTIMIZER_PREFIX = "optimizer."
RNG_PREFIX = "rng."


def step_folder(run: Path, step: int) -> Path:
    return Path(run) / f"step-{step}"


def is_training_checkpoint(folder: Path) -> bool:
    return (Path(folder) / STATE_DIR / STATE_JSON).is_file() and (Path(folder) / STATE_DIR / STATE_TENSORS).is_file()


def latest_checkpoint(run: Path) -> Path:
    """The run's last complete checkpoint (a step folder with its training state)."""
    complete = [folder for _, folder in run_steps(Path(run)) if is_training_checkpoint(folder)]
    if not complete:
        raise CheckpointError("the run folder holds no complete training checkpoint (no step-N/train_state)",
                              str(run), "resume from an artifact or a model folder with -o, or train from scratch")
    return complete[-1]


def model_artifact(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict], int]:
    """What an artifact of the model stores: (stored tensors, manifest ``tensors``, dense bytes).

    Names are those of the dense model's state dict (so the artifact decompresses to a normal
    checkpoint): a LowRankLinear ``m`` stores ``m.weight`` as factors in the source orientation.
    Tied tensors (GPT-2's lm_head and wte) are stored once and listed as aliases.
    """
    low_rank = {name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)}
    stored: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    seen: dict[tuple[int, int], str] = {}
    original = 0
    for name, tensor in model.state_dict(keep_vars=False).items():
        owner, _, attr = name.rpartition(".")
        if owner in low_rank and attr in ("lora_A", "lora_B", "weight_ref"):
            if attr == "lora_A":
                layer = low_rank[owner]
                B, A = layer.stored_factors()
                weight_name = f"{owner}.weight"
                b_name, a_name = factor_names(weight_name)
                stored[b_name], stored[a_name] = B, A
                shape = [layer.in_features, layer.out_features] if layer.stored_transposed else \
                    [layer.out_features, layer.in_features]
                nbytes = shape[0] * shape[1] * A.element_size()
                entries[weight_name] = {"kind": "lowrank", "shape": shape, "dtype": dtype_name(A.dtype),
                                        "rank": layer.rank, "energy": 1.0, "bytes": B.nbytes + A.nbytes,
                                        "original_bytes": nbytes, "svd": None}
                original += nbytes
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            entries[name] = {"kind": "alias", "of": seen[key], "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}
            continue
        seen[key] = name
        stored[name] = tensor.detach()
        entries[name] = {"kind": "dense", "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype), "rank": None,
                         "energy": 1.0, "bytes": tensor.nbytes, "original_bytes": tensor.nbytes, "svd": None}
        original += tensor.nbytes
    return stored, entries, original


def save_checkpoint(run: Path, step: int, model: nn.Module, tokenizer, reference: dict | None, rule: dict,
                    trainer_state: dict, state_tensors: dict[str, torch.Tensor],
                    embedded_init: Path | None = None) -> Path:
    """Write ``RUN/step-N`` atomically: an artifact (``reference`` given: InRank) or a dense
    Hugging Face folder, the tokenizer, and the training state."""
    folder = step_folder(run, step)
    with atomic_output_dir(folder, force=True) as temp:
        model.config.save_pretrained(temp)
        if tokenizer is not None:
            tokenizer.save_pretrained(temp)
        if reference is None:
            save_model_weights(model, temp)
        else:
            stored, entries, original = model_artifact(model)
            manifest = new_manifest(
                source={"path": str(Path(run).resolve()), "kind": "training", "run": str(Path(run).resolve()), "files": []},
                reference=reference, rule=rule, training={"step": step, "mode": trainer_state.get("mode")},
                original_bytes=original, tensors=entries)
            write_artifact_file(temp, stored, manifest)
            if embedded_init is not None:
                _link_or_copy(embedded_init, temp / INIT_FILE)
        state_dir = temp / STATE_DIR
        state_dir.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in state_tensors.items()}, str(state_dir / STATE_TENSORS))
        (state_dir / STATE_JSON).write_text(json.dumps(trainer_state, indent=1, sort_keys=True) + "\n")
    return folder


def save_model_weights(model: nn.Module, folder: Path) -> None:
    """``model.safetensors`` as save_pretrained writes it (tied tensors once), without its progress bar."""
    state = {k: v.detach().contiguous().cpu() for k, v in _dense_state(model).items()}
    save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


def _dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors once (safetensors refuses shared storage)."""
    seen: set[tuple[int, int]] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key not in seen:
            seen.add(key)
            state[name] = tensor
    return state


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # the embedded init never changes: share it between checkpoints
    except OSError:
        shutil.copyfile(source, target)


def load_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer_state.json, state tensors) of a checkpoint folder."""
    state_dir = Path(folder) / STATE_DIR
    try:
        trainer_state = json.loads((state_dir / STATE_JSON).read_text())
        tensors = load_file(str(state_dir / STATE_TENSORS))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the training state ({err})", str(state_dir),
                              "the checkpoint is damaged: resume from an earlier step folder") from err
    return trainer_state, tensors


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


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return records


def trim_metrics(run: Path, last_step: int, source: Path | None = None) -> None:
    """Keep the records up to ``last_step`` (from ``source``'s metrics, default the run's own):
    a resumed run rewrites what came after its checkpoint."""
    records = [r for r in read_metrics(source or run) if isinstance(r, dict) and r.get("step", 0) <= last_step]
    path = Path(run) / METRICS_FILE
    temp = path.with_name(path.name + ".tmp")
    temp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(temp, path)
