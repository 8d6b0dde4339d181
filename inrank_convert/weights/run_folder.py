"""The run folder: the one module that knows its layout. Training writes it, resume reads it back,
``compress RUN`` and ``compare-runs`` read it, and no other module spells its names.

    RUN/step-0/                 where the run starts: the init model folder (train; with its seed
                                recipe ``inrank_init.json`` when seeded), or a checkpoint of the
                                artifact it resumed from
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

Other tools' runs count too: any folder of ``step-N`` or ``checkpoint-N`` subfolders is a run whose
earliest step is the init and whose latest is the trained model. What a checkpoint's tensors hold
is written by ``training.checkpoint``; where everything lives is decided here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from inrank_convert.core.distributed import World, barrier
from inrank_convert.core.errors import CheckpointError, OutputError, flag
from inrank_convert.weights.hash_cache import FOLDER_ENV
from inrank_convert.weights.output_lock import output_lock
from inrank_convert.weights.outputs import check_output_outside, save_tensors

STEP_PATTERN = re.compile(r"^(?:step|checkpoint)-(\d+)$")  # our step-N, Hugging Face Trainer's checkpoint-N
STATE_DIR = "train_state"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "state.safetensors"
METRICS_FILE = "metrics.jsonl"
CACHE_DIR = "cache"
# Written by ``inrank-convert train`` into a run's step-0 folder: {"seed": N}.
INIT_RECIPE_FILE = "inrank_init.json"


# --- steps ------------------------------------------------------------------------------------

def step_folder(run: Path, step: int) -> Path:
    return Path(run) / f"step-{step}"


def run_steps(folder: Path) -> list[tuple[int, Path]]:
    """The ``step-N`` / ``checkpoint-N`` subfolders of a training-run folder, sorted by N."""
    steps = []
    for child in folder.iterdir() if folder.is_dir() else []:
        match = STEP_PATTERN.match(child.name)
        if match and child.is_dir():
            steps.append((int(match.group(1)), child))
    return sorted(steps)


def resolve_run(folder: Path) -> tuple[Path, Path]:
    """(init, trained) folders of a training run: its earliest and latest step."""
    steps = run_steps(folder)
    if len(steps) < 2:
        raise CheckpointError("a training-run folder needs at least two step folders (init and trained)",
                              str(folder), f"pass {flag('--init')} PATH, {flag('--init-seed')} N or {flag('--no-init')} with a single checkpoint")
    return steps[0][1], steps[-1][1]


def is_training_checkpoint(folder: Path) -> bool:
    return (Path(folder) / STATE_DIR / STATE_JSON).is_file() and (Path(folder) / STATE_DIR / STATE_TENSORS).is_file()


def training_checkpoints(run: Path) -> dict[int, Path]:
    """The run's complete checkpoints (step folders with their training state), by step, in order."""
    return {step: folder for step, folder in run_steps(Path(run)) if is_training_checkpoint(folder)}


def has_training_checkpoint(folder: Path) -> bool:
    """Whether any step folder of ``folder`` holds a training state (a run ``resume`` continues)."""
    return bool(training_checkpoints(folder))


def latest_checkpoint(run: Path) -> Path:
    """The run's last complete checkpoint (a step folder with its training state)."""
    complete = list(training_checkpoints(run).values())
    if not complete:
        raise CheckpointError("the run folder holds no complete training checkpoint (no step-N/train_state)",
                              str(run), "resume from an artifact or a model folder with -o, or train from scratch")
    return complete[-1]


# --- creating a run ---------------------------------------------------------------------------

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


@contextmanager
def owned_run(run: Path, world: World, inputs: tuple[Path | str | None, ...] = ()) -> Iterator[None]:
    """The run folder a command writes, for the whole command: checked (not the current folder, not
    in or over an input, through symlinks) and locked by the process that writes it (rank 0), so a
    second train or resume into it is refused at once. A run that had no checkpoint when the command
    began and still has no training checkpoint when it fails (a full disk, a nan loss at the first
    steps, a signal during setup) is removed: nothing in it could be resumed, and a new ``train -o``
    to the same folder then works."""
    run = Path(run)
    if not world.is_main:
        yield
        return
    check_output_outside(run, inputs)
    with output_lock(run):
        existed = run.exists()
        new = not existed or (run.is_dir() and not any(run.iterdir()))
        try:
            yield
        except BaseException as err:
            if new and run.is_dir() and not has_training_checkpoint(run):
                _empty_new_run(run, existed)
            if isinstance(err, OSError) and not err.filename:  # a full disk names no file: name the run
                err.filename = str(run)
            raise


def _empty_new_run(run: Path, existed: bool) -> None:
    if not existed:
        shutil.rmtree(run, ignore_errors=True)
        return
    for item in run.iterdir():  # an empty folder the user made: emptied again, kept
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)


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


# --- caches and the init recipe ----------------------------------------------------------------

def run_cache(run: Path) -> Path:
    """The run's own cache folder (``RUN/cache``): a copy of an embedded init, token caches when
    home is not writable."""
    return Path(run) / CACHE_DIR


def token_cache_dir(run: Path) -> Path:
    """Where token caches live: $INRANK_CONVERT_CACHE, else ~/.cache/inrank-convert/tokens (shared by
    runs, so a text is tokenized once per tokenizer), else the run folder when home is not writable."""
    configured = os.environ.get(FOLDER_ENV)
    if configured:
        return Path(configured)
    home = Path.home() / ".cache" / "inrank-convert" / "tokens"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return run_cache(run)


def read_init_recipe(folder: Path) -> int | None:
    """The seed recorded by ``inrank-convert train`` in a run's init folder, if any."""
    recipe = folder / INIT_RECIPE_FILE
    if not recipe.is_file():
        return None
    try:
        return int(json.loads(recipe.read_text())["seed"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError("cannot parse the init recipe (expected {\"seed\": N})", str(recipe),
                              "fix or delete the file") from err


def write_init_recipe(folder: Path, seed: int) -> None:
    """Record that the init in ``folder`` is ``from_config`` under ``torch.manual_seed(seed)``:
    compress reads this recipe and stores no init tensors."""
    (Path(folder) / INIT_RECIPE_FILE).write_text(json.dumps({"seed": seed}) + "\n")


# --- training state ---------------------------------------------------------------------------

def write_training_state(folder: Path, trainer_state: dict, state_tensors: dict[str, torch.Tensor]) -> None:
    """``folder/train_state``: the trainer state as JSON and the state tensors as safetensors."""
    state_dir = Path(folder) / STATE_DIR
    state_dir.mkdir()
    save_tensors({k: v.detach().contiguous().cpu() for k, v in state_tensors.items()}, state_dir / STATE_TENSORS)
    (state_dir / STATE_JSON).write_text(json.dumps(trainer_state, indent=1, sort_keys=True) + "\n")


def load_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(trainer_state.json, state tensors) of a checkpoint folder, the JSON's shape checked (the keys
    resume reads, of their types) and the tensors readable: a truncated or edited state is one
    line naming the checkpoint, never a traceback at the first key it lacks."""
    state_dir = Path(folder) / STATE_DIR
    fix = f"the checkpoint is damaged: move {Path(folder).name} out of the run folder to resume from the checkpoint before it"
    try:
        trainer_state = json.loads((state_dir / STATE_JSON).read_text())
        tensors = load_file(str(state_dir / STATE_TENSORS))
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"cannot read the training state ({err})", str(state_dir), fix) from err
    problem = _state_problem(trainer_state)
    if problem:
        raise CheckpointError(f"malformed training state: {problem}", str(state_dir / STATE_JSON), fix)
    return trainer_state, tensors


# The keys of trainer_state.json that resume reads, and their types.
_STATE_KEYS = {"step": int, "mode": str, "options": dict}
_OPTIONAL_STATE_KEYS = {"rank_controller": dict, "reference": dict, "config": dict, "tokenizer": str}


def _state_problem(state) -> str:
    if not isinstance(state, dict):
        return f"a JSON {type(state).__name__}, not an object"
    for key, kind in _STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"{key!r} is {json.dumps(state.get(key))[:40]}, not a JSON {'number' if kind is int else kind.__name__}"
    if state["step"] < 0 or state["mode"] not in ("dense", "inrank"):
        return f"step {state['step']} in mode {state['mode']!r}"
    for key, kind in _OPTIONAL_STATE_KEYS.items():
        if state.get(key) is not None and not isinstance(state[key], kind):
            return f"{key!r} is {json.dumps(state[key])[:40]}"
    if state["mode"] == "inrank" and not isinstance(state.get("rank_controller"), dict):
        return "an InRank checkpoint without its 'rank_controller'"
    return ""


# --- metrics ----------------------------------------------------------------------------------

def open_metrics(run: Path):
    """``RUN/metrics.jsonl`` opened for appending records (one JSON object per line)."""
    return (Path(run) / METRICS_FILE).open("a")


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
