"""artifact/records.py: the manifest's source, reference, rule and training records, each to its own
JSON object and back; what each reference mode requires; a rule record without a size target reads
as before."""

from __future__ import annotations

import json

import pytest

from inrank_convert.artifact.fields import ManifestFormatError
from inrank_convert.artifact.records import ReferenceRecord, RuleRecord, SourceRecord, TrainingRecord
from inrank_convert.core.errors import ArtifactError
from inrank_convert.weights.checkpoints import FileHash

RECIPE = {"library": "transformers", "auto_class": "AutoModelForCausalLM", "seed": 3, "dtype": "float32",
          "config": {"model_type": "gpt2"}, "torch": "2.13.0", "transformers": "5.0.0"}


def through_json(record):
    return type(record).from_json(json.loads(json.dumps(record.to_json())))


@pytest.mark.parametrize("record", [
    SourceRecord("/models/ft", "safetensors", None, [FileHash("model.safetensors", 10, "aa" * 32)]),
    SourceRecord("/runs/r/step-9", "training", "/runs/r", []),
    ReferenceRecord("zero"),
    ReferenceRecord("reference", path="/models/init", files=[FileHash("model.safetensors", 10, "bb" * 32)]),
    ReferenceRecord("seed", recipe=RECIPE, tensors={"w": "cc" * 32}),
    ReferenceRecord("embedded", file="init.safetensors", tensors={"w": "dd" * 32},
                    source=ReferenceRecord("reference", path="/models/init", files=[])),
    RuleRecord("energy", 0.9),
    RuleRecord("inrank", 0.8, 16),
    RuleRecord("budget", 0.05, None, 4096),
], ids=lambda record: f"{type(record).__name__}-{getattr(record, 'kind', None) or getattr(record, 'mode', None) or record.criterion}")
def test_each_record_round_trips_through_its_json(record):
    assert through_json(record) == record


def test_training_record_and_source_kind():
    assert TrainingRecord(12, "inrank").to_json() == {"step": 12, "mode": "inrank"}
    assert SourceRecord("/runs/r", "training").is_training
    assert not SourceRecord("/models/ft", "safetensors").is_training
    # A source written without its kind (an early writer) reads as a plain checkpoint.
    assert SourceRecord.from_json({"path": "/models/ft"}).kind == "checkpoint"


def test_an_unknown_reference_mode_is_an_artifact_error_that_says_upgrade():
    with pytest.raises(ArtifactError, match="unknown reference mode 'remote'") as caught:
        ReferenceRecord.from_json({"mode": "remote"})
    assert "upgrade" in str(caught.value)


@pytest.mark.parametrize("values,says", [
    ({"mode": "reference"}, "reference.path is missing"),
    ({"mode": "seed"}, "reference.recipe is missing"),
    ({"mode": "seed", "recipe": {"config": {}}}, "reference.recipe.seed is missing"),
    ({"mode": "seed", "recipe": {"seed": 1}}, "reference.recipe.config is missing"),
    ({"mode": "embedded", "tensors": {}}, "reference.file is missing"),
    ({"mode": "zero", "tensors": {"w": 5}}, "maps a name to something other than a string"),
    ({"mode": "embedded", "file": "init.safetensors", "source": {"mode": "reference"}}, "reference.source.path is missing"),
])
def test_what_each_reference_mode_needs_is_checked(values, says):
    with pytest.raises(ManifestFormatError, match=says.replace(".", r"\.")):
        ReferenceRecord.from_json(values)


def test_rule_record_without_a_target_reads_as_before():
    old = {"criterion": "energy", "threshold": 0.9, "rank": None}
    record = RuleRecord.from_json(old)
    assert record.target_bytes is None and record.to_json() == old and record.describe() == "energy>=0.9"
    budget = RuleRecord("budget", 0.1, None, 12345)
    assert RuleRecord.from_json(budget.to_json()) == budget and "12345" in budget.describe()
    assert RuleRecord("inrank", 0.8, 16).describe() == "rank=16"


@pytest.mark.parametrize("values,says", [
    ({"threshold": 0.9}, "rule.criterion is missing"),
    ({"criterion": "energy", "threshold": "0.9"}, "rule.threshold is \"0.9\", not a finite number"),
    ({"criterion": "energy", "threshold": 0.9, "rank": -1}, "rule.rank is -1, below 0"),
])
def test_a_damaged_rule_names_its_key(values, says):
    with pytest.raises(ManifestFormatError, match=says.replace(".", r"\.")):
        RuleRecord.from_json(values)
