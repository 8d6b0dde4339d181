"""The reference an update is measured against: an init or base checkpoint, a seed recipe, or zero.

Every reference can describe itself for the manifest (``record()``) and be rebuilt from that
record (``sources.reference_from_record``), verifying on the way that it is still the same
reference: file hashes for a path, per-tensor hashes for a regenerated seed or embedded init.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from inrank_convert.artifact import ReferenceMode, ReferenceRecord
from inrank_convert.core.errors import InitReferenceError, UsageError, flag
from inrank_convert.core.tensors import aliases_of, dtype_name, sha256_tensor
from inrank_convert.model.architecture import check_seed, config_from_dict, seeded_model
from inrank_convert.weights.checkpoints import Checkpoint, FileHash, TensorInfo


class Reference(ABC):
    mode: ReferenceMode

    @abstractmethod
    def get(self, name: str) -> torch.Tensor | None:
        """The reference tensor for ``name`` (None for the zero reference)."""

    @abstractmethod
    def infos(self) -> dict[str, TensorInfo] | None:
        """Name -> shape/dtype of every reference tensor (None: any name is fine, as for zero)."""

    @abstractmethod
    def record(self) -> ReferenceRecord:
        """The manifest's description, from which ``sources.reference_from_record`` rebuilds and verifies it."""

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

    def record(self) -> ReferenceRecord:
        return ReferenceRecord("zero")


class CheckpointReference(Reference):
    """An init or base model on disk; the artifact records its path and file hashes."""

    mode = "reference"

    def __init__(self, checkpoint: Checkpoint, file_hashes: list[FileHash] | None = None):
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

    def file_hashes(self) -> list[FileHash]:
        if self._file_hashes is None:
            self._file_hashes = self.checkpoint.file_hashes()
        return self._file_hashes

    def record(self) -> ReferenceRecord:
        return ReferenceRecord("reference", path=str(Path(self.checkpoint.path).resolve()), files=self.file_hashes())

    def close(self) -> None:
        self.checkpoint.close()


class TensorsReference(Reference):
    """Tensors held in memory with their hashes: a regenerated seed init or an embedded init file."""

    def __init__(self, tensors: dict[str, torch.Tensor] | Checkpoint, hashes: dict[str, str],
                 description: ReferenceRecord, where: str, given: bool = False):
        self.mode = description.mode
        self._tensors = tensors
        self._hashes = hashes
        self._description = description
        self._where = where
        self._given = given  # the user named these tensors (--init) in place of the recorded reference

    def get(self, name: str) -> torch.Tensor:
        tensors = self._tensors
        tensor = tensors.get(name)
        expected = self._hashes.get(name)
        if expected is not None and sha256_tensor(tensor) != expected:
            fix = (f"pass with {flag('--init')} the init this artifact was compressed against" if self._given
                   else _mismatch_fix(self.mode))
            raise InitReferenceError(f"init tensor {name!r} does not match its recorded hash", self._where, fix)
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
        return set(aliases_of(self._tensors))

    def record(self) -> ReferenceRecord:
        return self._description

    def close(self) -> None:
        if isinstance(self._tensors, Checkpoint):
            self._tensors.close()


def _mismatch_fix(mode: str) -> str:
    if mode == "seed":
        return f"the init is regenerated from a seed and this torch/transformers gives other values: pass {flag('--init')} PATH to the original init"
    return "the artifact's init.safetensors is damaged: re-compress with --embed-init"


def regenerate_seed_init(config: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``AutoModelForCausalLM.from_config(config)`` under ``torch.manual_seed(seed)``: its state dict."""
    check_seed(seed, "--init-seed")
    model_config = config_from_dict(config)
    if model_config is None:
        raise UsageError(f"cannot regenerate an init for model_type {config.get('model_type')!r}", "config.json",
                         f"pass {flag('--init')} PATH to the init checkpoint instead of {flag('--init-seed')}")
    model = seeded_model(model_config, seed)
    return {name: tensor.detach().to(dtype) for name, tensor in saved_state(model).items()}


def saved_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the names ``save_pretrained`` gives them (transformers' own
    reverse conversion mapping): a reference is looked up by a checkpoint's saved names, and
    transformers 5 saves some under other names than its modules' (GPT-NeoX's ``lm_head`` as
    ``embed_out.weight``). Tied weights stay under every name, sharing their storage."""
    from transformers.core_model_loading import revert_weight_conversion

    state = model.state_dict()
    return dict(revert_weight_conversion(model, dict(state)))


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
        "dtype": dtype_name(dtype), "config": config,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }
    return TensorsReference(tensors, hashes, ReferenceRecord("seed", recipe=recipe, tensors=hashes), f"seed {seed}")


def check_seed_matches(seeded: TensorsReference, init: Checkpoint, seed: int) -> None:
    """``--init-seed N`` together with ``--init PATH``: the regenerated tensors must equal the file's."""
    names = init.names()
    for name in names:
        tensor = init.get(name)
        regenerated = seeded.get(name) if name in seeded.hashes() else None
        if regenerated is None or not torch.equal(regenerated.to(tensor.dtype), tensor):
            raise InitReferenceError(
                f"{flag('--init-seed')} {seed} does not regenerate the init: tensor {name!r} differs", str(init.path),
                f"check the seed, or drop {flag('--init-seed')} to store the init by path")
