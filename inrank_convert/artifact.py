"""The artifact on disk (format version 1, DESIGN §3): the typed manifest, the one writer, the reader.

Layout of an artifact folder ``OUT/``::

    inrank.safetensors   factors (``name.lora_B`` [rows, r], ``name.lora_A`` [r, cols]) and
                         dense-stored tensors; header metadata key ``inrank`` = JSON manifest
    init.safetensors     the reference tensors, only with --embed-init
    config.json, generation_config.json, tokenizer files: copied from the source

This is the only module that knows file names, tensor-name suffixes and manifest keys: every
other module builds and reads the manifest through ``Manifest`` / ``TensorEntry`` and writes
artifacts through ``ArtifactWriter``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

import torch

from .checkpoints import (
    FileHash,
    SafetensorsCheckpoint,
    TensorInfo,
    copy_side_files,
    open_safetensors,
)
from .errors import ArtifactError, CheckpointError, OutputError
from .tensors import SAFETENSORS_CODES, checksum, dtype_from_name, dtype_name, numel, sha256_tensor
from .version import __version__

ARTIFACT_FILE = "inrank.safetensors"
INIT_FILE = "init.safetensors"
FORMAT_NAME = "inrank-convert"
FORMAT_VERSION = 1
MANIFEST_KEY = "inrank"
FACTOR_B = ".lora_B"  # [rows, r]
FACTOR_A = ".lora_A"  # [r, cols]
_TMP_PREFIX = ".inrank-tmp-"

# How a tensor is stored: B @ A on top of the reference, whole, not at all (equal to the
# reference), or as a second name of another tensor (tied weights).
TensorKind = Literal["lowrank", "dense", "zero", "alias"]
# What the update is measured against: a checkpoint by path and hash, a seed recipe, the init
# stored beside the factors, or nothing.
ReferenceMode = Literal["reference", "seed", "embedded", "zero"]
TENSOR_KINDS: tuple[str, ...] = get_args(TensorKind)
REFERENCE_MODES: tuple[str, ...] = get_args(ReferenceMode)


def factor_names(name: str) -> tuple[str, str]:
    """Stored names of the two factors of tensor ``name``: (B, A)."""
    return name + FACTOR_B, name + FACTOR_A


def parse_dtype(name: str) -> torch.dtype:
    """A manifest's dtype name; an unknown one means a damaged manifest."""
    dtype = dtype_from_name(name)
    if dtype is None:
        raise ArtifactError(f"unknown dtype {name!r} in manifest", None, "the artifact may be corrupt")
    return dtype


# ----------------------------------------------------------------------------------------------
# The manifest, typed


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

    @property
    def is_alias(self) -> bool:
        return self.kind == "alias"

    @property
    def uses_reference(self) -> bool:
        """Whether rebuilding the tensor needs the reference (lowrank and zero are updates to it)."""
        return self.kind in ("lowrank", "zero")

    @property
    def expected_error(self) -> float:
        """The truncation's relative error ||delta - B A|| / ||delta|| implied by the recorded energy."""
        return max(0.0, 1.0 - self.energy) ** 0.5 if self.kind == "lowrank" else 0.0

    def to_json(self) -> dict[str, Any]:
        if self.kind == "alias":
            return {"kind": "alias", "of": self.of, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}
        return {"kind": self.kind, "shape": list(self.shape), "dtype": dtype_name(self.dtype), "rank": self.rank,
                "energy": round(self.energy, 8), "bytes": self.bytes, "original_bytes": self.original_bytes,
                "svd": self.svd}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TensorEntry:
        kind = values["kind"]
        if kind not in TENSOR_KINDS:
            raise ValueError(f"unknown tensor kind {kind!r}")
        shape = tuple(int(size) for size in values["shape"])
        if kind == "alias":
            return cls("alias", shape, parse_dtype(values["dtype"]), of=str(values["of"]))
        rank = values.get("rank")
        return cls(kind, shape, parse_dtype(values["dtype"]), None if rank is None else int(rank),
                   float(values.get("energy", 1.0)), int(values.get("bytes", 0)),
                   int(values.get("original_bytes", 0)), values.get("svd"))


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
    """The rank rule the factors were chosen by."""

    criterion: str
    threshold: float
    rank: int | None = None

    def describe(self) -> str:
        return f"rank={self.rank}" if self.rank is not None else f"{self.criterion}>={self.threshold:g}"

    def to_json(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "threshold": self.threshold, "rank": self.rank}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> RuleRecord:
        rank = values.get("rank")
        return cls(str(values["criterion"]), float(values["threshold"]), None if rank is None else int(rank))


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
        """Numbers the artifact stores: dense tensors whole, factorized ones as r * (rows + cols)."""
        total = 0
        for entry in self.stored_entries().values():
            if entry.kind == "dense":
                total += numel(entry.shape)
            elif entry.kind == "lowrank":
                total += (entry.rank or 0) * (entry.shape[0] + entry.shape[-1]) if len(entry.shape) == 2 \
                    else numel(entry.shape)
        return total

    def to_json(self) -> dict[str, Any]:
        made_by_compress = {"svd": self.svd, "factor_dtype": self.factor_dtype, "embeddings": self.embeddings,
                            "include": self.include, "exclude": self.exclude} if self.svd is not None else {}
        training = {"training": self.training.to_json()} if self.training is not None else {}
        return {"format": FORMAT_NAME, "version": self.version, "tool_version": self.tool_version,
                "created": self.created, "source": self.source.to_json(), "reference": self.reference.to_json(),
                "rule": self.rule.to_json(), **made_by_compress, **training, **self.extra,
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
                 "checksums"}
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
                extra={key: value for key, value in values.items() if key not in known})
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ArtifactError(f"corrupt manifest ({type(err).__name__}: {err})", where, "re-run compress") from err


# ----------------------------------------------------------------------------------------------
# Writing


class TensorFileWriter:
    """Writes a safetensors file one tensor at a time, never holding more than one in memory.

    The safetensors header (with every offset) comes first in the file but is known only at the
    end, so tensor bytes are spooled to a side file and copied behind the header in ``finish``.
    Used as a context manager it aborts (removes its spool) when the block raises.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._spool_path = self.path.with_name(self.path.name + ".spool")
        self._spool = open(self._spool_path, "wb")
        self._header: dict[str, dict] = {}
        self._offset = 0
        self.checksums: dict[str, str] = {}

    def __enter__(self) -> TensorFileWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor) -> int:
        """Append one tensor; returns its size in bytes."""
        if name in self._header:
            raise ValueError(f"tensor {name!r} written twice")
        tensor = tensor.detach().contiguous().cpu()
        code = SAFETENSORS_CODES.get(tensor.dtype)
        if code is None:
            raise ArtifactError(f"cannot store dtype {tensor.dtype} (tensor {name!r})", None,
                                "store it as float32, float16 or bfloat16")
        data = tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b""
        self._spool.write(data)
        size = tensor.numel() * tensor.element_size()
        self._header[name] = {"dtype": code, "shape": list(tensor.shape),
                              "data_offsets": [self._offset, self._offset + size]}
        self._offset += size
        self.checksums[name] = checksum(tensor)
        return size

    def finish(self, metadata: dict[str, str] | None = None) -> int:
        """Write header + data to ``path``; returns the file size."""
        self._spool.close()
        header = {"__metadata__": metadata or {"format": "pt"}, **self._header}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data section to 8 bytes
        with open(self.path, "wb") as out, open(self._spool_path, "rb") as spool:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            shutil.copyfileobj(spool, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        self._spool_path.unlink()
        return self.path.stat().st_size

    def abort(self) -> None:
        self._spool.close()
        self._spool_path.unlink(missing_ok=True)


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_free(output: Path, force: bool) -> None:
    """Refuse an existing output unless --force (and never a file where a folder goes)."""
    if output.exists() and not force:
        raise OutputError("output exists already", str(output), "pass --force to replace it, or choose another -o")
    if output.exists() and not output.is_dir():
        raise OutputError("output exists and is not a folder", str(output), "choose another -o")


@contextmanager
def atomic_output_dir(output: Path, force: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``output``; rename it into place only if the block succeeds.

    A crash or SIGKILL leaves at most a hidden ``.inrank-tmp-*`` folder, never a half-written
    ``output``. ``force`` replaces an existing output, but never one that is or holds an input.
    """
    output = Path(output).absolute()
    for source in inputs:
        source = Path(source).absolute()
        if _is_within(source, output):  # replacing output would delete or change this input
            raise OutputError("the output would overwrite an input", str(output), "choose another -o folder")
    check_output_free(output, force)
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(parent, output.name)
        temp = parent / f"{_TMP_PREFIX}{output.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temp.mkdir()
    except OSError as err:
        raise OutputError(f"cannot write the output folder ({err.strerror})", str(parent),
                          "choose a writable -o location") from err
    try:
        yield temp
        if output.exists():
            trash = parent / f"{_TMP_PREFIX}{output.name}-old-{uuid.uuid4().hex[:8]}"
            output.rename(trash)
            temp.rename(output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            temp.rename(output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _remove_stale_temps(parent: Path, name: str) -> None:
    """Temp folders of earlier runs for the same output whose process is gone (killed midway)."""
    for stale in parent.glob(f"{_TMP_PREFIX}{name}-*"):
        pid_part = stale.name[len(_TMP_PREFIX) + len(name) + 1:].split("-", 1)[0]
        if pid_part.isdigit() and not _process_alive(int(pid_part)):
            shutil.rmtree(stale, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # an embedded init never changes: checkpoints of a run share it
    except OSError:
        shutil.copyfile(source, target)


class ArtifactWriter:
    """The one way an artifact is written: ``compress`` and training checkpoints both use it.

        with ArtifactWriter(OUT, force=..., inputs=...) as writer:
            writer.add_lowrank(name, B, A, ...)      # or add_dense / add_zero / add_alias
            writer.add_reference_tensor(name, W_ref)  # with --embed-init
            writer.finish(source=..., reference=..., rule=..., original_bytes=...)

    Everything goes into a temporary folder (``writer.folder``, where callers may add files of
    their own: side files, training state) renamed into place when the block ends without an
    exception; an exception, or a block that never called ``finish``, leaves no output at all.
    """

    def __init__(self, output: str | Path, *, force: bool = False, inputs: tuple[Path, ...] = (),
                 embed_reference: bool = False):
        self.output = Path(output)
        self._force = force
        self._inputs = inputs
        self._embed_reference = embed_reference  # write init.safetensors even if no tensor needs it
        self._folder_context = None
        self.folder: Path | None = None
        self._tensors: TensorFileWriter | None = None
        self._init: TensorFileWriter | None = None
        self._init_hashes: dict[str, str] = {}
        self._linked_init = False
        self.entries: dict[str, TensorEntry] = {}
        self.manifest: Manifest | None = None
        self.bytes = 0

    def __enter__(self) -> ArtifactWriter:
        self._folder_context = atomic_output_dir(self.output, self._force, self._inputs)
        self.folder = self._folder_context.__enter__()
        try:
            self._tensors = TensorFileWriter(self.folder / ARTIFACT_FILE)
            if self._embed_reference:
                self._init = TensorFileWriter(self.folder / INIT_FILE)
        except BaseException:
            self._folder_context.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> bool:
        unfinished = exc_type is None and self.manifest is None
        if unfinished:  # a caller's bug: never rename a folder without a manifest into place
            exc = ArtifactError("the artifact was not finished", str(self.output), "this is a bug in inrank-convert")
            exc_type, traceback = ArtifactError, None
        if exc_type is None:
            self._folder_context.__exit__(None, None, None)
            return False
        for writer in (self._tensors, self._init):
            if writer is not None:
                writer.abort()
        self._folder_context.__exit__(exc_type, exc, traceback)  # removes the temporary folder
        if unfinished:
            raise exc
        return False

    # -- tensors

    def _add_entry(self, name: str, entry: TensorEntry) -> TensorEntry:
        if name in self.entries:
            raise ValueError(f"tensor {name!r} added twice")
        self.entries[name] = entry
        return entry

    def add_lowrank(self, name: str, B: torch.Tensor, A: torch.Tensor, *, shape: tuple[int, ...],
                    dtype: torch.dtype, energy: float = 1.0, original_bytes: int | None = None,
                    svd: str | None = None) -> TensorEntry:
        """``W ~= W_ref + B @ A``: B [rows, r], A [r, cols] in the stored orientation."""
        b_name, a_name = factor_names(name)
        stored = self._tensors.add(b_name, B) + self._tensors.add(a_name, A)
        nbytes = original_bytes if original_bytes is not None else TensorInfo(name, tuple(shape), dtype).nbytes
        return self._add_entry(name, TensorEntry("lowrank", tuple(shape), dtype, A.shape[0], energy, stored,
                                                 nbytes, svd))

    def add_dense(self, name: str, tensor: torch.Tensor, *, dtype: torch.dtype | None = None,
                  rank: int | None = None, svd: str | None = None) -> TensorEntry:
        """The tensor whole. ``rank``/``svd``: a factorized tensor whose low rank did not pay."""
        stored = self._tensors.add(name, tensor)
        return self._add_entry(name, TensorEntry("dense", tuple(tensor.shape), dtype or tensor.dtype, rank, 1.0,
                                                 stored, stored, svd))

    def add_zero(self, name: str, *, shape: tuple[int, ...], dtype: torch.dtype, energy: float,
                 original_bytes: int | None = None, svd: str | None = None) -> TensorEntry:
        """An update of rank 0: the tensor equals its reference; nothing is stored."""
        nbytes = original_bytes if original_bytes is not None else TensorInfo(name, tuple(shape), dtype).nbytes
        return self._add_entry(name, TensorEntry("zero", tuple(shape), dtype, 0, energy, 0, nbytes, svd))

    def add_alias(self, name: str, of: str, *, shape: tuple[int, ...], dtype: torch.dtype) -> TensorEntry:
        """``name`` is the tensor ``of`` under a second name (tied weights): stored once."""
        return self._add_entry(name, TensorEntry("alias", tuple(shape), dtype, of=of))

    def add_reference_tensor(self, name: str, tensor: torch.Tensor) -> str:
        """Store the reference of ``name`` in ``init.safetensors`` (--embed-init); returns its hash."""
        if self._linked_init:
            raise ValueError("the embedded init was linked whole: no tensors can be added to it")
        if self._init is None:
            self._init = TensorFileWriter(self.folder / INIT_FILE)
        self._init.add(name, tensor)
        self._init_hashes[name] = sha256_tensor(tensor)
        return self._init_hashes[name]

    def link_reference_file(self, file: Path) -> None:
        """Carry an existing embedded init (a training run's) into this artifact unchanged."""
        if self._init is not None:
            raise ValueError("reference tensors were added already")
        _link_or_copy(Path(file), self.folder / INIT_FILE)
        self._linked_init = True

    def copy_side_files(self, source_dir: Path | None) -> list[str]:
        return copy_side_files(source_dir, self.folder)

    # -- the manifest

    def finish(self, *, source: SourceRecord, reference: ReferenceRecord, rule: RuleRecord, original_bytes: int,
               order: list[str] | None = None, **made_with: Any) -> Manifest:
        """Write the tensor file with its manifest. ``order`` lists every name in the source's order
        (a decompressed checkpoint lists names as the original did); ``made_with`` fills the
        manifest's svd / factor_dtype / embeddings / include / exclude / training fields.
        Reference tensors added with ``add_reference_tensor`` make the reference ``embedded``."""
        if order is not None:
            if set(order) != set(self.entries):
                missing = sorted(set(order) ^ set(self.entries))
                raise ValueError(f"order and entries differ: {missing[:3]}")
            entries = {name: self.entries[name] for name in order}
        else:
            entries = dict(self.entries)
        if self._init is not None:
            self._init.finish()
            reference = ReferenceRecord("embedded", file=INIT_FILE, tensors=dict(self._init_hashes), source=reference)
        manifest = Manifest(source, reference, rule, entries, original_bytes, **made_with)
        manifest.checksums = dict(self._tensors.checksums)
        self._tensors.finish(manifest_metadata(manifest))
        self.manifest = manifest
        self.bytes = artifact_bytes(self.folder)
        return manifest


def manifest_metadata(manifest: Manifest) -> dict[str, str]:
    """The safetensors header metadata of an artifact file."""
    return {"format": "pt", MANIFEST_KEY: json.dumps(manifest.to_json(), separators=(",", ":"))}


# ----------------------------------------------------------------------------------------------
# Reading


def is_artifact(path: Path) -> bool:
    return (Path(path) / ARTIFACT_FILE).is_file()


def read_manifest(path: str | Path) -> Manifest:
    """The manifest from the header alone (no tensor data is read); validates format and version."""
    path = Path(path)
    file = path / ARTIFACT_FILE if path.is_dir() else path
    if not path.exists():
        raise ArtifactError("no such artifact", str(path), "check the path (an artifact is a folder made by compress)")
    if not file.is_file():
        raise ArtifactError(f"not an inrank-convert artifact (no {ARTIFACT_FILE})", str(path),
                            "point at a folder written by 'inrank-convert compress'")
    try:
        handle = open_safetensors(file)
    except CheckpointError as err:
        raise ArtifactError(err.what, err.where, err.fix) from err
    raw = (handle.metadata() or {}).get(MANIFEST_KEY)
    if raw is None:
        raise ArtifactError("safetensors file has no inrank manifest", str(file),
                            "this file was not written by inrank-convert compress")
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"corrupt manifest ({err.msg})", str(file), "re-run compress") from err
    manifest = Manifest.from_json(values, str(file))
    _check_stored(manifest, file, set(handle.keys()))
    return manifest


def _check_stored(manifest: Manifest, file: Path, stored: set[str]) -> None:
    """Every tensor the manifest lists must be in the file."""
    for name, entry in manifest.tensors.items():
        needed = {"lowrank": factor_names(name), "dense": (name,)}.get(entry.kind, ())
        missing = [stored_name for stored_name in needed if stored_name not in stored]
        if missing:
            raise ArtifactError(f"artifact lacks tensor {missing[0]!r} that its manifest lists", str(file),
                                "the file is damaged: re-run compress")
    for name, entry in manifest.tensors.items():
        if entry.is_alias and manifest.tensors.get(entry.of or "") is None:
            raise ArtifactError(f"alias {name!r} points at {entry.of!r}, which the manifest lacks", str(file),
                                "the file is damaged: re-run compress")


def artifact_bytes(path: Path) -> int:
    """Bytes of the artifact's tensor files on disk (factors, dense tensors, embedded init)."""
    return sum((path / name).stat().st_size for name in (ARTIFACT_FILE, INIT_FILE) if (path / name).is_file())


class ReferenceTensors(Protocol):
    """What an artifact needs of its reference (``reference.Reference`` implements it)."""

    def get(self, name: str) -> torch.Tensor | None: ...

    def infos(self) -> dict[str, TensorInfo] | None: ...

    def close(self) -> None: ...


class Artifact:
    """An opened artifact: manifest, stored tensors, and the reference it is handed.

    ``reference`` is the reference itself or a function that builds it on first use (rebuilding
    one can cost a model init or a file hash, and ``inspect``-like uses never need it). Open an
    artifact with its recorded reference through ``sources.open_artifact``.
    """

    def __init__(self, path: str | Path, reference: ReferenceTensors | None = None, *,
                 reference_loader: Callable[[Manifest, Path], ReferenceTensors] | None = None,
                 input_paths: tuple[Path, ...] = ()):
        self.path = Path(path)
        self.file = self.path / ARTIFACT_FILE
        self.manifest = read_manifest(self.path)
        self._file = SafetensorsCheckpoint(self.file, [self.file], None)
        self._reference = reference
        self._reference_loader = reference_loader
        self._extra_inputs = tuple(Path(p) for p in input_paths)

    @property
    def tensors(self) -> dict[str, TensorEntry]:
        return self.manifest.tensors

    @property
    def reference(self) -> ReferenceTensors:
        if self._reference is None:
            if self._reference_loader is None:
                raise ValueError("this Artifact was opened without a reference")
            self._reference = self._reference_loader(self.manifest, self.path)
        return self._reference

    def stored_names(self) -> list[str]:
        return self._file.names()

    def stored(self, name: str) -> torch.Tensor:
        return self._file.get(name)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [rows, r], A [r, cols]) of a low-rank tensor."""
        b_name, a_name = factor_names(name)
        return self._file.get(b_name), self._file.get(a_name)

    def input_paths(self) -> tuple[Path, ...]:
        """Every path this artifact reads: outputs must never replace one of them."""
        paths = [self.path, *self._extra_inputs]
        if self.manifest.reference.path:
            paths.append(Path(self.manifest.reference.path))
        return tuple(paths)

    def canonical(self, name: str) -> str:
        return self.manifest.canonical(name)

    def info(self, name: str) -> TensorInfo:
        entry = self.tensors[self.canonical(name)]
        return TensorInfo(name, entry.shape, entry.dtype)

    def reconstruct(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The dense tensor W = W_ref + B @ A (or the stored / reference one), in its source dtype."""
        name = self.canonical(name)
        entry = self.tensors[name]
        if entry.kind == "dense":
            return self.stored(name).to(device)
        reference = self.reference.get(name)
        base = (torch.zeros(entry.shape, dtype=torch.float32, device=device) if reference is None
                else reference.to(device=device, dtype=torch.float32))
        if entry.kind == "zero":
            return base.to(entry.dtype)
        B, A = self.factors(name)
        return (base + B.to(device, torch.float32) @ A.to(device, torch.float32)).to(entry.dtype)

    def close(self) -> None:
        self._file.close()
        if self._reference is not None:
            self._reference.close()

    def __enter__(self) -> Artifact:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe_artifact(path: str | Path) -> dict[str, Any]:
    """What ``inspect`` shows: totals and per-layer rows, from the header and file sizes only."""
    path = Path(path)
    manifest = read_manifest(path)
    compressed = artifact_bytes(path)
    original = manifest.original_bytes
    layers = [{"name": name, "shape": list(entry.shape), "kind": entry.kind, "rank": entry.rank,
               "energy": entry.energy, "bytes": entry.bytes, "dtype": dtype_name(entry.dtype)}
              for name, entry in manifest.stored_entries().items()]
    return {
        "path": str(path), "format": FORMAT_NAME, "version": manifest.version,
        "tool_version": manifest.tool_version, "created": manifest.created,
        "source": manifest.source.path, "reference": manifest.reference.mode, "rule": manifest.rule.describe(),
        "original_bytes": original, "compressed_bytes": compressed,
        "ratio": compressed / original if original else 0.0, "tied": manifest.aliases(), "layers": layers,
    }
