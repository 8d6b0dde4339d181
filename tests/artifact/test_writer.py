"""artifact.py: the one writer (ArtifactWriter), the typed manifest and the reader, on real files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inrank_convert.artifact import (
    ARTIFACT_FILE,
    FORMAT_VERSION,
    INIT_FILE,
    Artifact,
    ArtifactWriter,
    Manifest,
    ReferenceRecord,
    RuleRecord,
    SourceRecord,
    TensorEntry,
    TrainingRecord,
    read_manifest,
)
from inrank_convert.core.errors import ArtifactError, OutputError
from inrank_convert.core.tensors import checksum, sha256_tensor
from inrank_convert.inputs.reference import CheckpointReference, ZeroReference
from inrank_convert.inputs.sources import open_artifact
from inrank_convert.weights.checkpoints import FileHash, open_weights

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


def _manifest_of_every_record() -> Manifest:
    """A manifest with every optional record filled (a seed reference, a training record, newer keys)."""
    tensors = {"w": TensorEntry("lowrank", (3, 2), torch.float16, 1, 0.5, 10, 12, "exact"),
               "v": TensorEntry("alias", (3, 2), torch.float16, of="w")}
    recipe = {"library": "transformers", "auto_class": "AutoModelForCausalLM", "seed": 7, "dtype": "float32",
              "config": {"model_type": "gpt2", "n_embd": 8}, "torch": "2.13.0", "transformers": "5.0.0"}
    return Manifest(
        source=SourceRecord("/runs/r", "training", "/runs/r", []),
        reference=ReferenceRecord("seed", recipe=recipe, tensors={"w": "cd" * 32}),
        rule=RuleRecord("inrank", 0.9, 4), tensors=tensors, original_bytes=12,
        checksums={"w.lora_B": "01" * 32, "w.lora_A": "02" * 32}, training=TrainingRecord(12, "inrank"),
        calibration={"tokens": 512}, perplexity_target={"max_increase_percent": 1.0, "perplexity": 2.5},
        extra={"newer_key": {"a": 1}})


@pytest.mark.parametrize("source", ["written", "every-record"])
def test_manifest_json_round_trip(tmp_path, source):
    if source == "written":
        write_sample(tmp_path / "out", sample_tensors())
        manifest = read_manifest(tmp_path / "out")
    else:
        manifest = _manifest_of_every_record()
    values = manifest.to_json()
    again = Manifest.from_json(json.loads(json.dumps(values)))
    assert again.to_json() == values
    assert again == manifest
    if source == "every-record":
        assert values["training"] == {"step": 12, "mode": "inrank"} and values["calibration"] == {"tokens": 512}
        assert values["perplexity_target"]["perplexity"] == 2.5 and values["newer_key"] == {"a": 1}
        assert again.reference.recipe["seed"] == 7 and again.rule.rank == 4


def _rewrite_manifest(out, change) -> None:
    """Rewrite the artifact file with the same tensors and a changed manifest."""
    file = out / ARTIFACT_FILE
    with safe_open(str(file), "pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
        values = json.loads(handle.metadata()["inrank"])
    change(values)
    save_file(stored, str(file), metadata={"format": "pt", "inrank": json.dumps(values)})


def test_a_newer_version_is_refused(tmp_path):
    out = tmp_path / "out"
    write_sample(out, sample_tensors())
    _rewrite_manifest(out, lambda values: values.update(version=FORMAT_VERSION + 1))
    with pytest.raises(ArtifactError) as caught:
        read_manifest(out)
    message = str(caught.value)
    assert "newer" in message and "upgrade" in message and str(FORMAT_VERSION + 1) in message


def _drop(*keys):
    def change(values):
        target = values
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return change


def _set(value, *keys):
    def change(values):
        target = values
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return change


@pytest.mark.parametrize("change,says", [
    (_drop("tensors"), "corrupt manifest"),
    (_drop("rule"), "corrupt manifest"),
    (_drop("source"), "corrupt manifest"),
    (_drop("reference", "mode"), "corrupt manifest"),
    (_drop("tensors", "a.weight", "shape"), "corrupt manifest"),
    (_drop("tensors", "d.weight", "of"), "corrupt manifest"),
    (_set("sparse", "tensors", "a.weight", "kind"), "unknown tensor kind"),
    (_set("nonsense", "reference", "mode"), "unknown reference mode"),
    (_set("float99", "tensors", "b.bias", "dtype"), "unknown dtype"),
    (_set(None, "tensors", "a.weight", "shape"), "corrupt manifest"),
    (_set(["not", "a", "dict"], "tensors"), "corrupt manifest"),
    (_set("z.weight", "tensors", "d.weight", "of"), "points at"),
    (_set("1", "version"), "no format version"),
    (_set("other-tool", "format"), "not an inrank-convert manifest"),
])
def test_a_damaged_manifest_is_one_artifact_error(tmp_path, change, says):
    out = tmp_path / "out"
    write_sample(out, sample_tensors())
    _rewrite_manifest(out, change)
    with pytest.raises(ArtifactError, match=says):
        read_manifest(out)


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


def _spooled(path, background: bool, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    from inrank_convert.weights.outputs import TensorFileWriter

    writer = TensorFileWriter(path, background=background)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    checksums = dict(writer.checksums)
    writer.finish({"format": "pt"})
    return checksums


def test_a_background_writer_writes_the_same_file(tmp_path):
    """Spooled on a writer thread (compress) or in the foreground (training checkpoints): the same
    bytes, tensors and checksums, in the order added."""
    generator = torch.Generator().manual_seed(0)
    tensors = {"b": torch.randn(300, 7, generator=generator).bfloat16(), "a": torch.randn(7, 50, generator=generator),
               "empty": torch.zeros(0, 4), "index": torch.arange(9)}
    foreground = _spooled(tmp_path / "f.safetensors", False, tensors)
    background = _spooled(tmp_path / "b.safetensors", True, tensors)
    assert foreground == background == {name: checksum(tensor) for name, tensor in tensors.items()}
    assert (tmp_path / "f.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as handle:
        assert list(handle.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["b.safetensors", "f.safetensors"]  # no spool left


def test_an_error_on_the_writer_thread_is_raised_by_the_next_call(tmp_path):
    """A spool write that fails on the writer thread (its file closed under it) is raised by the
    next add, and abort leaves nothing behind."""
    from inrank_convert.weights.outputs import TensorFileWriter

    writer = TensorFileWriter(tmp_path / "x.safetensors", background=True)
    writer.add("first", torch.ones(4))
    writer.checksums  # noqa: B018 -- waits for the first tensor
    writer._spool.close()  # the disk "fails" under the writer thread
    writer.add("second", torch.ones(4))  # queued; it fails on the thread
    with pytest.raises(ValueError, match="closed file"):
        writer.add("third", torch.ones(4))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_copy_rest_appends_what_the_reader_has_not_consumed(tmp_path):
    """The kernel copy starts where the buffered reader is, not where its read-ahead left the file
    descriptor (rewrite_manifest reads the old header first)."""
    from inrank_convert.weights.outputs import copy_rest

    payload = bytes(range(256)) * 4096  # 1 MiB, more than one read-ahead buffer
    (tmp_path / "source").write_bytes(payload)
    with open(tmp_path / "source", "rb") as source, open(tmp_path / "out", "wb") as out:
        assert source.read(1000) == payload[:1000]
        out.write(b"head")
        copy_rest(source, out)
    assert (tmp_path / "out").read_bytes() == b"head" + payload[1000:]
