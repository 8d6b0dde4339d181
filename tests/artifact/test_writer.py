"""artifact/writer.py: ArtifactWriter on real files: every tensor kind written and read back with its
checksums, nothing left behind when the block fails or never finishes, an existing output refused
unless forced, and the order it must be given."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from inrank_convert.artifact import (
    ARTIFACT_FILE,
    FORMAT_VERSION,
    INIT_FILE,
    ArtifactWriter,
    ReferenceRecord,
    RuleRecord,
    SourceRecord,
    read_manifest,
)
from inrank_convert.core.errors import ArtifactError, OutputError
from inrank_convert.core.tensors import checksum, sha256_tensor
from inrank_convert.weights.checkpoints import FileHash
from tests.helpers.artifact_samples import ORDER, sample_tensors, write_sample


def test_writer_round_trip_every_kind(tmp_path):
    tensors = sample_tensors()
    out = tmp_path / "out"
    written = write_sample(out, tensors)
    assert sorted(p.name for p in out.iterdir()) == sorted([ARTIFACT_FILE, INIT_FILE])
    assert not list(tmp_path.glob(".inrank-tmp-*"))

    manifest = read_manifest(out)
    assert manifest == written
    assert list(manifest.tensors) == ORDER
    assert manifest.version == FORMAT_VERSION
    a, b, c, d, h = (manifest.tensors[n] for n in ("a.weight", "b.bias", "c.weight", "d.weight", "h.weight"))
    assert (a.kind, a.shape, a.dtype, a.rank, a.energy, a.svd) == ("lowrank", (6, 5), torch.float32, 2, 0.875, "exact")
    assert a.bytes == (6 * 2 + 2 * 5) * 4 and a.original_bytes == 6 * 5 * 4
    assert (b.kind, b.shape, b.bytes, b.original_bytes) == ("dense", (5,), 20, 20)
    assert (c.kind, c.rank, c.bytes, c.original_bytes, c.energy) == ("zero", 0, 0, 4 * 3 * 4, 0.25)
    assert (d.kind, d.of, d.shape) == ("alias", "a.weight", (6, 5))
    assert (h.kind, h.dtype, h.rank, h.bytes) == ("lowrank", torch.bfloat16, 3, (4 * 3 + 3 * 7) * 2)
    assert manifest.aliases() == {"d.weight": "a.weight"}
    assert "d.weight" not in manifest.stored_entries() and len(manifest.stored_entries()) == 4
    assert (manifest.rule.criterion, manifest.rule.threshold, manifest.include) == ("energy", 0.9, ["*.weight"])
    assert manifest.source.files == [FileHash("model.safetensors", 123, "ab" * 32)]

    # Reference tensors added to the writer make the reference "embedded", wrapping the one passed to finish.
    reference = manifest.reference
    assert (reference.mode, reference.file, reference.source) == ("embedded", INIT_FILE, ReferenceRecord("zero"))
    assert reference.tensors == {f"{n}.weight": sha256_tensor(tensors[f"ref.{n}"]) for n in ("a", "c", "h")}

    # Checksums: every stored tensor's bytes, as read back from the file.
    stored = {"a.weight.lora_B": tensors["a.B"], "a.weight.lora_A": tensors["a.A"], "b.bias": tensors["b.bias"],
              "h.weight.lora_B": tensors["h.B"], "h.weight.lora_A": tensors["h.A"]}
    assert manifest.checksums == {name: checksum(t) for name, t in stored.items()}
    with safe_open(str(out / ARTIFACT_FILE), "pt") as handle:
        assert set(handle.keys()) == set(stored)
        assert json.loads(handle.metadata()["inrank"]) == manifest.to_json()
        for name in stored:
            assert torch.equal(handle.get_tensor(name), stored[name]), name


def test_an_exception_in_the_block_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with ArtifactWriter(out) as writer:
            writer.add_dense("x", torch.ones(3))
            assert writer.folder.is_dir() and writer.folder.name.startswith(".inrank-tmp-")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_an_exception_after_finish_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="late"):
        with ArtifactWriter(out) as writer:
            writer.add_dense("x", torch.ones(3))
            writer.finish(source=SourceRecord("s", "safetensors"), reference=ReferenceRecord("zero"),
                          rule=RuleRecord("energy", 0.9), original_bytes=12)
            raise RuntimeError("late")
    assert list(tmp_path.iterdir()) == []


def test_a_block_that_never_finishes_raises_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ArtifactError, match="not finished"):
        with ArtifactWriter(out) as writer:
            writer.add_dense("x", torch.ones(3))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_an_existing_output_and_force_replaces_it(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="exists"):
        with ArtifactWriter(out):
            pass
    assert (out / "old.txt").is_file()
    with ArtifactWriter(out, force=True) as writer:
        writer.add_dense("x", torch.ones(3))
        writer.finish(source=SourceRecord("s", "safetensors"), reference=ReferenceRecord("zero"),
                      rule=RuleRecord("energy", 0.9), original_bytes=12)
    assert sorted(p.name for p in out.iterdir()) == [ARTIFACT_FILE]
    assert list(read_manifest(out).tensors) == ["x"]


def test_order_must_name_every_tensor(tmp_path):
    with pytest.raises(ValueError, match="order and entries differ"):
        with ArtifactWriter(tmp_path / "out") as writer:
            writer.add_dense("x", torch.ones(3))
            writer.add_dense("y", torch.ones(3))
            writer.finish(source=SourceRecord("s", "safetensors"), reference=ReferenceRecord("zero"),
                          rule=RuleRecord("energy", 0.9), original_bytes=24, order=["x"])
    assert list(tmp_path.iterdir()) == []


