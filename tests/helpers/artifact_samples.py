"""A small artifact with one tensor of every kind, written by ArtifactWriter, and a way to change its
manifest in place: for the writer, reader and manifest tests (tests/artifact/)."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inrank_convert.artifact import (
    ARTIFACT_FILE,
    ArtifactWriter,
    Manifest,
    ReferenceRecord,
    RuleRecord,
    SourceRecord,
)
from inrank_convert.weights.checkpoints import FileHash

ORDER = ["b.bias", "h.weight", "a.weight", "c.weight", "d.weight"]  # not the order the tensors are added in


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    return {
        "a.B": rand(6, 2), "a.A": rand(2, 5),  # a.weight [6, 5] = ref + B @ A
        "b.bias": rand(5),
        "h.B": rand(4, 3).to(torch.bfloat16), "h.A": rand(3, 7).to(torch.bfloat16),  # h.weight [4, 7], bfloat16
        "ref.a": rand(6, 5), "ref.c": rand(4, 3), "ref.h": rand(4, 7).to(torch.bfloat16),
    }


def write_sample(out, tensors, embed: bool = True) -> Manifest:
    """One tensor of every kind: lowrank (two dtypes), dense, zero, alias; optionally an embedded reference."""
    with ArtifactWriter(out) as writer:
        writer.add_lowrank("a.weight", tensors["a.B"], tensors["a.A"], shape=(6, 5), dtype=torch.float32,
                           energy=0.875, svd="exact")
        writer.add_dense("b.bias", tensors["b.bias"])
        writer.add_zero("c.weight", shape=(4, 3), dtype=torch.float32, energy=0.25, svd="exact")
        writer.add_alias("d.weight", "a.weight", shape=(6, 5), dtype=torch.float32)
        writer.add_lowrank("h.weight", tensors["h.B"], tensors["h.A"], shape=(4, 7), dtype=torch.bfloat16,
                           energy=0.5, svd="randomized")
        if embed:
            for name in ("a", "c", "h"):
                writer.add_reference_tensor(f"{name}.weight", tensors[f"ref.{name}"])
        return writer.finish(
            source=SourceRecord("/models/trained", "safetensors", None, [FileHash("model.safetensors", 123, "ab" * 32)]),
            reference=ReferenceRecord("zero"), rule=RuleRecord("energy", 0.9), original_bytes=4321, order=ORDER,
            svd={"engine": "auto", "device": "cpu", "float64": False, "seed": 0}, factor_dtype=None,
            embeddings=True, include=["*.weight"], exclude=[])


def rewrite_manifest(out, change) -> None:
    """Rewrite the artifact file with the same tensors and a changed manifest."""
    file = out / ARTIFACT_FILE
    with safe_open(str(file), "pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
        values = json.loads(handle.metadata()["inrank"])
    change(values)
    save_file(stored, str(file), metadata={"format": "pt", "inrank": json.dumps(values)})
