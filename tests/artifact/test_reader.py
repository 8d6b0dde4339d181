"""artifact/reader.py: the manifest read from the header alone, refused when damaged or when it does
not match the stored tensors; ``Artifact`` rebuilding tensors against the reference it is given;
a version-1 artifact (written by hand, helpers/old_artifact.py) read as it was written."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inrank_convert.artifact import (
    ARTIFACT_FILE,
    INIT_FILE,
    Artifact,
    ArtifactWriter,
    ReferenceRecord,
    RuleRecord,
    SourceRecord,
    read_manifest,
)
from inrank_convert.core.errors import ArtifactError
from inrank_convert.inputs.reference import CheckpointReference, ZeroReference
from inrank_convert.inputs.sources import open_artifact
from inrank_convert.weights.checkpoints import open_weights
from tests.helpers.artifact_samples import sample_tensors, write_sample
from tests.helpers.old_artifact import ALIAS, LOWRANK, ZERO


def test_reconstruct_against_a_reference_passed_in(tmp_path):
    tensors = sample_tensors()
    out = tmp_path / "out"
    write_sample(out, tensors)
    a_update = tensors["a.B"] @ tensors["a.A"]
    h_update = tensors["h.B"].float() @ tensors["h.A"].float()

    with Artifact(out, reference=ZeroReference()) as artifact:
        assert torch.allclose(artifact.reconstruct("a.weight"), a_update, atol=1e-6)
        assert torch.equal(artifact.reconstruct("b.bias"), tensors["b.bias"])
        zero = artifact.reconstruct("c.weight")
        assert zero.shape == (4, 3) and zero.dtype == torch.float32 and not zero.any()
        assert torch.equal(artifact.reconstruct("d.weight"), artifact.reconstruct("a.weight"))
        h = artifact.reconstruct("h.weight")
        assert h.dtype == torch.bfloat16 and torch.equal(h, h_update.to(torch.bfloat16))
        assert artifact.info("d.weight").shape == (6, 5)

    # The embedded init, opened as a plain weights file and handed in as the reference.
    init = CheckpointReference(open_weights(out / INIT_FILE))
    with Artifact(out, reference=init) as artifact:
        assert torch.allclose(artifact.reconstruct("a.weight"), tensors["ref.a"] + a_update, atol=1e-6)
        assert torch.equal(artifact.reconstruct("c.weight"), tensors["ref.c"])
        assert torch.allclose(artifact.reconstruct("d.weight"), tensors["ref.a"] + a_update, atol=1e-6)
        expected_h = (tensors["ref.h"].float() + h_update).to(torch.bfloat16)
        assert torch.equal(artifact.reconstruct("h.weight"), expected_h)

    # The same through the recorded (embedded) reference, rebuilt and hash-checked by sources.
    with open_artifact(out) as artifact:
        assert torch.allclose(artifact.reconstruct("a.weight"), tensors["ref.a"] + a_update, atol=1e-6)
        assert torch.equal(artifact.reconstruct("c.weight"), tensors["ref.c"])


def test_an_artifact_without_a_reference_refuses_to_rebuild_updates(tmp_path):
    tensors = sample_tensors()
    write_sample(tmp_path / "out", tensors, embed=False)
    with Artifact(tmp_path / "out") as artifact:
        assert torch.equal(artifact.reconstruct("b.bias"), tensors["b.bias"])  # dense needs no reference
        with pytest.raises(ValueError, match="without a reference"):
            artifact.reconstruct("a.weight")


def test_a_manifest_that_lists_a_missing_factor_is_refused(tmp_path):
    out = tmp_path / "out"
    write_sample(out, sample_tensors())
    file = out / ARTIFACT_FILE
    with safe_open(str(file), "pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys() if name != "a.weight.lora_A"}
        metadata = handle.metadata()
    assert len(stored) == 4
    save_file(stored, str(file), metadata=metadata)
    with pytest.raises(ArtifactError, match="a.weight.lora_A"):
        read_manifest(out)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact"):
        read_manifest(tmp_path / "missing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ArtifactError, match="not an inrank-convert artifact"):
        read_manifest(tmp_path / "folder")
    save_file({"x": torch.ones(2)}, str(tmp_path / "folder" / ARTIFACT_FILE), metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match="no inrank manifest"):
        read_manifest(tmp_path / "folder")
    (tmp_path / "folder" / ARTIFACT_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ArtifactError):
        read_manifest(tmp_path / "folder")


def test_factors_that_do_not_make_the_tensor_are_refused_at_open(tmp_path):
    """A file whose factors do not multiply to the entry's shape (written wrong, checksums intact):
    the reader refuses it when it is opened, from the header alone, with one ArtifactError naming
    the factor, its shape and the one the entry needs, so reconstruct, load and decompress never
    fail on a shape mismatch deep inside a matmul."""
    with ArtifactWriter(tmp_path / "out") as writer:
        writer.add_lowrank("a.weight", torch.ones(6, 2), torch.ones(2, 4), shape=(6, 5), dtype=torch.float32)
        writer.finish(source=SourceRecord("/models/trained", "safetensors"), reference=ReferenceRecord("zero"),
                      rule=RuleRecord("energy", 0.9), original_bytes=120)
    for read in (read_manifest, lambda out: Artifact(out, ZeroReference())):
        with pytest.raises(ArtifactError, match=r"'a\.weight\.lora_A' is F32 \[2, 4\].*needs F32 \[2, 5\]"):
            read(tmp_path / "out")


def test_old_manifest_is_read(old):
    manifest = read_manifest(old.path)
    assert list(manifest.tensors) == list(old.manifest["tensors"])
    kinds = {name: entry.kind for name, entry in manifest.tensors.items()}
    assert {kinds[name] for name in LOWRANK} == {"lowrank"} and kinds[ZERO] == "zero"
    assert {"lowrank", "dense", "zero", "alias"} == set(kinds.values())
    assert manifest.aliases() == {ALIAS[0]: ALIAS[1]}
    assert {name: manifest.tensors[name].rank for name in LOWRANK} == LOWRANK
    assert manifest.checksums == old.manifest["checksums"] and len(manifest.checksums) == 2 * len(LOWRANK) + 13
    assert manifest.reference.mode == old.manifest["reference"]["mode"]
    assert manifest.original_bytes == old.manifest["original_bytes"]
