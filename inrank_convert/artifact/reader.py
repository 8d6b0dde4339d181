"""Reading an artifact: the manifest from the header alone, and the stored tensors with the
reference they are an update to (``Artifact``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from ..checkpoints import SafetensorsCheckpoint, TensorInfo, open_safetensors
from ..errors import ArtifactError, CheckpointError
from ..tensors import dtype_name
from .manifest import ARTIFACT_FILE, FORMAT_NAME, INIT_FILE, MANIFEST_KEY, Manifest, TensorEntry, factor_names


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
