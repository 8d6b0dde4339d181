"""The reference an update is measured against: an init or base checkpoint, a seed recipe, or zero.

Every reference can describe itself for the manifest (``manifest()``) and be rebuilt from that
description (``reference_from_manifest``), verifying on the way that it is still the same
reference: file hashes for a path, per-tensor hashes for a regenerated seed or embedded init.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from .checkpoints import Checkpoint, TensorInfo, open_checkpoint, sha256_tensor
from .errors import CheckpointError, InitReferenceError, UsageError

# Written by ``inrank-convert train`` into a run's step-0 folder: {"seed": N}.
INIT_RECIPE_FILE = "inrank_init.json"
REFERENCE_MODES = ("reference", "seed", "embedded", "zero")


class Reference(ABC):
    mode: str

    @abstractmethod
    def get(self, name: str) -> torch.Tensor | None:
        """The reference tensor for ``name`` (None for the zero reference)."""

    @abstractmethod
    def infos(self) -> dict[str, TensorInfo] | None:
        """Name -> shape/dtype of every reference tensor (None: any name is fine, as for zero)."""

    @abstractmethod
    def manifest(self) -> dict:
        """A JSON-able description from which ``reference_from_manifest`` rebuilds and verifies it."""

    def aliases(self) -> set[str]:
        """Names that are a second name for another tensor of the reference (tied weights)."""
        return set()

    def prefetch(self, name: str) -> None:
        """A hint that ``name`` is read next."""

    def close(self) -> None:
        pass


class ZeroReference(Reference):
    mode = "zero"

    def get(self, name: str) -> None:
        return None

    def infos(self) -> None:
        return None

    def manifest(self) -> dict:
        return {"mode": "zero"}


class CheckpointReference(Reference):
    """An init or base model on disk; the artifact records its path and file hashes."""

    mode = "reference"

    def __init__(self, checkpoint: Checkpoint, file_hashes: list[dict] | None = None):
        self.checkpoint = checkpoint
        self._file_hashes = file_hashes

    def get(self, name: str) -> torch.Tensor:
        return self.checkpoint.get(name)

    def infos(self) -> dict[str, TensorInfo]:
        return self.checkpoint.infos()

    def aliases(self) -> set[str]:
        return {name for group in self.checkpoint.shared_storage_groups() for name in group[1:]}

    def prefetch(self, name: str) -> None:
        self.checkpoint.prefetch(name)

    def file_hashes(self) -> list[dict]:
        if self._file_hashes is None:
            self._file_hashes = self.checkpoint.file_hashes()
        return self._file_hashes

    def manifest(self) -> dict:
        return {"mode": "reference", "path": str(Path(self.checkpoint.path).resolve()), "files": self.file_hashes()}

    def close(self) -> None:
        self.checkpoint.close()


class TensorsReference(Reference):
    """Tensors held in memory with their hashes: a regenerated seed init or an embedded init file."""

    def __init__(self, mode: str, tensors: dict[str, torch.Tensor] | Checkpoint, hashes: dict[str, str],
                 description: dict, where: str):
        self.mode = mode
        self._tensors = tensors
        self._hashes = hashes
        self._description = description
        self._where = where

    def get(self, name: str) -> torch.Tensor:
        tensors = self._tensors
        tensor = tensors.get(name)
        expected = self._hashes.get(name)
        if expected is not None and sha256_tensor(tensor) != expected:
            raise InitReferenceError(f"init tensor {name!r} does not match its recorded hash", self._where,
                                     _mismatch_fix(self.mode))
        return tensor

    def infos(self) -> dict[str, TensorInfo]:
        if isinstance(self._tensors, Checkpoint):
            return self._tensors.infos()
        return {name: TensorInfo(name, tuple(t.shape), t.dtype) for name, t in self._tensors.items()}

    def hashes(self) -> dict[str, str]:
        return self._hashes

    def aliases(self) -> set[str]:
        if isinstance(self._tensors, Checkpoint):
            return set()
        seen: set[int] = set()
        aliases = set()
        for name, tensor in self._tensors.items():
            pointer = tensor.untyped_storage().data_ptr()
            if pointer in seen:
                aliases.add(name)
            seen.add(pointer)
        return aliases

    def manifest(self) -> dict:
        return dict(self._description)


def _mismatch_fix(mode: str) -> str:
    if mode == "seed":
        return "the init is regenerated from a seed and this torch/transformers gives other values: pass --init PATH to the original init"
    return "the artifact's init.safetensors is damaged: re-compress with --embed-init"


def regenerate_seed_init(config: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``AutoModelForCausalLM.from_config(config)`` under ``torch.manual_seed(seed)``: its state dict."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UsageError(f"cannot regenerate an init for model_type {model_type!r}", "config.json",
                         "pass --init PATH to the init checkpoint instead of --init-seed")
    model = seeded_model(CONFIG_MAPPING[model_type].from_dict(config), seed)
    return {name: tensor.detach().to(dtype) for name, tensor in model.state_dict().items()}


def seeded_model(model_config, seed: int):
    """``AutoModelForCausalLM.from_config`` in float32 under ``manual_seed(seed)``: the init a seed
    recipe stands for (``train`` builds its init with this too, so the recipe regenerates it)."""
    from transformers import AutoModelForCausalLM

    # Restore the caller's RNG afterwards: building an init must not shift anyone's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)


def seed_reference(config: dict, seed: int, dtype: torch.dtype = torch.float32,
                   expected_hashes: dict[str, str] | None = None) -> TensorsReference:
    import transformers

    tensors = regenerate_seed_init(config, seed, dtype)
    hashes = {name: sha256_tensor(t) for name, t in tensors.items()}
    if expected_hashes is not None:
        differing = [name for name, digest in expected_hashes.items() if hashes.get(name) != digest]
        if differing:
            raise InitReferenceError(
                f"the init regenerated from seed {seed} differs from the recorded one "
                f"(tensors {', '.join(differing[:3])})", f"torch {torch.__version__}, transformers {transformers.__version__}",
                _mismatch_fix("seed"))
        hashes = expected_hashes
    recipe = {
        "library": "transformers", "auto_class": "AutoModelForCausalLM", "seed": seed,
        "dtype": str(dtype).removeprefix("torch."), "config": config,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    return TensorsReference("seed", tensors, hashes, {"mode": "seed", "recipe": recipe, "tensors": hashes},
                            f"seed {seed}")


def check_seed_matches(seeded: TensorsReference, init: Checkpoint, seed: int) -> None:
    """``--init-seed N`` together with ``--init PATH``: the regenerated tensors must equal the file's."""
    names = init.names()
    for name in names:
        tensor = init.get(name)
        regenerated = seeded.get(name) if name in seeded.hashes() else None
        if regenerated is None or not torch.equal(regenerated.to(tensor.dtype), tensor):
            raise InitReferenceError(
                f"--init-seed {seed} does not regenerate the init: tensor {name!r} differs", str(init.path),
                "check the seed, or drop --init-seed to store the init by path")


def reference_from_manifest(description: dict, artifact_dir: Path, init_override: Path | None = None,
                            verify: bool = True) -> Reference:
    """Rebuild the reference an artifact was made against, verifying that it is unchanged."""
    mode = description.get("mode")
    if init_override is not None and mode in ("reference", "seed"):
        checkpoint = open_checkpoint(init_override)
        return CheckpointReference(checkpoint)
    if mode == "zero":
        return ZeroReference()
    if mode == "reference":
        path = Path(description["path"])
        if not path.exists():
            raise InitReferenceError("the init reference this artifact was made against is missing", str(path),
                                     "restore it, pass --init PATH, or re-compress with --embed-init")
        checkpoint = _open_reference_checkpoint(path)
        if verify:
            recorded = {entry["file"]: entry["sha256"] for entry in description["files"]}
            current = checkpoint.file_hashes()
            changed = [entry["file"] for entry in current if recorded.get(entry["file"]) != entry["sha256"]]
            if changed or len(current) != len(recorded):
                checkpoint.close()
                raise InitReferenceError(
                    f"the init reference changed since compression (sha256 mismatch in {', '.join(changed[:3]) or 'file list'})",
                    str(path), "restore the original init, or re-compress against the new one")
            return CheckpointReference(checkpoint, current)
        return CheckpointReference(checkpoint)
    if mode == "seed":
        recipe = description["recipe"]
        dtype = getattr(torch, recipe.get("dtype", "float32"))
        return seed_reference(recipe["config"], int(recipe["seed"]), dtype,
                              description["tensors"] if verify else None)
    if mode == "embedded":
        from .checkpoints import SafetensorsCheckpoint

        file = artifact_dir / description["file"]
        if not file.is_file():
            raise InitReferenceError("the artifact's embedded init is missing", str(file),
                                     "re-compress with --embed-init")
        checkpoint = SafetensorsCheckpoint(file, [file], None)
        return TensorsReference("embedded", checkpoint, description["tensors"] if verify else {},
                                description, str(file))
    raise InitReferenceError(f"unknown reference mode {mode!r}", str(artifact_dir),
                             "this artifact may come from a newer inrank-convert: upgrade it")


def _open_reference_checkpoint(path: Path) -> Checkpoint:
    try:
        return open_checkpoint(path)
    except CheckpointError as err:
        raise InitReferenceError(f"cannot read the init reference: {err.what}", str(path), err.fix) from err


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
