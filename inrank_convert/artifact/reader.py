"""Reading an artifact: the manifest from the header alone, and the stored tensors with the
reference they are an update to (``Artifact``)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from inrank_convert.artifact.format import (
    ARTIFACT_FILE,
    DAMAGED,
    FACTOR_A,
    FACTOR_B,
    FORMAT_NAME,
    INIT_FILE,
    MANIFEST_KEY,
    ROWS,
    factor_names,
    row_names,
)
from inrank_convert.artifact.manifest import Manifest, TensorEntry
from inrank_convert.artifact.storage import (
    factors_layout,
    precision_bands,
    read_factors,
    read_rows,
    rows_layout,
)
from inrank_convert.core.errors import ArtifactError, CheckpointError, InitReferenceError
from inrank_convert.core.tensors import SAFETENSORS_DTYPES, dtype_name, is_finite
from inrank_convert.weights.checkpoints import SafetensorsCheckpoint, TensorInfo, open_safetensors

# Rows of the dense result built at a time by ``reconstruct`` (bounds the float32 temporaries of
# B @ A for a tall matrix, e.g. 50,257 x 4096 embeddings, to about 64 MB).
RECONSTRUCT_ROWS = 4096


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
    _check_stored(manifest, file, {name: handle.get_slice(name) for name in handle.keys()})
    return manifest


def _check_stored(manifest: Manifest, file: Path, stored: dict) -> None:
    """The manifest against the file's tensors, from the header alone (no tensor data is read):
    every tensor an entry needs is there with the shape and dtype the entry implies (factors of
    the recorded rank that make the recorded shape, a dense tensor of its recorded shape, row
    indices int64), the file holds nothing the manifest does not list, and every checksum names a
    stored tensor."""
    where = str(file)
    expected: dict[str, tuple[tuple[int, ...], frozenset[str]]] = {}
    for name, entry in manifest.tensors.items():
        for stored_name, (shape, codes) in entry.stored_layout(name).items():
            if stored_name not in stored:
                raise ArtifactError(f"artifact lacks tensor {stored_name!r} that its manifest lists", where, DAMAGED)
            found = stored[stored_name]
            found_shape, found_code = tuple(found.get_shape()), found.get_dtype()
            if found_shape != shape or found_code not in codes:
                rank = f", rank {entry.rank}" if entry.has_factors else ""
                raise ArtifactError(
                    f"stored tensor {stored_name!r} is {found_code} {list(found_shape)}, but the manifest's "
                    f"{entry.kind} entry for {name!r} ({list(entry.shape)}{rank}"
                    f"{f', {entry.storage}' if entry.storage else ''}) needs {'/'.join(sorted(codes))} "
                    f"{list(shape)}", where, DAMAGED)
            expected[stored_name] = (shape, codes)
    unlisted = [stored_name for stored_name in stored if stored_name not in expected]
    if unlisted:
        raise ArtifactError(f"artifact file holds tensor {unlisted[0]!r} that its manifest does not list", where,
                            DAMAGED)
    unknown = [stored_name for stored_name in manifest.checksums if stored_name not in stored]
    if unknown:
        raise ArtifactError(f"manifest has a checksum for {unknown[0]!r}, which the file lacks", where, DAMAGED)
    # Every writer of every version recorded a checksum per stored tensor: one missing means the
    # manifest was edited, and a tensor without one could be changed unseen.
    unchecked = [stored_name for stored_name in stored if stored_name not in manifest.checksums]
    if unchecked:
        raise ArtifactError(f"manifest lacks the checksum of stored tensor {unchecked[0]!r}", where, DAMAGED)


def check_reference(manifest: Manifest, infos: dict[str, TensorInfo] | None, where: str, fix: str) -> None:
    """The reference must hold every tensor an entry is an update to, at the entry's shape (or with
    the entry's ``reference_rows`` rows: a grown vocabulary). From names and shapes alone; raises
    InitReferenceError (``None`` infos: the zero reference, which has every tensor)."""
    if infos is None:
        return
    for name, entry in manifest.tensors.items():
        if not entry.uses_reference:
            continue
        info = infos.get(name)
        if info is None:
            raise InitReferenceError(f"the init lacks tensor {name!r} of the artifact", where, fix)
        shape = entry.shape if entry.reference_rows is None else (entry.reference_rows, *entry.shape[1:])
        if tuple(info.shape) != tuple(shape):
            raise InitReferenceError(f"init tensor {name!r} has shape {list(info.shape)}, the artifact needs "
                                     f"{list(shape)}", where, fix)


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

    def stored(self, name: str) -> torch.Tensor:
        return self._file.get(name)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B [rows, r], A [r, cols]) of a low-rank tensor in float32, whatever the storage (int8
        and group scales applied): ``B @ A`` is the update's low-rank part. Their shapes and dtypes (and the
        scale's) were checked against the manifest when the artifact was opened (``_check_stored``)."""
        entry = self.tensors[name]
        rows, cols = entry.shape
        B, A = read_factors(self._stored(name, factors_layout(entry.storage, rows, cols, entry.rank or 0,
                                                              entry.bands)), entry.storage)
        b_name, a_name = factor_names(name)
        for stored_name, tensor in ((b_name, B), (a_name, A)):
            self._check_finite(stored_name, tensor)
        return B, A

    def _stored(self, name: str, layout: dict) -> dict[str, torch.Tensor]:
        """The stored tensors of ``layout`` (suffix -> ...) of tensor ``name``, by suffix; a scale
        holding NaN or Inf is refused by its own name (the factors and rows once decoded)."""
        stored = {}
        for suffix in layout:
            tensor = self._file.get(name + suffix)
            if suffix not in (FACTOR_B, FACTOR_A, ROWS) and tensor.is_floating_point():
                self._check_finite(name + suffix, tensor)
            stored[suffix] = tensor
        return stored

    def _check_finite(self, stored_name: str, tensor: torch.Tensor) -> None:
        """Stored data holding NaN or Inf (compress refuses such weights, so the file was damaged
        or written by something else) is refused where it is read, before anything is built from it."""
        if not is_finite(tensor):
            raise ArtifactError(f"stored tensor {stored_name!r} holds NaN or Inf", str(self.file), DAMAGED)

    def dense(self, name: str) -> torch.Tensor:
        """A dense-stored tensor as stored (its source dtype), refused if it holds NaN or Inf."""
        tensor = self._file.get(name)
        self._check_finite(name, tensor)
        return tensor

    def rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(row_index [K] int64, rows [K, cols] float32) of a lowrank+rows tensor, validated: the
        indices must be distinct and inside the tensor, or the artifact is refused (their shapes and
        dtypes were checked against the manifest when the artifact was opened)."""
        entry = self.tensors[name]
        rows_name, index_name = row_names(name)
        index = self._file.get(index_name)
        where = str(self.file)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= entry.shape[0]):
            raise ArtifactError(f"row index {index_name!r} points outside the tensor's {entry.shape[0]} rows", where,
                                DAMAGED)
        if torch.unique(index).numel() != index.numel():
            raise ArtifactError(f"row index {index_name!r} repeats a row", where, DAMAGED)
        stored = self._stored(name, rows_layout(entry.storage, entry.rows or 0, entry.shape[1]))
        rows = read_rows(stored, entry.storage, entry.shape[1])
        self._check_finite(rows_name, rows)
        return index, rows

    def check_overflow(self, name: str) -> None:
        """Refuse finite factors whose product W_ref + B @ A overflows the tensor's dtype (a file
        written wrong, or by hand), for readers that use the factors without rebuilding the weight
        (the runtime's LowRankLinear, export-peft). |W_ij| <= max|W_ref| + sum_k max|B[:, k]| max|A[k, :]|
        (+ max|rows|) bounds every element cheaply; only a tensor whose bound exceeds its dtype's
        range is rebuilt to see whether it really overflows."""
        entry = self.tensors[name]
        if not entry.has_factors or not entry.dtype.is_floating_point:
            return
        B, A = self.factors(name)  # [rows, r], [r, cols] float32
        bound = float((B.abs().amax(dim=0) * A.abs().amax(dim=1)).sum()) if B.numel() and A.numel() else 0.0
        reference = self.reference.get(name) if entry.uses_reference else None
        if reference is not None and reference.numel():
            bound += float(reference.abs().max())
        if entry.kind == "lowrank+rows":
            _, rows = self.rows(name)
            bound += float(rows.abs().max()) if rows.numel() else 0.0
        if math.isfinite(bound) and bound <= torch.finfo(entry.dtype).max:
            return
        self.reconstruct(name)  # raises if the rebuilt weight holds Inf

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

    def reconstruct(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                    ) -> torch.Tensor:
        """The dense tensor W = W_ref + B @ A (+ the stored rows), or the stored / reference one, in
        its source dtype (or ``dtype``: float32 gives the sum before it is rounded to a 16-bit source
        dtype). Built in place, a block of rows at a time: no dense update is formed."""
        name = self.canonical(name)
        entry = self.tensors[name]
        if entry.kind == "dense":
            return self.dense(name).to(device, dtype or entry.dtype)
        weight = torch.zeros(entry.shape, dtype=torch.float32, device=device)  # [rows, cols]
        reference = self.reference.get(name)
        if reference is not None:
            # A grown vocabulary: the reference has the first reference_rows rows, the rest start at 0.
            weight[:reference.shape[0]].copy_(reference)
        if entry.has_factors:
            B, A = self.factors(name)
            B, A = B.to(device, torch.float32), A.to(device, torch.float32)  # [rows, r], [r, cols]
            for start in range(0, entry.shape[0], RECONSTRUCT_ROWS):
                block = weight[start:start + RECONSTRUCT_ROWS]
                block.addmm_(B[start:start + RECONSTRUCT_ROWS], A)
        if entry.kind == "lowrank+rows":
            index, rows = self.rows(name)
            weight.index_add_(0, index.to(device), rows.to(device))
        weight = weight.to(dtype or entry.dtype)
        if not is_finite(weight):
            # Finite factors whose product overflows (float32 or the 16-bit source dtype): never
            # hand on a weight that is Inf.
            raise ArtifactError(f"tensor {name!r} rebuilt from its stored factors overflows {dtype_name(weight.dtype)}"
                                " (holds Inf)", str(self.file), DAMAGED)
        return weight

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
    header = None  # the file's header, opened only for version-1 factors (no storage in their entries)

    def storage(name: str, entry: TensorEntry) -> str | None:
        """The precision the tensor's data is stored at: its entry's (version 2); a dense tensor's own
        dtype (stored whole, as it is); for version-1 factors the dtype the file holds; None when
        nothing is stored."""
        nonlocal header
        if entry.storage is not None:
            return entry.storage
        if entry.kind == "dense":
            return dtype_name(entry.dtype)
        if not entry.has_factors:
            return None
        if header is None:
            header = open_safetensors(path / ARTIFACT_FILE)
        dtype = SAFETENSORS_DTYPES.get(header.get_slice(factor_names(name)[1]).get_dtype())
        return dtype_name(dtype) if dtype is not None else None

    # rows: K stored rows of a lowrank+rows tensor (None otherwise); reference_rows: a grown vocabulary;
    # error: the relative error of what is stored (version 2; None in version 1); output_error: a
    # calibrated layer's on the calibration text's outputs (None elsewhere).
    layers = [{"name": name, "shape": list(entry.shape), "kind": entry.kind, "rank": entry.rank,
               "energy": entry.energy, "bytes": entry.bytes, "dtype": dtype_name(entry.dtype),
               "rows": entry.rows, "storage": storage(name, entry), "error": entry.error,
               "output_error": entry.output_error,
               "reference_rows": entry.reference_rows,
               "bands": precision_bands(entry.storage, entry.rank or 0, entry.bands) if entry.has_factors else None}
              for name, entry in manifest.stored_entries().items()]
    return {
        "path": str(path), "format": FORMAT_NAME, "version": manifest.version,
        "tool_version": manifest.tool_version, "created": manifest.created,
        "source": manifest.source.path, "reference": manifest.reference.mode, "rule": manifest.rule.describe(),
        "original_bytes": original, "compressed_bytes": compressed,
        "ratio": compressed / original if original else 0.0, "tied": manifest.aliases(), "layers": layers,
        **{key: value for key, value in (("calibration", manifest.calibration),
                                         ("perplexity_target", manifest.perplexity_target)) if value is not None},
    }
