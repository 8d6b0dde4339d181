"""The artifact on disk (format version 1, DESIGN §3): writing, reading, validating.

Layout of an artifact folder ``OUT/``::

    inrank.safetensors   factors (``name.lora_B`` [rows, r], ``name.lora_A`` [r, cols]) and
                         dense-stored tensors; header metadata key ``inrank`` = JSON manifest
    init.safetensors     the reference tensors, only with --embed-init
    config.json, generation_config.json, tokenizer files: copied from the source

This is the only module that knows file names, tensor-name suffixes and manifest keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from .checkpoints import (
    SAFETENSORS_DTYPES,
    Checkpoint,
    SafetensorsCheckpoint,
    TensorInfo,
    open_safetensors,
)
from .errors import ArtifactError, CheckpointError, OutputError

ARTIFACT_FILE = "inrank.safetensors"
INIT_FILE = "init.safetensors"
FORMAT_NAME = "inrank-convert"
FORMAT_VERSION = 1
MANIFEST_KEY = "inrank"
FACTOR_B = ".lora_B"  # [rows, r]
FACTOR_A = ".lora_A"  # [r, cols]
KINDS = ("lowrank", "dense", "zero", "alias")
_DTYPE_NAMES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_TMP_PREFIX = ".inrank-tmp-"


def factor_names(name: str) -> tuple[str, str]:
    """Stored names of the two factors of tensor ``name``: (B, A)."""
    return name + FACTOR_B, name + FACTOR_A


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in manifest", None, "the artifact may be corrupt")
    return dtype


class TensorFileWriter:
    """Writes a safetensors file one tensor at a time, never holding more than one in memory.

    The safetensors header (with every offset) comes first in the file but is known only at the
    end, so tensor bytes are spooled to a side file and copied behind the header in ``finish``.
    """

    def __init__(self, path: Path):
        self.path = path
        self._spool_path = path.with_name(path.name + ".spool")
        self._spool = open(self._spool_path, "wb")
        self._header: dict[str, dict] = {}
        self._offset = 0
        self.checksums: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> int:
        """Append one tensor; returns its size in bytes."""
        if name in self._header:
            raise ValueError(f"tensor {name!r} written twice")
        tensor = tensor.detach().contiguous().cpu()
        code = _DTYPE_NAMES.get(tensor.dtype)
        if code is None:
            raise ArtifactError(f"cannot store dtype {tensor.dtype} (tensor {name!r})", None,
                                "pass --dtype float32, float16 or bfloat16")
        data = tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b""
        self._spool.write(data)
        size = tensor.numel() * tensor.element_size()
        self._header[name] = {"dtype": code, "shape": list(tensor.shape),
                              "data_offsets": [self._offset, self._offset + size]}
        self._offset += size
        self.checksums[name] = hashlib.sha256(data).hexdigest()
        return size

    def finish(self, metadata: dict[str, str]) -> int:
        """Write header + data to ``path``; returns the file size."""
        self._spool.close()
        header = {"__metadata__": metadata, **self._header}
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


def copy_side_files(source_dir: Path | None, target_dir: Path) -> list[str]:
    """Copy config, generation config and tokenizer files that exist in ``source_dir``."""
    from .checkpoints import SIDE_FILES

    copied = []
    if source_dir is None:
        return copied
    for name in SIDE_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, target_dir / name)
            copied.append(name)
    return copied


def new_manifest(*, source: dict, reference: dict, rule: dict, tensors: dict, original_bytes: int, **fields) -> dict:
    """A version-1 manifest: the keys every reader relies on, then any producer-specific ones."""
    from . import __version__

    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "tool_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": source,
            "reference": reference, "rule": rule, **fields, "original_bytes": original_bytes, "tensors": tensors}


def write_artifact_file(folder: Path, stored: dict[str, torch.Tensor], manifest: dict) -> int:
    """Write ``folder/inrank.safetensors`` with ``stored`` and ``manifest`` (checksums added)."""
    writer = TensorFileWriter(folder / ARTIFACT_FILE)
    try:
        for name, tensor in stored.items():
            writer.add(name, tensor)
        return writer.finish(manifest_metadata({**manifest, "checksums": writer.checksums}))
    except BaseException:
        writer.abort()
        raise


def manifest_metadata(manifest: dict) -> dict[str, str]:
    return {"format": "pt", MANIFEST_KEY: json.dumps(manifest, separators=(",", ":"))}


def is_artifact(path: Path) -> bool:
    return (Path(path) / ARTIFACT_FILE).is_file()


def read_manifest(path: str | Path) -> dict:
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
        manifest = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ArtifactError(f"corrupt manifest ({err.msg})", str(file), "re-run compress") from err
    check_manifest(manifest, file, set(handle.keys()))
    return manifest


def check_manifest(manifest: dict, file: Path, stored: set[str] | None = None) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError("not an inrank-convert manifest", str(file), "re-run compress")
    version = manifest.get("version")
    if not isinstance(version, int):
        raise ArtifactError("manifest has no format version", str(file), "re-run compress")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format version {version} is newer than this inrank-convert reads (version {FORMAT_VERSION})",
            str(file), "upgrade: pip install -U inrank-convert")
    if stored is None:
        return
    for name, entry in manifest.get("tensors", {}).items():
        needed = {"lowrank": factor_names(name), "dense": (name,)}.get(entry.get("kind"), ())
        missing = [stored_name for stored_name in needed if stored_name not in stored]
        if missing:
            raise ArtifactError(f"artifact lacks tensor {missing[0]!r} that its manifest lists", str(file),
                                "the file is damaged: re-run compress")


def artifact_bytes(path: Path) -> int:
    """Bytes of the artifact's tensor files on disk (factors, dense tensors, embedded init)."""
    return sum((path / name).stat().st_size for name in (ARTIFACT_FILE, INIT_FILE) if (path / name).is_file())


class Artifact:
    """An opened artifact: manifest, stored tensors, and the reference it needs."""

    def __init__(self, path: str | Path, init_override: Path | None = None, verify_reference: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._file = SafetensorsCheckpoint(self.path / ARTIFACT_FILE, [self.path / ARTIFACT_FILE], None)
        self._init_override = init_override
        self._verify_reference = verify_reference
        self._reference = None

    @property
    def tensors(self) -> dict[str, dict]:
        return self.manifest["tensors"]

    @property
    def reference(self):
        if self._reference is None:
            from .reference import reference_from_manifest

            self._reference = reference_from_manifest(self.manifest["reference"], self.path,
                                                      self._init_override, self._verify_reference)
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
        paths = [self.path]
        if self._init_override is not None:
            paths.append(Path(self._init_override))
        recorded = self.manifest.get("reference", {}).get("path")
        if recorded:
            paths.append(Path(recorded))
        return tuple(paths)

    def canonical(self, name: str) -> str:
        entry = self.tensors[name]
        return entry["of"] if entry["kind"] == "alias" else name

    def reconstruct(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """The dense tensor W = W_ref + B @ A (or the stored / reference one), in its source dtype."""
        name = self.canonical(name)
        entry = self.tensors[name]
        dtype = parse_dtype(entry["dtype"])
        kind = entry["kind"]
        if kind == "dense":
            return self.stored(name).to(device)
        reference = self.reference.get(name)
        base = (torch.zeros(entry["shape"], dtype=torch.float32, device=device) if reference is None
                else reference.to(device=device, dtype=torch.float32))
        if kind == "zero":
            return base.to(dtype)
        B, A = self.factors(name)
        return (base + B.to(device, torch.float32) @ A.to(device, torch.float32)).to(dtype)

    def close(self) -> None:
        self._file.close()
        if self._reference is not None:
            self._reference.close()


class ArtifactCheckpoint(Checkpoint):
    """An artifact read as a dense checkpoint (to re-compress it, compare it, or decompress it)."""

    kind = "artifact"

    def __init__(self, path: Path, init_override: Path | None = None):
        self.artifact = Artifact(path, init_override)
        super().__init__(Path(path), [Path(path) / ARTIFACT_FILE], Path(path))

    def names(self) -> list[str]:
        return list(self.artifact.tensors)

    def info(self, name: str) -> TensorInfo:
        entry = self.artifact.tensors[self.artifact.canonical(name)]
        return TensorInfo(name, tuple(entry["shape"]), parse_dtype(entry["dtype"]))

    def get(self, name: str) -> torch.Tensor:
        return self.artifact.reconstruct(name)

    def shared_storage_groups(self) -> list[list[str]]:
        groups: dict[str, list[str]] = {}
        for name, entry in self.artifact.tensors.items():
            if entry["kind"] == "alias":
                groups.setdefault(entry["of"], [entry["of"]]).append(name)
        return list(groups.values())

    def close(self) -> None:
        self.artifact.close()


def describe_artifact(path: str | Path) -> dict:
    """What ``inspect`` shows: totals and per-layer rows, from the header and file sizes only."""
    path = Path(path)
    manifest = read_manifest(path)
    compressed = artifact_bytes(path)
    original = manifest["original_bytes"]
    layers = [{"name": name, "shape": entry["shape"], "kind": entry["kind"], "rank": entry.get("rank"),
               "energy": entry.get("energy"), "bytes": entry.get("bytes", 0), "dtype": entry["dtype"]}
              for name, entry in manifest["tensors"].items() if entry["kind"] != "alias"]
    tied = {name: entry["of"] for name, entry in manifest["tensors"].items() if entry["kind"] == "alias"}
    rule = manifest["rule"]
    return {
        "path": str(path), "format": manifest["format"], "version": manifest["version"],
        "tool_version": manifest.get("tool_version"), "created": manifest.get("created"),
        "source": manifest["source"]["path"], "reference": manifest["reference"]["mode"],
        "rule": f"rank={rule['rank']}" if rule.get("rank") is not None else f"{rule['criterion']}>={rule['threshold']:g}",
        "original_bytes": original, "compressed_bytes": compressed,
        "ratio": compressed / original if original else 0.0, "tied": tied, "layers": layers,
    }
