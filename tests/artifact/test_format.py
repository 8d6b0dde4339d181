"""artifact/format.py: the names of the format, and that a written artifact spells its stored
tensors and files with them (the names every reader looks for)."""

from __future__ import annotations

import torch
from safetensors import safe_open

from inrank_convert.artifact import ArtifactWriter, ReferenceRecord, RuleRecord, SourceRecord
from inrank_convert.artifact.format import (
    ARTIFACT_FILE,
    FACTOR_SCALE,
    INIT_FILE,
    MANIFEST_KEY,
    REFERENCE_MODES,
    ROWS_SCALE,
    STORAGES,
    TENSOR_KINDS,
    factor_names,
    row_names,
)


def test_the_names_of_the_format():
    assert factor_names("h.0.weight") == ("h.0.weight.lora_B", "h.0.weight.lora_A")
    assert row_names("wte.weight") == ("wte.weight.rows", "wte.weight.row_index")
    assert TENSOR_KINDS == ("lowrank", "lowrank+rows", "dense", "zero", "alias")
    assert REFERENCE_MODES == ("reference", "seed", "embedded", "zero")
    assert "int8" in STORAGES and "bfloat16" in STORAGES
    assert (ARTIFACT_FILE, INIT_FILE, MANIFEST_KEY) == ("inrank.safetensors", "init.safetensors", "inrank")


def test_a_written_artifact_uses_these_names(tmp_path):
    generator = torch.Generator().manual_seed(0)
    B, A = torch.randn(6, 2, generator=generator), torch.randn(2, 5, generator=generator)
    rows, index = torch.randn(3, 5, generator=generator), torch.tensor([0, 2, 4])
    with ArtifactWriter(tmp_path / "out") as writer:
        writer.add_lowrank("a.weight", B, A, shape=(6, 5), dtype=torch.float32, energy=0.5, svd="exact")
        writer.add_lowrank("e.weight", B, A, shape=(6, 5), dtype=torch.float32, energy=0.9, svd="exact",
                           rows=rows, row_index=index, storage="int8")
        writer.add_dense("b.bias", torch.ones(5))
        writer.add_reference_tensor("a.weight", torch.zeros(6, 5))
        writer.finish(source=SourceRecord("/models/x", "safetensors"), reference=ReferenceRecord("zero"),
                      rule=RuleRecord("energy", 0.9), original_bytes=140)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted([ARTIFACT_FILE, INIT_FILE])
    with safe_open(str(tmp_path / "out" / ARTIFACT_FILE), "pt") as handle:
        assert MANIFEST_KEY in handle.metadata()
        stored = set(handle.keys())
    expected = {*factor_names("a.weight"), *factor_names("e.weight"), *row_names("e.weight"), "b.bias",
                "e.weight" + FACTOR_SCALE, "e.weight" + ROWS_SCALE}
    assert stored == expected
