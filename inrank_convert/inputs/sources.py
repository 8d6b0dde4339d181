"""Any input form -> a Checkpoint and its Reference (docs/design.md §3).

``checkpoints`` reads raw weight files, ``artifact`` reads and writes the artifact format, and
``reference`` knows the kinds of reference. This module is where they meet: it opens every form
a user can name (artifacts included), rebuilds an artifact's reference from its manifest, and
resolves compress's CKPT + reference options into the pair of checkpoints an update is taken from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from inrank_convert.artifact import Artifact, Manifest, ReferenceRecord, check_reference, is_artifact
from inrank_convert.core.errors import CheckpointError, InitReferenceError, UsageError, flag
from inrank_convert.core.hub import resolve_model
from inrank_convert.inputs.reference import (
    CheckpointReference,
    Reference,
    TensorsReference,
    ZeroReference,
    check_seed_matches,
    seed_reference,
)
from inrank_convert.weights.checkpoints import (
    Checkpoint,
    SafetensorsCheckpoint,
    TensorInfo,
    is_run_folder,
    open_weights,
)
from inrank_convert.weights.run_folder import read_init_recipe, resolve_run, run_steps


def is_run(path: Path) -> bool:
    """A training-run folder: step folders and no model of its own (an artifact is a model)."""
    path = Path(path)
    return is_run_folder(path) and not is_artifact(path)


def open_checkpoint(path: str | Path, init: str | Path | None = None) -> Checkpoint:
    """Open any single-model input form: a Hugging Face folder, a weights file, an artifact (read
    as the dense model it stands for; ``init`` overrides its reference's location), or a hub id in
    the Hugging Face cache (any of those forms)."""
    path = resolve_model(path)
    if path.is_dir() and is_artifact(path):
        return ArtifactCheckpoint(path, Path(init) if init is not None else None)
    return open_weights(path)


def open_artifact(path: str | Path, init: str | Path | None = None, verify: bool = True,
                  fresh: bool = False) -> Artifact:
    """An artifact with its recorded reference, rebuilt on first use (and verified unless ``verify``
    is False; ``fresh``: a path reference's files are read and hashed even when the hash cache
    knows them); ``init`` overrides where a path or seed reference is read from."""
    init_path = Path(init) if init is not None else None

    def load(manifest: Manifest, folder: Path) -> Reference:
        def check_shapes(infos: dict[str, TensorInfo] | None) -> None:
            check_reference(manifest, infos, *_reference_place(manifest.reference, folder, init_path))

        reference = reference_from_record(manifest.reference, folder, init_path, verify, fresh, check_shapes)
        try:
            check_shapes(reference.infos())
        except BaseException:
            reference.close()
            raise
        return reference

    return Artifact(path, reference_loader=load, input_paths=(init_path,) if init_path is not None else ())


def _reference_place(record: ReferenceRecord, folder: Path, init: Path | None) -> tuple[str, str]:
    """(where, how to fix) for a reference that lacks a tensor of its artifact."""
    if init is not None and record.mode in ("reference", "seed"):
        return str(init), f"pass with {flag('--init')} the init this artifact was compressed against"
    if record.mode == "embedded":
        return str(folder / (record.file or "")), "the embedded init is damaged: re-compress with --embed-init"
    if record.mode == "seed":
        return "the regenerated seed init", f"pass the init with {flag('--init')} PATH"
    return record.path or str(folder), f"restore the original init, or pass it with {flag('--init')} PATH"


class ArtifactCheckpoint(Checkpoint):
    """An artifact read as a dense checkpoint (to re-compress it, compare it, or decompress it)."""

    kind = "artifact"

    def __init__(self, path: Path, init: Path | None = None):
        self.artifact = open_artifact(path, init)
        super().__init__(Path(path), [self.artifact.file], Path(path))

    def names(self) -> list[str]:
        return list(self.artifact.tensors)

    def info(self, name: str) -> TensorInfo:
        return self.artifact.info(name)

    def get(self, name: str) -> torch.Tensor:
        return self.artifact.reconstruct(name)

    def shared_storage_groups(self) -> list[list[str]]:
        groups: dict[str, list[str]] = {}
        for alias, canonical in self.artifact.manifest.aliases().items():
            groups.setdefault(canonical, [canonical]).append(alias)
        return list(groups.values())

    def close(self) -> None:
        self.artifact.close()


def reference_from_record(record: ReferenceRecord, artifact_dir: Path, init: Path | None = None,
                          verify: bool = True, fresh: bool = False,
                          check_shapes: Callable[[dict[str, TensorInfo] | None], None] | None = None) -> Reference:
    """Rebuild the reference an artifact was made against, verifying that it is unchanged (a path
    reference's files by their sha256: remembered by the hash cache for files whose stat is
    unchanged, read again when ``fresh``). ``check_shapes``: run on a given ``init``'s tensors before
    its hashes, so that an init lacking a tensor is told so rather than only that it differs."""
    mode = record.mode
    if init is not None and mode in ("reference", "seed"):
        return _given_reference(record, init, verify, fresh, check_shapes)
    if mode == "zero":
        return ZeroReference()
    if mode == "reference":
        path = Path(record.path or "")
        if not record.path or not path.exists():
            raise InitReferenceError("the init reference this artifact was made against is missing", str(path),
                                     f"restore it, pass {flag('--init')} PATH, or re-compress with --embed-init")
        checkpoint = _open_reference_checkpoint(path)
        if not verify:
            return CheckpointReference(checkpoint)
        recorded = {entry.file: entry.sha256 for entry in record.files or []}
        current = checkpoint.file_hashes(fresh)
        changed = [entry.file for entry in current if recorded.get(entry.file) != entry.sha256]
        if changed or len(current) != len(recorded):
            checkpoint.close()
            raise InitReferenceError(
                f"the init reference changed since compression (sha256 mismatch in {', '.join(changed[:3]) or 'file list'})",
                str(path), "restore the original init, or re-compress against the new one")
        return CheckpointReference(checkpoint, current)
    if mode == "seed":
        recipe = record.recipe or {}
        dtype = getattr(torch, recipe.get("dtype", "float32"))
        return seed_reference(recipe["config"], int(recipe["seed"]), dtype, record.tensors if verify else None)
    if mode == "embedded":
        file = artifact_dir / (record.file or "")
        if not record.file or not file.is_file():
            raise InitReferenceError("the artifact's embedded init is missing", str(file),
                                     "re-compress with --embed-init")
        checkpoint = SafetensorsCheckpoint(file, [file], None)
        return TensorsReference(checkpoint, (record.tensors or {}) if verify else {}, record, str(file))
    raise InitReferenceError(f"unknown reference mode {mode!r}", str(artifact_dir),
                             "this artifact may come from a newer inrank-convert: upgrade it")


def _given_reference(record: ReferenceRecord, init: Path, verify: bool, fresh: bool,
                     check_shapes: Callable[[dict[str, TensorInfo] | None], None] | None) -> Reference:
    """``--init PATH`` in place of the recorded reference (moved, or on another machine): it must be
    the same reference. A path reference is compared by the sha256 of its weight files (their names
    may differ: a copy renamed is the same init; the hash cache makes a repeat free); a seed
    reference by its recorded per-tensor hashes, each checked when the tensor is read."""
    checkpoint = _open_reference_checkpoint(init)
    if check_shapes is not None:
        try:
            check_shapes(checkpoint.infos())
        except BaseException:
            checkpoint.close()
            raise
    if not verify:
        return CheckpointReference(checkpoint)
    if record.mode == "seed":
        recipe = record.recipe or {}
        return TensorsReference(checkpoint, record.tensors or {}, record, f"{init} (given for the init of seed "
                                f"{recipe.get('seed')})", given=True)
    try:
        current = checkpoint.file_hashes(fresh)
        recorded = sorted(entry.sha256 for entry in record.files or [])
        if not recorded or sorted(entry.sha256 for entry in current) != recorded:
            raise InitReferenceError(
                f"the init given is not the one this artifact was compressed against (recorded: {record.path}, "
                f"{len(recorded)} file(s) by sha256)", str(init),
                f"pass with {flag('--init')} the init the artifact was made against")
    except BaseException:
        checkpoint.close()
        raise
    return CheckpointReference(checkpoint, current)


def _open_reference_checkpoint(path: Path) -> Checkpoint:
    try:
        return open_checkpoint(path)
    except CheckpointError as err:
        raise InitReferenceError(f"cannot read the init reference: {err.what}", str(path), err.fix) from err


# ----------------------------------------------------------------------------------------------
# compress's inputs: the trained checkpoint and its reference


@dataclass
class Inputs:
    """The trained checkpoint and its reference, resolved from the user's options."""

    trained: Checkpoint
    reference: Reference
    embed_init: bool
    paths: tuple[Path, ...]  # every input path, so outputs never overwrite one
    run_folder: Path | None = None

    def hashed_files(self) -> list[Path]:
        """The weight files whose sha256 the manifest records: the trained checkpoint's and a path
        reference's."""
        files = list(self.trained.files)
        if isinstance(self.reference, CheckpointReference):
            files += self.reference.checkpoint.files
        return files

    def close(self) -> None:
        self.trained.close()
        self.reference.close()


def open_inputs(source: str | Path, init: str | Path | None = None, init_seed: int | None = None,
                no_init: bool = False, embed_init: bool = False) -> Inputs:
    """Resolve CKPT and the reference options into (trained checkpoint, reference).

    A training-run folder's latest step is the trained model and its earliest the init (a
    seed recipe there, written by ``train``, turns it into a seed reference). An artifact is
    measured against its own reference unless told otherwise. Hub ids are read from the Hugging
    Face cache (``hub.resolve_model``).
    """
    if no_init and (init is not None or init_seed is not None):
        raise UsageError(f"{flag('--no-init')} conflicts with {flag('--init')}/{flag('--init-seed')}", None, "pass only one reference option")
    if no_init and embed_init:
        raise UsageError(f"{flag('--embed-init')} has nothing to embed with {flag('--no-init')}", None, "drop one of the two options")
    source = resolve_model(source)
    init = resolve_model(init) if init is not None else None
    explicit = init is not None or init_seed is not None or no_init
    run_folder = None
    default_init: Path | None = None
    if is_run(source):
        run_folder = source
        steps = run_steps(source)
        if not explicit:
            default_init, _ = resolve_run(source)
        trained = open_checkpoint(steps[-1][1])
    else:
        trained = open_checkpoint(source)
    paths = [source] + ([Path(init)] if init is not None else [])
    if isinstance(trained, ArtifactCheckpoint):
        paths.extend(trained.artifact.input_paths())
    try:
        reference = _open_reference(trained, init, init_seed, no_init, default_init)
    except BaseException:
        trained.close()
        raise
    if reference is None:
        trained.close()
        raise UsageError("no reference given for the update", str(source),
                         f"pass {flag('--init')} PATH (init or base model), {flag('--init-seed')} N, or {flag('--no-init')} to factorize the weights")
    embed_init = embed_init or reference.mode == "embedded"
    if isinstance(reference, CheckpointReference):
        paths.append(Path(reference.checkpoint.path))
    return Inputs(trained, reference, embed_init, tuple(paths), run_folder)


def _open_reference(trained: Checkpoint, init: str | Path | None, init_seed: int | None, no_init: bool,
                    default_init: Path | None) -> Reference | None:
    if no_init:
        return ZeroReference()
    init_path = Path(init) if init is not None else default_init
    if init_path is None and init_seed is None:
        # Re-compressing an artifact: measure against the reference it was made with.
        return trained.artifact.reference if isinstance(trained, ArtifactCheckpoint) else None
    init_checkpoint = open_checkpoint(init_path) if init_path is not None else None
    seed = init_seed
    if seed is None and init is None and default_init is not None:
        seed = read_init_recipe(default_init)
    if seed is None:
        return CheckpointReference(init_checkpoint)
    config = trained.config() or (init_checkpoint.config() if init_checkpoint is not None else None)
    if config is None:
        raise UsageError(f"{flag('--init-seed')} needs the model's config.json beside the checkpoint", str(trained.path),
                         f"put config.json next to the weights, or pass {flag('--init')} PATH")
    if init_checkpoint is None:
        return seed_reference(config, seed)
    with init_checkpoint:
        reference = seed_reference(config, seed, _float_dtype(init_checkpoint))
        check_seed_matches(reference, init_checkpoint, seed)
    return reference


def _float_dtype(checkpoint: Checkpoint) -> torch.dtype:
    for info in checkpoint.infos().values():
        if info.dtype.is_floating_point:
            return info.dtype
    return torch.float32
