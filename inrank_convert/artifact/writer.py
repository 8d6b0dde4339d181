"""ArtifactWriter: the one way an artifact folder is written (compress and training checkpoints)."""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inrank_convert.artifact.bands import Bands
from inrank_convert.artifact.format import (
    ARTIFACT_FILE,
    INIT_FILE,
    MANIFEST_KEY,
    ROWS,
    row_names,
)
from inrank_convert.artifact.manifest import Manifest, TensorEntry
from inrank_convert.artifact.reader import artifact_bytes
from inrank_convert.artifact.records import ReferenceRecord, RuleRecord, SourceRecord
from inrank_convert.artifact.storage import stored_update
from inrank_convert.core.errors import ArtifactError
from inrank_convert.core.tensors import dtype_name, sha256_tensor
from inrank_convert.weights.checkpoints import TensorInfo, copy_side_files
from inrank_convert.weights.outputs import TensorFileWriter, atomic_output_dir, copy_rest, link_or_copy


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
                 embed_reference: bool = False, background: bool = False):
        self.output = Path(output)
        self._force = force
        self._inputs = inputs
        self._embed_reference = embed_reference  # write init.safetensors even if no tensor needs it
        # Spool tensors on a writer thread (TensorFileWriter's ``background``): for callers that never
        # change a tensor after adding it.
        self._background = background
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
            self._tensors = TensorFileWriter(self.folder / ARTIFACT_FILE, background=self._background)
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
                    svd: str | None = None, rows: torch.Tensor | None = None, row_index: torch.Tensor | None = None,
                    storage: str | None = None, error: float | None = None,
                    reference_rows: int | None = None, encoded: Mapping[str, torch.Tensor] | None = None,
                    bands: Bands | None = None, output_error: float | None = None) -> TensorEntry:
        """``W ~= W_ref + B @ A`` (+ ``rows`` scattered to ``row_index``): B [rows, r], A [r, cols],
        rows [K, cols], row_index [K] in the stored orientation.

        ``storage`` (float32 / float16 / bfloat16 / int8 / int4 / mixed, the last with its ``bands``)
        encodes the factors and rows; None stores
        them as given (training checkpoints keep their parameters' exact values). ``error``: the
        relative error of what is stored, measured by the caller; ``reference_rows``: the
        reference has only that many rows (a grown vocabulary); ``encoded``: the factors and rows
        already encoded at ``storage`` (``storage.stored_update``, by a caller that measured their
        error on them: int4's error feedback is not done twice); ``output_error``: a calibrated
        layer's relative output error on the calibration text (``stored_error.output_error``).
        """
        stored_storage = storage or dtype_name(A.dtype)
        kind = "lowrank"
        if rows is not None:
            if row_index is None or row_index.dim() != 1 or row_index.shape[0] != rows.shape[0]:
                raise ValueError(f"rows of {name!r} need a [K] row_index")
            kind = "lowrank+rows"
        if encoded is None:
            encoded = stored_update(B, A, rows, stored_storage, bands=bands)
        stored = 0
        for suffix, tensor in encoded.items():
            stored += self._tensors.add(name + suffix, tensor)
            if suffix == ROWS:  # the index right after the rows, as every writer has stored it
                stored += self._tensors.add(row_names(name)[1], row_index.to(torch.int64))
        nbytes = original_bytes if original_bytes is not None else TensorInfo(name, tuple(shape), dtype).nbytes
        return self._add_entry(name, TensorEntry(
            kind, tuple(shape), dtype, A.shape[0], energy, stored, nbytes, svd,
            rows=None if rows is None else int(rows.shape[0]), storage=stored_storage, error=error,
            reference_rows=reference_rows, bands=bands, output_error=output_error))

    def add_dense(self, name: str, tensor: torch.Tensor, *, dtype: torch.dtype | None = None,
                  rank: int | None = None, svd: str | None = None, reference_rows: int | None = None) -> TensorEntry:
        """The tensor whole. ``rank``/``svd``: a factorized tensor whose low rank did not pay;
        ``reference_rows``: its reference has fewer rows (a grown vocabulary; export-peft needs to know)."""
        stored = self._tensors.add(name, tensor)
        return self._add_entry(name, TensorEntry("dense", tuple(tensor.shape), dtype or tensor.dtype, rank, 1.0,
                                                 stored, stored, svd, reference_rows=reference_rows))

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
        link_or_copy(Path(file), self.folder / INIT_FILE)
        self._linked_init = True

    def add_stored(self, stored: StoredTensor, source: Callable[[str], torch.Tensor],
                   reference: Callable[[str], torch.Tensor]) -> TensorEntry:
        """Store what a ``RecordingWriter`` recorded for one tensor, byte for byte what the add_*
        call would have written here. ``source(name)`` / ``reference(name)`` give the tensors that
        were recorded by name only: the source tensor a dense form keeps whole and the reference
        that --embed-init stores (both re-read here rather than carried between processes)."""
        for name, tensor in stored.tensors:
            if isinstance(tensor, SourceTensor):
                whole = source(stored.name)
                if (tuple(whole.shape), whole.dtype) != (tensor.shape, tensor.dtype):
                    raise ValueError(f"{stored.name!r} was recorded as the source tensor {tensor}, but the source "
                                     f"holds {tuple(whole.shape)} {whole.dtype}")
                tensor = whole
            self._tensors.add(name, tensor)
        entry = self._add_entry(stored.name, stored.entry)
        if stored.reference:
            self.add_reference_tensor(stored.name, reference(stored.name))
        return entry

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


@dataclass(frozen=True)
class SourceTensor:
    """Stands for a tensor stored whole as the source holds it: the writing side re-reads it."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class StoredTensor:
    """What an ArtifactWriter stores for one tensor, recorded by a ``RecordingWriter``: its entry,
    the tensors it adds to ``inrank.safetensors`` (encoded, in order) and whether --embed-init adds
    its reference. ``ArtifactWriter.add_stored`` writes it."""

    name: str
    entry: TensorEntry
    tensors: list[tuple[str, torch.Tensor | SourceTensor]] = field(default_factory=list)
    reference: bool = False


class _TensorRecorder:
    """In place of a RecordingWriter's TensorFileWriter: keeps what would be written."""

    def __init__(self):
        self.tensors: list[tuple[str, torch.Tensor | SourceTensor]] = []

    def add(self, name: str, tensor: torch.Tensor) -> int:
        # Kept as given: RecordingWriter.take copies what travels (a dense tensor travels by name only).
        self.tensors.append((name, tensor))
        return tensor.numel() * tensor.element_size()

    def take(self) -> list[tuple[str, torch.Tensor | SourceTensor]]:
        taken, self.tensors = self.tensors, []
        return taken


class RecordingWriter(ArtifactWriter):
    """An ArtifactWriter that writes nothing: each add_* computes the entry and the encoded tensors
    exactly as the real writer would and keeps them as a ``StoredTensor`` (``take()``), so one
    process can compute tensors that another writes (compress under torchrun). A dense tensor
    is recorded by name only (``SourceTensor``): the writing side reads it from its own source."""

    def __init__(self):
        super().__init__(os.devnull)  # never entered: no folder, no file
        self._tensors = _TensorRecorder()
        self._stored: list[StoredTensor] = []

    def __enter__(self):
        raise TypeError("a RecordingWriter writes nothing: pass what it recorded to ArtifactWriter.add_stored")

    def _add_entry(self, name: str, entry: TensorEntry) -> TensorEntry:
        entry = super()._add_entry(name, entry)
        self._stored.append(StoredTensor(name, entry, self._tensors.take()))
        return entry

    def add_dense(self, name: str, tensor: torch.Tensor, **options) -> TensorEntry:
        entry = super().add_dense(name, tensor, **options)
        stored = self._stored[-1]
        stored.tensors = [(name, SourceTensor(tuple(tensor.shape), tensor.dtype))]
        return entry

    def add_reference_tensor(self, name: str, tensor: torch.Tensor) -> str:
        stored = next(stored for stored in reversed(self._stored) if stored.name == name)
        stored.reference = True
        return ""

    def take(self) -> list[StoredTensor]:
        """What was recorded since the last call, in the order it was added. Each tensor is a copy
        of its own, on the CPU: a factor is often a view of a whole SVD output (U[:, :r]), whose
        full storage would otherwise travel with it when pickled."""
        taken, self._stored = self._stored, []
        for stored in taken:
            stored.tensors = [(name, tensor if isinstance(tensor, SourceTensor)
                               else tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format))
                              for name, tensor in stored.tensors]
        return taken


def manifest_metadata(manifest: Manifest) -> dict[str, str]:
    """The safetensors header metadata of an artifact file."""
    return {"format": "pt", MANIFEST_KEY: json.dumps(manifest.to_json(), separators=(",", ":"))}


def rewrite_manifest(folder: Path, manifest: Manifest) -> int:
    """Replace the manifest in an artifact's tensor file (its tensors' bytes unchanged, so their
    checksums hold): for a record known only after the artifact was measured, such as the
    perplexity a --max-perplexity-increase search found. Temp file, then rename. Returns the
    file's new size."""
    path = Path(folder) / ARTIFACT_FILE
    temp = path.with_name(f".{path.name}.rewrite")
    try:
        with open(path, "rb") as source, open(temp, "wb") as out:
            (length,) = struct.unpack("<Q", source.read(8))
            header = json.loads(source.read(length))
            header["__metadata__"] = manifest_metadata(manifest)
            encoded = json.dumps(header, separators=(",", ":")).encode()
            encoded += b" " * (-len(encoded) % 8)  # the data section stays 8-byte aligned
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            copy_rest(source, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path.stat().st_size
