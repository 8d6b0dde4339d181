"""Run folders on disk: creating them, the training checkpoints in them (a model folder that every
other command reads, plus the state that makes a resume exact) and their metrics.

    RUN/step-0/                 where the run starts: the init model folder (train; with its seed
                                recipe when seeded), or a checkpoint of the artifact it resumed from
    RUN/step-N/                 written whole into a temp folder, then renamed (a SIGKILL leaves
                                the previous checkpoints as they were, never a half-written one)
      inrank.safetensors        InRank runs: an artifact (factors at their full width r + buffer)
      model.safetensors         dense runs: a Hugging Face checkpoint
      config.json, tokenizer files
      train_state/
        trainer_state.json      step, options, rank-controller state, tokenizer fingerprint
        state.safetensors       optimizer moments (by parameter name) and RNG states; no pickle
    RUN/metrics.jsonl           one JSON object per logged step
    RUN/cache/                  a copy of an embedded init; token caches when home is not writable

One module for the layout, so that the loop (which saves) and resume (which reads back) agree on it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from inrank_convert.artifact import ArtifactWriter, ReferenceRecord, RuleRecord, SourceRecord, TrainingRecord
from inrank_convert.core.distributed import World, barrier
from inrank_convert.core.errors import CheckpointError, OutputError
from inrank_convert.core.tensors import storage_key, without_aliases
from inrank_convert.model.layers import LowRankLinear
from inrank_convert.weights.checkpoints import run_steps
from inrank_convert.weights.outputs import atomic_output_dir

STATE_DIR = "train_state"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "state.safetensors"
METRICS_FILE = "metrics.jsonl"
OPTIMIZER_PREFIX = "optimizer."
RNG_PREFIX = "rng."


# --- run folders ------------------------------------------------------------------------------

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


def ensure_writable_run(run: Path) -> None:
    """Create the run folder if needed and prove that it takes files, before any work goes into it."""
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".inrank-write-test-{int(time.time() * 1e6)}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"cannot write the run folder ({err.strerror})", str(run), "choose a writable -o location") from err


def _check_new_run(run: Path) -> None:
    """Refuse an occupied -o. Every process checks before any creates it: a refusal on rank 0 alone
    would leave the others waiting at the next collective."""
    if run.exists() and not run.is_dir():
        raise OutputError("the run folder path is a file, not a folder", str(run), "choose another -o")
    if run.exists() and any(run.iterdir()):
        raise OutputError("the run folder exists and is not empty", str(run),
                          f"continue it with 'inrank-convert resume {run} ...', or choose another -o")


def start_run(run: Path, world: World, copy_from: tuple[Path, Path] | None = None) -> None:
    """Create the new run folder (on rank 0), optionally as a copy of (source run, checkpoint)."""
    _check_new_run(run)
    barrier(world)
    if world.is_main:
        ensure_writable_run(run)
        if copy_from is not None:
            _copy_run(*copy_from, run)
    barrier(world)


def _copy_run(source: Path, checkpoint: Path, target: Path) -> None:
    """Fill ``target`` with a copy of the source run up to ``checkpoint`` (init and checkpoint)."""
    steps = run_steps(source)
    if steps and steps[0][1] != checkpoint:
        shutil.copytree(steps[0][1], target / steps[0][1].name)
    shutil.copytree(checkpoint, target / checkpoint.name)


def token_cache_dir(run: Path) -> Path:
    """Where token caches live: $INRANK_CONVERT_CACHE, else ~/.cache/inrank-convert/tokens (shared by
    runs, so a text is tokenized once per tokenizer), else the run folder when home is not writable."""
    configured = os.environ.get("INRANK_CONVERT_CACHE")
    if configured:
        return Path(configured)
    home = Path.home() / ".cache" / "inrank-convert" / "tokens"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return run / "cache"


# --- checkpoints ------------------------------------------------------------------------------

def add_model_tensors(writer: ArtifactWriter, model: nn.Module) -> int:
    """Store the model's tensors with ``writer``; returns the dense bytes they stand for.

    Names are those of the dense model's state dict (so the artifact decompresses to a normal
    checkpoint): a LowRankLinear ``m`` stores ``m.weight`` as factors in the source orientation,
    at their full width (r + buffer). Tied tensors (GPT-2's lm_head and wte) are stored once and
    listed as aliases.
    """
    low_rank = {name: module for name, module in model.named_modules() if isinstance(module, LowRankLinear)}
    seen: dict[tuple[int, int], str] = {}
    original = 0
    for name, tensor in model.state_dict(keep_vars=False).items():
        owner, _, attr = name.rpartition(".")
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
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    state_dir = folder / STATE_DIR
    state_dir.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in state_tensors.items()}, str(state_dir / STATE_TENSORS))
    (state_dir / STATE_JSON).write_text(json.dumps(trainer_state, indent=1, sort_keys=True) + "\n")


def save_model_weights(model: nn.Module, folder: Path) -> None:
    """``model.safetensors`` as save_pretrained writes it (tied tensors once), without its progress bar."""
    state = {k: v.detach().contiguous().cpu() for k, v in without_aliases(model.state_dict()).items()}
    save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


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


# --- metrics ----------------------------------------------------------------------------------

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
