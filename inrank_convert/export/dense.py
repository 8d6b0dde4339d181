"""Writers that turn an artifact back into something other tools load: a dense Hugging Face folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from inrank_convert.artifact import Artifact
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.inputs.sources import open_artifact
from inrank_convert.model.architecture import with_architectures
from inrank_convert.runtime.modeling import check_fits_config
from inrank_convert.weights.checkpoints import copy_side_files
from inrank_convert.weights.outputs import TensorFileWriter, atomic_output_dir

DENSE_WEIGHTS_FILE = "model.safetensors"


@dataclass
class DecompressResult:
    output: Path
    tensors: int
    bytes: int

    def to_json(self) -> dict:
        return {"output": str(self.output), "tensors": self.tensors, "bytes": self.bytes}


def decompress(artifact_path: str | Path, output: str | Path, *, force: bool = False,
               init: str | Path | None = None, device: str = "cpu", on_tensor: Callable[[str], None] | None = None,
               reference_only: bool = False) -> DecompressResult:
    """Write the dense model W = W_ref + B @ A as a Hugging Face folder (``from_pretrained`` loads it).

    Refused before anything is written when the artifact has no config.json or its tensors are
    not the model config.json describes. Tensors are rebuilt and written one at a time; the
    folder appears only when complete.
    ``reference_only`` writes the reference W_ref instead (the init or base model, regenerated from
    its seed recipe, read from the embedded init or from the recorded path): the base model that
    ``export-peft``'s adapter goes on.
    """
    artifact = open_artifact(artifact_path, init)
    try:
        if reference_only and artifact.manifest.reference.mode == "zero":
            raise UsageError("this artifact's reference is zero (compressed with --no-init): there is no base "
                             "model to write", str(artifact.path), f"drop {flag('--reference-only')} to write the dense model")
        # The folder must load with from_pretrained: config.json must be there and describe exactly
        # these tensors (checked on the meta device before anything is written).
        check_fits_config(artifact)
        config = json.loads((artifact.path / "config.json").read_text())  # there: check_fits_config read it
        # Hugging Face re-ties an output embedding tied in the config; writing it again only adds bytes.
        skip_aliases = bool(config.get("tie_word_embeddings", True))
        known = set(artifact.reference.infos() or {}) if reference_only else set()
        with atomic_output_dir(Path(output), force, artifact.input_paths()) as temp:
            with TensorFileWriter(temp / DENSE_WEIGHTS_FILE) as writer:
                count = 0
                for name, entry in artifact.tensors.items():
                    if entry.is_alias and skip_aliases:
                        continue
                    tensor = (_reference_tensor(artifact, name, known, device) if reference_only
                              else artifact.reconstruct(name, device))
                    writer.add(name, tensor)
                    count += 1
                    if on_tensor is not None:
                        on_tensor(name)
                size = writer.finish()
            copy_side_files(artifact.path, temp)
            written = with_architectures(config)  # runs started from a bare config.json lack it
            if reference_only:
                written = _shrunk_vocabulary(artifact, written)
            if written != config:
                (temp / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
        return DecompressResult(Path(output), count, size)
    finally:
        artifact.close()


def _reference_tensor(artifact: Artifact, name: str, known: set[str], device: str):
    """W_ref of tensor ``name``, in the reference's own dtype.

    An embedded init holds the reference of the factorized and zero tensors only: the tensors stored
    dense (biases, norms, matrices whose low-rank form was not smaller) were kept whole, their init
    was never stored and cannot be recovered. For those we write the artifact's (trained) value, so
    the folder still loads; export-peft's adapter carries the full trained value of exactly these
    tensors (bias="all" or modules_to_save), so base + adapter is still the compressed model.
    A path or seed reference holds every tensor, so this fallback never applies to them.
    """
    name = artifact.canonical(name)
    if name in known:
        return artifact.reference.get(name).to(device)
    return artifact.reconstruct(name, device)


def _shrunk_vocabulary(artifact: Artifact, config: dict) -> dict:
    """A fine-tune that grew the vocabulary: its reference (the base) has fewer embedding rows, so
    the base's config.json must say so, or from_pretrained refuses the smaller embedding."""
    vocab = config.get("vocab_size")
    grown = {entry.reference_rows for entry in artifact.tensors.values()
             if entry.reference_rows is not None and entry.shape and entry.shape[0] == vocab}
    return {**config, "vocab_size": grown.pop()} if len(grown) == 1 else config
