"""The manifest: the JSON in the artifact file's safetensors header (key ``inrank``), typed.

Every key of the on-disk format is named here and nowhere else: other modules build and read
manifests through these dataclasses. ``Manifest.from_json`` validates (a newer format version,
or a damaged manifest, is one ArtifactError); ``to_json`` writes the version-1 layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, get_args

import torch

from ..checkpoints import FileHash
from ..errors import ArtifactError
from ..tensors import dtype_from_name, dtype_name, numel
from ..version import __version__

ARTIFACT_FILE = "inrank.safetensors"
INIT_FILE = "init.safetensors"
FORMAT_NAME = "inrank-convert"
FORMAT_VERSION = 2  # what this writer writes; readers take every version up to it (1: no rows, no int8)
MANIFEST_KEY = "inrank"
FACTOR_B = ".lora_B"  # [rows, r]
FACTOR_A = ".lora_A"  # [r, cols]
FACTOR_SCALE = ".lora_scale"  # [r] float32, int8 storage: component j is scale[j] * B[:, j] A[j, :]
ROWS = ".rows"  # [K, cols]: the update's residual on K whole rows (kind lowrank+rows)
ROW_INDEX = ".row_index"  # [K] int64, distinct, in [0, rows)
ROWS_SCALE = ".rows_scale"  # [K] float32, int8 storage: row k is scale[k] * rows[k]

# How a tensor is stored: B @ A on top of the reference; B @ A plus K exact rows (an update
# concentrated in rows: embeddings); whole; not at all (equal to the reference); or as a second
# name of another tensor (tied weights).
TensorKind = Literal["lowrank", "lowrank+rows", "dense", "zero", "alias"]
# The precision of stored factors and rows (dense tensors keep their source dtype).
Storage = Literal["float64", "float32", "float16", "bfloat16", "int8"]
# What the update is measured against: a checkpoint by path and hash, a seed recipe, the init
# stored beside the factors, or nothing.
ReferenceMode = Literal["reference", "seed", "embedded", "zero"]
TENSOR_KINDS: tuple[str, ...] = get_args(TensorKind)
REFERENCE_MODES: tuple[str, ...] = get_args(ReferenceMode)
STORAGES: tuple[str, ...] = get_args(Storage)


def factor_names(name: str) -> tuple[str, str]:
    """Stored names of the two factors of tensor ``name``: (B, A)."""
    return name + FACTOR_B, name + FACTOR_A


def row_names(name: str) -> tuple[str, str]:
    """Stored names of the rows of tensor ``name``: (rows, row_index)."""
    return name + ROWS, name + ROW_INDEX


def parse_dtype(name: str) -> torch.dtype:
    """A manifest's dtype name; an unknown one means a damaged manifest."""
    dtype = dtype_from_name(name)
    if dtype is None:
        raise ArtifactError(f"unknown dtype {name!r} in manifest", None, "the artifact may be corrupt")
    return dtype


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


@dataclass
class TensorEntry:
    """What the artifact holds for one tensor of the source checkpoint."""

    kind: TensorKind
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the source tensor (the reconstruction is cast back to it)
    rank: int | None = None
    energy: float = 1.0  # fraction of the update's squared Frobenius norm kept
    bytes: int = 0  # stored bytes
    original_bytes: int = 0  # dense bytes of the source tensor
    svd: str | None = None  # the engine that factorized it
    of: str | None = None  # the canonical name of an alias
    # Version 2 (absent in version 1, where factors are stored in the entry's own float dtype):
    rows: int | None = None  # K, the stored rows of a lowrank+rows tensor
    storage: Storage | None = None  # precision of the stored factors and rows
    error: float | None = None  # ||delta - stored||_F / ||delta||_F, storage rounding included
    reference_rows: int | None = None  # a reference with fewer rows (a grown vocabulary): they are its rows

    @property
    def is_alias(self) -> bool:
        return self.kind == "alias"

    @property
    def has_factors(self) -> bool:
        return self.kind in ("lowrank", "lowrank+rows")

    @property
    def uses_reference(self) -> bool:
        """Whether rebuilding the tensor needs the reference (lowrank, rows and zero are updates to it)."""
        return self.kind in ("lowrank", "lowrank+rows", "zero")

    @property
    def expected_error(self) -> float:
        """The relative error ||delta - stored|| / ||delta|| this entry promises: the recorded one
        (rounding included), else the truncation's, implied by the recorded energy (version 1)."""
        if self.error is not None:
            return self.error
        return max(0.0, 1.0 - self.energy) ** 0.5 if self.has_factors else 0.0

    def stored_names(self, name: str) -> tuple[str, ...]:
        """Every tensor the artifact file must hold for this entry."""
        if self.kind == "dense":
            return (name,)
        if not self.has_factors:
            return ()
        names = factor_names(name) + ((name + FACTOR_SCALE,) if self.storage == "int8" else ())
        if self.kind == "lowrank+rows":
            names += row_names(name) + ((name + ROWS_SCALE,) if self.storage == "int8" else ())
        return names

    def to_json(self) -> dict[str, Any]:
        if self.kind == "alias":
            return {"kind": "alias", "of": self.of, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}
        values = {"kind": self.kind, "shape": list(self.shape), "dtype": dtype_name(self.dtype), "rank": self.rank,
                  "energy": round(self.energy, 8), "bytes": self.bytes, "original_bytes": self.original_bytes,
                  "svd": self.svd}
        return values | _drop_none({"rows": self.rows, "storage": self.storage,
                                    "error": None if self.error is None else round(self.error, 8),
                                    "reference_rows": self.reference_rows})

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TensorEntry:
        kind = values["kind"]
        if kind not in TENSOR_KINDS:
            raise ValueError(f"unknown tensor kind {kind!r}")
        shape = tuple(int(size) for size in values["shape"])
        if kind == "alias":
            return cls("alias", shape, parse_dtype(values["dtype"]), of=str(values["of"]))
        rank, rows, error, reference_rows = (values.get(key) for key in ("rank", "rows", "error", "reference_rows"))
        storage = values.get("storage")
        if storage is not None and storage not in STORAGES:
            raise ValueError(f"unknown storage {storage!r}")
        if kind == "lowrank+rows" and rows is None:
            raise ValueError("a lowrank+rows entry without its row count")
        return cls(kind, shape, parse_dtype(values["dtype"]), None if rank is None else int(rank),
                   float(values.get("energy", 1.0)), int(values.get("bytes", 0)),
                   int(values.get("original_bytes", 0)), values.get("svd"), None,
                   None if rows is None else int(rows), storage, None if error is None else float(error),
                   None if reference_rows is None else int(reference_rows))


@dataclass
class SourceRecord:
    """The trained checkpoint an artifact was made from."""

    path: str
    kind: str  # the checkpoint form ("safetensors", "state-dict", "artifact") or "training"
    run: str | None = None  # the run folder it was the latest step of
    files: list[FileHash] = field(default_factory=list)

    @property
    def is_training(self) -> bool:
        """A training checkpoint: its own original, there is no dense source to compare."""
        return self.kind == "training"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "run": self.run, "files": [f.to_json() for f in self.files]}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> SourceRecord:
        return cls(str(values["path"]), str(values.get("kind", "checkpoint")), values.get("run"),
                   [FileHash.from_json(item) for item in values.get("files", [])])


@dataclass
class ReferenceRecord:
    """How to rebuild and verify the reference: each mode uses its own fields.

    - ``reference``: ``path`` of the init/base checkpoint and the ``files`` hashes;
    - ``seed``: the ``recipe`` (library, class, seed, dtype, config, versions) and per-tensor ``tensors`` hashes;
    - ``embedded``: ``file`` inside the artifact, per-tensor ``tensors`` hashes, and the ``source`` it was taken from;
    - ``zero``: nothing.
    """

    mode: ReferenceMode
    path: str | None = None
    files: list[FileHash] | None = None
    recipe: dict[str, Any] | None = None
    tensors: dict[str, str] | None = None  # name -> sha256_tensor
    file: str | None = None
    source: ReferenceRecord | None = None

    def to_json(self) -> dict[str, Any]:
        return _drop_none({
            "mode": self.mode, "path": self.path,
            "files": None if self.files is None else [f.to_json() for f in self.files],
            "recipe": self.recipe, "file": self.file, "tensors": self.tensors,
            "source": None if self.source is None else self.source.to_json()})

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> ReferenceRecord:
        mode = values["mode"]
        files = values.get("files")
        source = values.get("source")
        tensors = values.get("tensors")
        return cls(mode, values.get("path"), None if files is None else [FileHash.from_json(f) for f in files],
                   values.get("recipe"), None if tensors is None else dict(tensors), values.get("file"),
                   None if source is None else cls.from_json(source))


@dataclass
class RuleRecord:
    """The rank rule the factors were chosen by.

    A global size budget (compress --target-ratio / --target-size) is criterion ``budget`` with
    ``threshold`` the target as a fraction of ``original_bytes`` and ``target_bytes`` the byte
    target; the ranks were allocated across tensors (absent before it existed: optional)."""

    criterion: str
    threshold: float
    rank: int | None = None
    target_bytes: int | None = None

    def describe(self) -> str:
        if self.target_bytes is not None:
            return f"budget<={self.target_bytes} bytes ({self.threshold:.4g} of dense)"
        return f"rank={self.rank}" if self.rank is not None else f"{self.criterion}>={self.threshold:g}"

    def to_json(self) -> dict[str, Any]:
        values = {"criterion": self.criterion, "threshold": self.threshold, "rank": self.rank}
        return values | _drop_none({"target_bytes": self.target_bytes})

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RuleRecord:
        rank, target = values.get("rank"), values.get("target_bytes")
        return cls(str(values["criterion"]), float(values["threshold"]), None if rank is None else int(rank),
                   None if target is None else int(target))


@dataclass
class TrainingRecord:
    """A training checkpoint's place in its run."""

    step: int
    mode: str

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "mode": self.mode}


@dataclass
class Manifest:
    """The JSON in the safetensors header (key ``inrank``): everything a reader needs to rebuild the model."""

    source: SourceRecord
    reference: ReferenceRecord
    rule: RuleRecord
    tensors: dict[str, TensorEntry]  # in the source's tensor order
    original_bytes: int  # dense bytes of the source tensors (tied ones once)
    checksums: dict[str, str] = field(default_factory=dict)  # stored name -> sha256 of its bytes
    version: int = FORMAT_VERSION
    tool_version: str = __version__
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    # How compress made it (absent in training checkpoints).
    svd: dict[str, Any] | None = None
    factor_dtype: str | None = None
    embeddings: bool | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    training: TrainingRecord | None = None
    # compress --calibrate: the text the layers' input Grams came from (text_sha256, tokens, window,
    # windows, layers, damping); the factors of "whitened" entries minimize the output error on it.
    calibration: dict[str, Any] | None = None
    # compress --max-perplexity-increase: the target, the eval text (sha256, tokens), the dense and
    # the artifact's measured perplexity, the budget chosen and the search's steps.
    perplexity_target: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer minor writer, kept as they are

    def canonical(self, name: str) -> str:
        """The name whose data an alias shares (the name itself otherwise)."""
        entry = self.tensors[name]
        return entry.of if entry.is_alias and entry.of is not None else name

    def stored_entries(self) -> dict[str, TensorEntry]:
        """Every tensor but the aliases."""
        return {name: entry for name, entry in self.tensors.items() if not entry.is_alias}

    def aliases(self) -> dict[str, str]:
        """alias -> canonical name."""
        return {name: entry.of for name, entry in self.tensors.items() if entry.is_alias and entry.of is not None}

    def stored_parameters(self) -> int:
        """Numbers the artifact stores: dense tensors whole, factorized ones as r * (rows + cols),
        plus K * cols for stored rows (indices and scales not counted)."""
        total = 0
        for entry in self.stored_entries().values():
            if entry.kind == "dense":
                total += numel(entry.shape)
            elif entry.has_factors:
                total += (entry.rank or 0) * (entry.shape[0] + entry.shape[-1]) + (entry.rows or 0) * entry.shape[-1]
        return total

    def to_json(self) -> dict[str, Any]:
        made_by_compress = {"svd": self.svd, "factor_dtype": self.factor_dtype, "embeddings": self.embeddings,
                            "include": self.include, "exclude": self.exclude} if self.svd is not None else {}
        training = {"training": self.training.to_json()} if self.training is not None else {}
        optional = {key: value for key, value in (("calibration", self.calibration),
                                                  ("perplexity_target", self.perplexity_target)) if value is not None}
        return {"format": FORMAT_NAME, "version": self.version, "tool_version": self.tool_version,
                "created": self.created, "source": self.source.to_json(), "reference": self.reference.to_json(),
                "rule": self.rule.to_json(), **made_by_compress, **training, **optional, **self.extra,
                "original_bytes": self.original_bytes,
                "tensors": {name: entry.to_json() for name, entry in self.tensors.items()},
                "checksums": dict(self.checksums)}

    @classmethod
    def from_json(cls, values: Any, where: str = "manifest") -> Manifest:
        """Parse and validate; a newer format version or a damaged manifest is an ArtifactError."""
        if not isinstance(values, dict) or values.get("format") != FORMAT_NAME:
            raise ArtifactError("not an inrank-convert manifest", where, "re-run compress")
        version = values.get("version")
        if not isinstance(version, int):
            raise ArtifactError("manifest has no format version", where, "re-run compress")
        if version > FORMAT_VERSION:
            raise ArtifactError(
                f"artifact format version {version} is newer than this inrank-convert reads (version {FORMAT_VERSION})",
                where, "upgrade: pip install -U inrank-convert")
        known = {"format", "version", "tool_version", "created", "source", "reference", "rule", "svd",
                 "factor_dtype", "embeddings", "include", "exclude", "training", "original_bytes", "tensors",
                 "checksums", "calibration", "perplexity_target"}
        try:
            reference = ReferenceRecord.from_json(values["reference"])
            if reference.mode not in REFERENCE_MODES:
                raise ArtifactError(f"unknown reference mode {reference.mode!r}", where,
                                    "this artifact may come from a newer inrank-convert: upgrade it")
            training = values.get("training")
            return cls(
                source=SourceRecord.from_json(values["source"]), reference=reference,
                rule=RuleRecord.from_json(values["rule"]),
                tensors={str(name): TensorEntry.from_json(entry) for name, entry in values["tensors"].items()},
                original_bytes=int(values["original_bytes"]), checksums=dict(values.get("checksums", {})),
                version=version, tool_version=str(values.get("tool_version", "")), created=str(values.get("created", "")),
                svd=values.get("svd"), factor_dtype=values.get("factor_dtype"), embeddings=values.get("embeddings"),
                include=values.get("include"), exclude=values.get("exclude"),
                training=None if training is None else TrainingRecord(int(training["step"]), str(training["mode"])),
                calibration=_optional_dict(values, "calibration"),
                perplexity_target=_optional_dict(values, "perplexity_target"),
                extra={key: value for key, value in values.items() if key not in known})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ArtifactError(f"corrupt manifest ({type(err).__name__}: {err})", where, "re-run compress") from err
        except ArtifactError as err:
            if err.where is not None:
                raise
            raise ArtifactError(err.what, where, err.fix) from err  # name the file (parse_dtype cannot)


def _optional_dict(values: dict[str, Any], key: str) -> dict[str, Any] | None:
    found = values.get(key)
    if found is not None and not isinstance(found, dict):
        raise TypeError(f"{key} is a {type(found).__name__}, not an object")
    return None if found is None else dict(found)
