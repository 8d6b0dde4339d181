"""Find and read checkpoints lazily, one tensor at a time.

Every input form of docs/design.md §3 becomes a :class:`Checkpoint`: a name -> tensor mapping whose
tensors are read only when asked for. Safetensors files are opened with ``safe_open`` (the
header is parsed, the data is memory-mapped); pickled files are loaded with
``torch.load(weights_only=True, mmap=True)``, never with full unpickling.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import re
import shutil
import struct
import warnings
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from inrank_convert.core.errors import CheckpointError
from inrank_convert.core.hub import resolve_model
from inrank_convert.core.tensors import SAFETENSORS_DTYPES, dtype_size, numel, shared_storage_groups
from inrank_convert.weights.hash_cache import sha256_files
from inrank_convert.weights.run_folder import run_steps

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Files that describe a model rather than hold its weights: copied into artifacts as they are.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * dtype_size(self.dtype)


@dataclass(frozen=True)
class FileHash:
    """One weight file of a checkpoint, as recorded to tell later whether it changed."""

    file: str  # the file's name
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return {"file": self.file, "bytes": self.bytes, "sha256": self.sha256}  # read back by artifact.fields.file_hashes


class Checkpoint(ABC):
    """A read-only, lazily loaded mapping of parameter names to tensors.

    ``path`` is what the user named; ``files`` are the weight files behind it (for hashes and
    sizes); ``config_dir`` is the folder holding config.json and tokenizer files, if any.
    """

    kind = "checkpoint"

    def __init__(self, path: Path, files: list[Path], config_dir: Path | None):
        self.path = path
        self.files = files
        self.config_dir = config_dir

    @abstractmethod
    def names(self) -> list[str]:
        """Abstract."""

    @abstractmethod
    def info(self, name: str) -> TensorInfo:
        """Abstract."""

    @abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """Abstract."""

    def first_row(self, name: str) -> torch.Tensor:
        """A cheap fingerprint: the first row (or element) of a tensor, for tie detection."""
        return self.get(name).reshape(-1)[:64]

    def shared_storage_groups(self) -> list[list[str]]:
        """Names that share one storage in the file (tied weights saved by torch.save)."""
        return []

    def prefetch(self, name: str) -> None:
        """A hint that ``name`` is read next (a no-op where the form offers no cheap hint)."""

    def infos(self) -> dict[str, TensorInfo]:
        return {name: self.info(name) for name in self.names()}

    def file_hashes(self, fresh: bool = False) -> list[FileHash]:
        """Each weight file's size and sha256, in ``files`` order. Several files (shards) are hashed
        in parallel; a file unchanged since it was last hashed (same stat) is not read again unless
        ``fresh`` (see hash_cache)."""
        digests = sha256_files(self.files, fresh)
        return [FileHash(f.name, f.stat().st_size, digest) for f, digest in zip(self.files, digests, strict=True)]

    def config(self) -> dict | None:
        if self.config_dir is None or not (self.config_dir / "config.json").is_file():
            return None
        try:
            return json.loads((self.config_dir / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError("cannot parse config.json", str(self.config_dir / "config.json"),
                                  f"fix or remove the file: {err}") from err

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsCheckpoint(Checkpoint):
    """One or several (sharded) safetensors files.

    No file stays open between reads: ``get`` opens the file, takes one memory-mapped tensor
    and closes it, so the mapping lives exactly as long as the returned tensor. A handle kept
    open would keep every page ever touched resident (peak RSS = both checkpoints).
    """

    kind = "safetensors"

    def __init__(self, path: Path, files: list[Path], config_dir: Path | None):
        super().__init__(path, files, config_dir)
        self._where: dict[str, Path] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._spans: dict[str, tuple[int, int]] = {}  # absolute byte range of each tensor's data
        self._metadata: dict[Path, dict[str, str]] = {}
        for file in files:
            handle = open_safetensors(file)
            self._metadata[file] = handle.metadata() or {}
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                dtype = SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"unsupported dtype {tensor_slice.get_dtype()} for tensor {name!r}",
                                          str(file), "convert the checkpoint to float32/16 or bfloat16")
                self._where[name] = file
                self._infos[name] = TensorInfo(name, tuple(tensor_slice.get_shape()), dtype)
            del handle
            self._spans.update(_data_spans(file))

    def metadata(self, file: Path | None = None) -> dict[str, str]:
        return self._metadata[file or self.files[0]]

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def get(self, name: str) -> torch.Tensor:
        file = self._where[name]
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                return handle.get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"cannot read tensor {name!r} ({err})", str(file),
                                  "the file changed or is damaged: re-save or re-download the checkpoint") from err

    def first_row(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        if len(info.shape) == 0:
            return self.get(name).reshape(-1)
        with safe_open(str(self._where[name]), framework="pt", device="cpu") as handle:
            return handle.get_slice(name)[0:1].reshape(-1)[:64].clone()

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes now (no memory is mapped or copied)."""
        span = self._spans.get(name)
        if span is None or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(self._where[name], os.O_RDONLY)
            try:
                os.posix_fadvise(fd, span[0], span[1] - span[0], os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass  # only a hint


def _data_spans(file: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges of every tensor in a safetensors file, from its (already validated) header."""
    with open(file, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    base = 8 + header_size
    return {name: (base + entry["data_offsets"][0], base + entry["data_offsets"][1])
            for name, entry in header.items() if name != "__metadata__"}


class StateDictCheckpoint(Checkpoint):
    """A pickled state dict (``.bin``, ``.pt``, Lightning ``.ckpt``), loaded without unpickling code."""

    kind = "state-dict"

    def __init__(self, path: Path, files: list[Path], config_dir: Path | None):
        super().__init__(path, files, config_dir)
        self._tensors: dict[str, torch.Tensor] = {}
        self.prefix_stripped = ""
        for file in files:
            state = load_state_dict_file(file)
            if file.suffix == ".ckpt":
                state, self.prefix_stripped = strip_common_prefix(state)
            self._tensors.update(state)

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        tensor = self._tensors[name]
        return TensorInfo(name, tuple(tensor.shape), tensor.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def shared_storage_groups(self) -> list[list[str]]:
        return shared_storage_groups(self._tensors)

    def close(self) -> None:
        self._tensors.clear()


def open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except SafetensorError as err:
        raise CheckpointError(f"cannot read safetensors file (truncated or corrupt: {err})", str(file),
                              "re-save or re-download it") from err
    except OSError as err:
        raise CheckpointError(f"cannot open safetensors file ({err.strerror})", str(file),
                              "check the path and its permissions") from err


def load_state_dict_file(file: Path) -> dict[str, torch.Tensor]:
    """Load a pickled checkpoint safely and return its tensors (the ``state_dict`` of a Lightning file)."""
    try:
        # torch's own warnings (e.g. "Detected pickle protocol 4") would precede our one-line message.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                # Files in the legacy (non-zip) format cannot be memory-mapped.
                obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refused_pickle(file, err) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint (truncated or corrupt: {first_line})", str(file),
                              "re-save or re-download it") from err
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a state dict, found a {type(obj).__name__}", str(file),
                              "save model.state_dict() rather than the model object")
    tensors = {name: value for name, value in obj.items() if isinstance(name, str) and isinstance(value, torch.Tensor)}
    if not tensors:
        raise CheckpointError("no tensors in checkpoint", str(file), "point at a file that holds the model's weights")
    return tensors


def _refused_pickle(file: Path, err: pickle.UnpicklingError) -> CheckpointError:
    """Why the weights-only unpickler refused ``file``, told apart without unpickling anything.

    torch's message is the same for three different files: a torch.save file holding Python
    objects beyond tensors, a raw ``pickle.dump`` (its protocol-4 FRAME opcode is refused), and
    bytes that are no pickle at all. ``pickletools.genops`` only parses opcodes, never runs them.
    """
    unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if zipfile.is_zipfile(file) or unsupported is not None:
        what = f" such as {unsupported.group(1)}" if unsupported is not None else ""
        return CheckpointError(
            f"refusing to load a pickle that needs more than weights_only (it holds arbitrary Python objects{what})",
            str(file), "re-save its state_dict with safetensors or torch.save(model.state_dict()) where you trust it")
    try:
        with open(file, "rb") as handle:
            for _ in pickletools.genops(handle):
                pass
    except Exception:  # noqa: BLE001 - any parse failure means the same thing: not a pickle
        return CheckpointError("not a readable checkpoint (neither safetensors, a torch.save file, nor a pickle)",
                               str(file), "point at the model's weights file, or re-download it")
    return CheckpointError(
        "refusing to unpickle a raw Python pickle (not written by torch.save; loading it could run code)",
        str(file), "re-save its state_dict with safetensors or torch.save(model.state_dict()) where you trust it")


def strip_common_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Lightning wraps the model (``self.model = ...``): drop one leading ``model.`` shared by all keys."""
    first = next(iter(state)).split(".", 1)[0] + "."
    if len(state) > 0 and all(name.startswith(first) and name != first for name in state):
        return {name[len(first):]: value for name, value in state.items()}, first
    return state, ""


def is_run_folder(path: Path) -> bool:
    """A folder of step folders that holds no model weights of its own (see ``sources.is_run``)."""
    return path.is_dir() and not _weights_in_folder(path) and bool(run_steps(path))


def _weights_in_folder(folder: Path) -> bool:
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "pytorch_model.bin.index.json")
    return any((folder / name).is_file() for name in names)


def open_weights(path: str | Path) -> Checkpoint:
    """Open a raw weights form of docs/design.md §3: a Hugging Face folder (single or sharded safetensors,
    pytorch_model.bin), or one .safetensors/.bin/.pt/.ckpt file; a hub id not a local path is read
    from the Hugging Face cache. Artifacts and run folders are ``sources.open_checkpoint``'s business."""
    path = resolve_model(path)
    if not path.exists():
        raise CheckpointError("no such file or folder", str(path), "check the path")
    if path.is_file():
        config_dir = path.parent if (path.parent / "config.json").is_file() else None
        if path.suffix == ".safetensors":
            return SafetensorsCheckpoint(path, [path], config_dir)
        if path.suffix in PICKLE_SUFFIXES:
            return StateDictCheckpoint(path, [path], config_dir)
        raise CheckpointError(f"unknown checkpoint file type {path.suffix or '(none)'!r}", str(path),
                              "use a .safetensors, .bin, .pt or .ckpt file, or a model folder")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return SafetensorsCheckpoint(path, _shards_from_index(index), path)
    if (path / "model.safetensors").is_file():
        return SafetensorsCheckpoint(path, [path / "model.safetensors"], path)
    bin_index = path / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        return StateDictCheckpoint(path, _shards_from_index(bin_index), path)
    if (path / "pytorch_model.bin").is_file():
        return StateDictCheckpoint(path, [path / "pytorch_model.bin"], path)
    if run_steps(path):
        raise CheckpointError("this is a training-run folder, not one checkpoint", str(path),
                              "pass it to compress/spectrum as CKPT, or name one of its step folders")
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return SafetensorsCheckpoint(path, singles, path if (path / "config.json").is_file() else None)
    raise CheckpointError(
        "no checkpoint in folder", str(path),
        "expected model.safetensors, a sharded model.safetensors.index.json, pytorch_model.bin, "
        "an inrank.safetensors artifact, or step-*/checkpoint-* subfolders",
    )


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError("cannot parse shard index (expected a 'weight_map')", str(index),
                              "re-save the model with save_pretrained") from err
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError("the shard index's 'weight_map' is not a mapping of tensor names to shard files",
                              str(index), "re-save the model with save_pretrained")
    for name, shard in weight_map.items():
        # A shard is a file of this folder: a path elsewhere ("../x", "/etc/x") is never followed.
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise CheckpointError(f"the shard index maps {name!r} to {shard!r}, not a file name in its folder",
                                  str(index), "re-save the model with save_pretrained")
    files = [index.parent / shard for shard in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"shard index names missing files: {', '.join(missing[:3])}", str(index),
                              "download the missing shards or re-save the model")
    return files


def copy_side_files(source_dir: Path | None, target_dir: Path, names: tuple[str, ...] = SIDE_FILES) -> list[str]:
    """Copy the files of ``names`` that exist in ``source_dir`` into ``target_dir``; returns their names."""
    copied: list[str] = []
    if source_dir is None:
        return copied
    for name in names:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, Path(target_dir) / name)
            copied.append(name)
    return copied
