"""artifact/manifest.py: the typed manifest to JSON and back, every optional record included; a newer
format version and every kind of damage are one ArtifactError; version-1 manifests (of compress
and of training checkpoints) keep every key; the creation time, and $SOURCE_DATE_EPOCH."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
import torch

from inrank_convert.artifact import (
    FORMAT_VERSION,
    Manifest,
    ReferenceRecord,
    RuleRecord,
    SourceRecord,
    TensorEntry,
    TrainingRecord,
    read_manifest,
)
from inrank_convert.artifact.manifest import SOURCE_DATE_EPOCH, creation_time
from inrank_convert.core.errors import ArtifactError, UsageError
from tests.helpers.artifact_samples import rewrite_manifest, sample_tensors, write_sample
from tests.helpers.old_artifact import key_paths


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


def test_a_newer_version_is_refused(tmp_path):
    out = tmp_path / "out"
    write_sample(out, sample_tensors())
    rewrite_manifest(out, lambda values: values.update(version=FORMAT_VERSION + 1))
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
    rewrite_manifest(out, change)
    with pytest.raises(ArtifactError, match=says):
        read_manifest(out)


def test_old_manifest_keeps_every_key(old):
    raw = old.manifest
    again = Manifest.from_json(json.loads(json.dumps(raw))).to_json()
    lost = key_paths(raw) - key_paths(again)
    assert not lost, f"keys of the old manifest dropped: {sorted(lost)}"
    assert again["checksums"] == raw["checksums"]
    assert again == raw


@pytest.mark.parametrize("reference", [
    {"mode": "zero"},
    {"mode": "reference", "path": "/models/init", "files": [{"file": "model.safetensors", "bytes": 10, "sha256": "aa" * 32}]},
    {"mode": "seed", "recipe": {"library": "transformers", "auto_class": "AutoModelForCausalLM", "seed": 3,
                                "dtype": "float32", "config": {"model_type": "gpt2"}, "torch": "2.5.0",
                                "transformers": "4.46.0"}, "tensors": {"w": "bb" * 32}},
    {"mode": "embedded", "file": "init.safetensors", "tensors": {"w": "cc" * 32},
     "source": {"mode": "reference", "path": "/models/init", "files": []}},
], ids=["zero", "reference", "seed", "embedded"])
def test_old_training_checkpoint_manifest_round_trips(reference):
    """The old train_state.save_checkpoint layout: source kind "training", a training record, no svd keys."""
    raw = {
        "format": "inrank-convert", "version": 1, "tool_version": "0.1.0", "created": "2025-01-02T03:04:05+00:00",
        "source": {"path": "/runs/r", "kind": "training", "run": "/runs/r", "files": []},
        "reference": reference, "rule": {"criterion": "inrank", "threshold": 0.9, "rank": None},
        "training": {"step": 12, "mode": "inrank"}, "original_bytes": 96,
        "tensors": {"w": {"kind": "lowrank", "shape": [4, 6], "dtype": "float32", "rank": 2, "energy": 1.0,
                          "bytes": 80, "original_bytes": 96, "svd": None},
                    "b": {"kind": "dense", "shape": [4], "dtype": "float32", "rank": None, "energy": 1.0,
                          "bytes": 16, "original_bytes": 16, "svd": None}},
        "checksums": {"w.lora_B": "01" * 32, "w.lora_A": "02" * 32, "b": "03" * 32},
    }
    manifest = Manifest.from_json(json.loads(json.dumps(raw)))
    assert manifest.source.is_training and manifest.training.step == 12
    assert manifest.reference.mode == reference["mode"]
    again = manifest.to_json()
    assert not key_paths(raw) - key_paths(again)
    assert again == raw



def test_created_is_now_in_utc_to_the_second(monkeypatch):
    monkeypatch.delenv(SOURCE_DATE_EPOCH, raising=False)
    before = datetime.now(timezone.utc).replace(microsecond=0)
    created = datetime.fromisoformat(creation_time())
    assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0
    assert before <= created <= datetime.now(timezone.utc)


def test_created_follows_source_date_epoch(monkeypatch):
    monkeypatch.setenv(SOURCE_DATE_EPOCH, "1796515200")
    assert creation_time() == "2026-12-06T00:00:00+00:00"
    assert _manifest_of_every_record().created == "2026-12-06T00:00:00+00:00"


@pytest.mark.parametrize("value", ["yesterday", "-5", "1.5", ""])
def test_a_malformed_source_date_epoch_is_one_usage_error(monkeypatch, value):
    monkeypatch.setenv(SOURCE_DATE_EPOCH, value)
    with pytest.raises(UsageError, match="SOURCE_DATE_EPOCH must be a whole number of seconds"):
        creation_time()
