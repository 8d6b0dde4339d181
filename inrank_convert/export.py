"""Writers that turn an artifact back into something other tools load: a dense Hugging Face folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .artifact import Artifact, TensorFileWriter, atomic_output_dir, copy_side_files

DENSE_WEIGHTS_FILE = "model.safetensors"


@dataclass
class DecompressResult:
    output: Path
    tensors: int
    bytes: int

    def to_json(self) -> dict:
        return {"output": str(self.output), "tensors": self.tensors, "bytes": self.bytes}


def decompress(artifact_path: str | Path, output: str | Path, *, force: bool = False,
               init_override: str | Path | None = None, device: str = "cpu", on_tensor=None) -> DecompressResult:
    """Write the dense model W = W_ref + B @ A as a Hugging Face folder (``from_pretrained`` loads it).

    Tensors are rebuilt and written one at a time; the folder appears only when complete.
    """
    artifact = Artifact(artifact_path, Path(init_override) if init_override else None)
    try:
        config = _config(artifact)
        # Hugging Face re-ties an output embedding tied in the config; writing it again only adds bytes.
        skip_aliases = bool(config.get("tie_word_embeddings", True)) if config else False
        with atomic_output_dir(Path(output), force, artifact.input_paths()) as temp:
            writer = TensorFileWriter(temp / DENSE_WEIGHTS_FILE)
            try:
                count = 0
                for name, entry in artifact.tensors.items():
                    if entry["kind"] == "alias" and skip_aliases:
                        continue
                    writer.add(name, artifact.reconstruct(name, device))
                    count += 1
                    if on_tensor is not None:
                        on_tensor(name)
                size = writer.finish({"format": "pt"})
            except BaseException:
                writer.abort()
                raise
            copy_side_files(artifact.path, temp)
        return DecompressResult(Path(output), count, size)
    finally:
        artifact.close()


def _config(artifact: Artifact) -> dict | None:
    import json

    file = artifact.path / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None
