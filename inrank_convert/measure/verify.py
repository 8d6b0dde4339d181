"""Check an artifact: stored tensors against their checksums, their structure (row indices, int8
scales, finite values) against what the manifest says, the tensors against the model config.json
describes, the reference against its recorded hashes, and each layer's reconstruction error
against the source checkpoint.

Opening the artifact already checked the manifest against the file's header (every entry's
tensors there, at the shapes and dtypes it implies; ``artifact.reader``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inrank_convert.artifact import Artifact
from inrank_convert.core.errors import ArtifactError, InrankError, MismatchError
from inrank_convert.core.hub import resolve_model
from inrank_convert.core.tensors import checksum
from inrank_convert.inputs.sources import open_artifact, open_checkpoint
from inrank_convert.runtime.modeling import check_fits_config


@dataclass
class LayerCheck:
    name: str
    kind: str
    rank: int | None
    expected_error: float | None  # the recorded error of what is stored (format 1: sqrt(1 - energy))
    measured_error: float | None  # ||W - W_hat||_F / ||W - W_ref||_F against the source
    # What rounding the rebuilt weight to its dtype added, relative to the same update:
    # ||W_hat32 - dtype(W_hat32)||_F / ||W - W_ref||_F, W_hat32 the float32 sum W_ref + B @ A. At most
    # 2^-8 (bfloat16) or 2^-11 (float16) of each element of the weight, so it matters when the update
    # is small against the weight in a 16-bit model; 0 for float32 and dense-stored tensors.
    rounding_error: float = 0.0

    def within_expected(self) -> bool:
        """measured <= expected + rounding holds for an intact artifact by the triangle inequality:
        W - bf16(W_hat32) = (W - W_hat32) + (W_hat32 - bf16(W_hat32)); the first is at most the
        recorded error, the second is the rounding, measured. An error that is not finite (factors
        whose product overflows the dtype) never holds, whatever the bound."""
        measured = [value for value in (self.measured_error, self.expected_error, self.rounding_error)
                    if value is not None]
        if not all(math.isfinite(value) for value in measured):
            return False
        return (self.measured_error is None or self.expected_error is None
                or self.measured_error <= (self.expected_error + self.rounding_error) * 1.01 + 1e-3)

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "rank": self.rank, "expected_error": self.expected_error,
                "rounding_error": self.rounding_error, "measured_error": self.measured_error}


@dataclass
class VerifyResult:
    path: Path
    checksums_ok: bool
    bad_checksums: list[str]
    reference_ok: bool
    reference_message: str
    source_checked: bool
    source_message: str
    layers: list[LayerCheck] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # stored tensors that do not fit their entry
    model_checked: bool = False  # whether config.json was there to build the model from
    model_ok: bool = True  # the tensors are the model config.json describes (or there is no config.json)
    model_message: str = ""
    source_given: bool = False  # --source named the checkpoint (rather than the recorded one)

    @property
    def ok(self) -> bool:
        return not self.problem()

    def problem(self) -> str:
        """The first reason verification failed, in one line ("" when it passed)."""
        if not self.checksums_ok:
            return (f"checksum mismatch in {', '.join(self.bad_checksums[:3])} "
                    "(the artifact file is damaged: re-run compress)")
        if self.damaged:
            return self.damaged[0]
        if not self.model_ok:
            return self.model_message
        if not self.reference_ok:
            return self.reference_message
        worse = [layer.name for layer in self.layers if not layer.within_expected()]
        if worse:
            # Checksums, structure and reference hold, so the stored factors are what the file says.
            # Against a checkpoint the user named, the likeliest cause is the wrong checkpoint; against
            # the recorded one (its hashes unchanged) the factors were written wrong: compress again.
            fix = ("is --source the checkpoint this artifact was compressed from?" if self.source_given
                   else "the stored factors do not reproduce the checkpoint they were made from: re-run compress")
            return (f"reconstruction error above the recorded error (plus the rounding of its dtype) in "
                    f"{', '.join(worse[:3])} ({fix})")
        return ""

    def to_json(self) -> dict:
        return {"path": str(self.path), "ok": self.ok, "checksums_ok": self.checksums_ok,
                "bad_checksums": self.bad_checksums, "damaged": self.damaged, "reference_ok": self.reference_ok,
                "reference": self.reference_message, "model_checked": self.model_checked, "model_ok": self.model_ok,
                "model": self.model_message, "source_checked": self.source_checked,
                "source": self.source_message, "layers": [layer.to_json() for layer in self.layers]}


def verify_artifact(path: str | Path, init: str | Path | None = None,
                    source: str | Path | None = None) -> VerifyResult:
    # verify is the command whose job is to check: every hash is computed from the bytes on disk,
    # never taken from the hash cache.
    artifact = open_artifact(path, init, fresh=True)
    try:
        bad = [name for name, expected in artifact.manifest.checksums.items()
               if checksum(artifact.stored(name)) != expected]
        damaged = [] if bad else _check_structure(artifact)
        model_checked, model_ok, model_message = _check_model(artifact)
        try:
            reference = artifact.reference
            for name, entry in artifact.tensors.items():
                if entry.uses_reference:
                    reference.get(name)  # embedded and seed references check per-tensor hashes here
            reference_ok, reference_message = True, f"{artifact.manifest.reference.mode}: hashes match"
        except InrankError as err:
            reference_ok, reference_message = False, err.message
        if reference_ok and not bad and not damaged:
            damaged = _check_overflow(artifact)
        result = VerifyResult(Path(path), not bad, bad, reference_ok, reference_message, False, "", damaged=damaged,
                              model_checked=model_checked, model_ok=model_ok, model_message=model_message,
                              source_given=source is not None)
        if reference_ok and not bad and not damaged and model_ok:
            _check_against_source(artifact, source, result)
        return result
    finally:
        artifact.close()


def _check_structure(artifact: Artifact) -> list[str]:
    """Problems with stored tensors whose checksums match but which cannot be read as their entry
    says (a row index out of range or repeated, an int8 scale of the wrong length, NaN or Inf): a
    file written wrong, which checksums alone do not catch. The reader's own checks (the ones every
    load runs), one message per tensor."""
    problems = []
    for name, entry in artifact.manifest.stored_entries().items():
        try:
            if entry.has_factors:
                artifact.factors(name)
            if entry.kind == "lowrank+rows":
                artifact.rows(name)
            if entry.kind == "dense":
                artifact.dense(name)
        except ArtifactError as err:
            problems.append(err.message)
    return problems


def _check_overflow(artifact: Artifact) -> list[str]:
    """Finite factors whose product overflows the tensor's dtype, found without the source."""
    problems = []
    for name in artifact.manifest.stored_entries():
        try:
            artifact.check_overflow(name)
        except ArtifactError as err:
            problems.append(err.message)
    return problems


def _check_model(artifact: Artifact) -> tuple[bool, bool, str]:
    """(checked, ok, message): the tensors against the model config.json describes (names, shapes,
    nothing the model needs missing), on the meta device. An artifact without config.json (made
    from a bare weights file) is not a failure here; decompress refuses it."""
    if not (artifact.path / "config.json").is_file():
        return False, True, "no config.json: tensors not checked against a model"
    try:
        check_fits_config(artifact)
    except ArtifactError as err:
        return True, False, err.message
    return True, True, "config.json describes every tensor"


def _padded(base: torch.Tensor, rows: int) -> torch.Tensor:
    """A grown vocabulary's reference with zero rows for the rows it does not have: what the
    update of the new rows is measured against (they are their own update)."""
    padded = torch.zeros((rows, *base.shape[1:]), dtype=torch.float32)
    padded[:base.shape[0]] = base
    return padded


def _check_against_source(artifact: Artifact, source: str | Path | None, result: VerifyResult) -> None:
    recorded = artifact.manifest.source
    source_path = resolve_model(source) if source is not None else Path(recorded.path)
    if not source_path.exists():
        result.source_message = f"source checkpoint not found at {source_path}: reconstruction not measured"
        return
    with open_checkpoint(source_path) as checkpoint:
        if source is None:
            current = {entry.sha256 for entry in checkpoint.file_hashes(fresh=True)}
            if current != {entry.sha256 for entry in recorded.files}:
                result.source_message = f"source checkpoint at {source_path} changed since compression: not measured"
                return
        reference = artifact.reference
        infos = checkpoint.infos()
        for name, entry in artifact.manifest.stored_entries().items():
            if name not in infos:
                raise MismatchError(f"the source lacks tensor {name!r} of the artifact", str(source_path),
                                    "pass the checkpoint the artifact was compressed from with --source")
            trained = checkpoint.get(name).float()
            if tuple(trained.shape) != entry.shape:
                raise MismatchError(f"tensor {name!r} of the source has shape {list(trained.shape)}, the artifact's "
                                    f"{list(entry.shape)}", str(source_path),
                                    "pass the checkpoint the artifact was compressed from with --source")
            base = reference.get(name) if entry.uses_reference else None
            if base is not None and base.shape[0] < trained.shape[0]:
                base = _padded(base.float(), trained.shape[0])  # a grown vocabulary
            update = trained - base.float() if base is not None else trained
            # W_hat32 = W_ref + B @ A in float32 (what the recorded error is of), then rounded to the
            # tensor's dtype as decompress writes it: the rounding is measured, not estimated.
            exact = artifact.reconstruct(name, dtype=torch.float32)
            rebuilt = exact.to(entry.dtype).float()
            error = float(torch.linalg.vector_norm(trained - rebuilt))
            rounding = float(torch.linalg.vector_norm(exact - rebuilt))
            norm = float(torch.linalg.vector_norm(update))
            if norm > 0:  # relative to the update; absolute when there is no update
                error, rounding = error / norm, rounding / norm
            result.layers.append(LayerCheck(name, entry.kind, entry.rank, entry.expected_error, error, rounding))
        result.source_checked = True
        result.source_message = f"measured against {source_path}"
