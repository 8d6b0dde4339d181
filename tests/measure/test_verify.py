"""measure/verify.py through ``verify``: every layer of a grown-vocabulary artifact measured against
its source, damaged rows and int8 scales refused in one line, and a version-1 artifact (written by
hand, helpers/old_artifact.py) verified, its old checksums really checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from inrank_convert import load_compressed, read_manifest
from inrank_convert.artifact import ARTIFACT_FILE
from inrank_convert.artifact.format import MANIFEST_KEY
from inrank_convert.cli import app
from inrank_convert.core.errors import ArtifactError
from inrank_convert.core.tensors import checksum
from inrank_convert.measure.verify import verify_artifact
from tests.helpers.cli_contract import expect_error, expect_ok, run_json
from tests.helpers.old_artifact import ALIAS
from tests.helpers.rows import VOCAB, WTE


def test_grown_vocabulary_verifies_every_layer(grown):
    pair, out = grown
    payload = run_json(["verify", out, "--json"])
    assert payload["ok"] and payload["source_checked"], payload
    stored = read_manifest(out).stored_entries()
    assert stored and {layer["name"] for layer in payload["layers"]} == set(stored)
    for layer in payload["layers"]:
        assert layer["measured_error"] is not None and layer["measured_error"] <= layer["expected_error"] + 1e-3, layer
    for name in pair.grown:
        [layer] = [layer for layer in payload["layers"] if layer["name"] == name]
        # Measured against trained - base padded with zero rows: the recorded error, not 0 or 1.
        assert 0.0 < layer["measured_error"] < 1.0
        assert layer["measured_error"] == pytest.approx(stored[name].error, rel=1e-3, abs=1e-5)


def rewrite(artifact: Path, change) -> None:
    """Rewrite the artifact file after ``change(tensors)``, with checksums recomputed, so that only
    the structure is wrong (what a buggy writer would produce)."""
    file = artifact / ARTIFACT_FILE
    with safe_open(str(file), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = dict(handle.metadata())
    change(tensors)
    manifest = json.loads(metadata[MANIFEST_KEY])
    manifest["checksums"] = {name: checksum(tensor) for name, tensor in tensors.items()}
    metadata[MANIFEST_KEY] = json.dumps(manifest)
    save_file(tensors, str(file), metadata=metadata)


def damaged_copy(out: Path, folder: Path, change) -> Path:
    copy = folder / "damaged"
    shutil.copytree(out, copy)
    rewrite(copy, change)
    return copy


@pytest.mark.parametrize("damage,says", [
    ("out of range", ("row_index", "outside")),
    ("repeated", ("row_index", "repeats")),
])
def test_verify_refuses_a_bad_row_index(drifted, tmp_path, damage, says):
    _, _, out, _ = drifted
    index_name = WTE + ".row_index"

    def change(tensors):
        index = tensors[index_name].clone()
        assert index.numel() >= 2
        index[-1] = VOCAB if damage == "out of range" else index[0]
        tensors[index_name] = index

    copy = damaged_copy(out, tmp_path, change)
    line = expect_error(["verify", copy], says=(*says, "re-run compress"), inputs=(copy,))
    assert line.startswith("error: verification failed")
    result = verify_artifact(copy)
    assert not result.ok and result.damaged and "row_index" in result.problem()
    assert not result.layers  # nothing measured on a damaged file
    for args in (["inspect", copy], ["verify", out]):
        expect_ok(args)  # inspect reads the header alone; the original is untouched
    with pytest.raises(ArtifactError, match="row_index"):
        load_compressed(copy)


@pytest.mark.parametrize("drifted", ["int8"], indirect=True)  # scales exist in int8 artifacts only
def test_verify_refuses_a_missing_or_wrong_int8_scale(drifted, tmp_path):
    _, _, out, quantize = drifted
    assert quantize == "int8"
    missing = damaged_copy(out, tmp_path / "missing", lambda tensors: tensors.pop(WTE + ".rows_scale"))
    expect_error(["verify", missing], says=("rows_scale", "lacks"), inputs=(missing,))

    def shorten(tensors):
        tensors[WTE + ".lora_scale"] = torch.ones(2)  # rank 1: one scale expected

    wrong = damaged_copy(out, tmp_path / "wrong", shorten)
    # Refused when the artifact is opened, from the header alone: the scale's shape against the rank.
    line = expect_error(["verify", wrong], says=("lora_scale", "rank 1"), inputs=(wrong,))
    assert "is F32 [2]" in line and "needs" in line and line.endswith("[1]: " + str(wrong / "inrank.safetensors")
                                                                      + " (the file is damaged: re-run compress)")


# --------------------------------------------------------------------------- a version-1 artifact


def test_old_artifact_inspects_and_verifies(old):
    inspected = run_json(["inspect", old.path, "--json"])
    assert inspected["version"] == 1 and inspected["reference"] == old.manifest["reference"]["mode"]
    assert inspected["tied"] == {ALIAS[0]: ALIAS[1]}
    assert inspected["original_bytes"] == old.manifest["original_bytes"]
    assert [layer["name"] for layer in inspected["layers"]] == [n for n in old.manifest["tensors"] if n != ALIAS[0]]

    verified = run_json(["verify", old.path, "--json"])
    assert verified["ok"] and verified["checksums_ok"] and verified["reference_ok"], verified
    assert verified["source_checked"], verified["source"]  # the recorded source is found, hashes unchanged
    layers = verified["layers"]
    assert {layer["name"] for layer in layers} == {n for n in old.manifest["tensors"] if n != ALIAS[0]}
    for layer in layers:
        assert layer["measured_error"] <= 1e-6, layer


def test_old_artifact_verify_catches_a_changed_factor(old):
    """The old checksums are really checked: change one stored factor and verify fails."""
    from safetensors import safe_open

    file = old.path / "inrank.safetensors"
    with safe_open(str(file), "pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata()
    name = "transformer.h.0.mlp.c_fc.weight.lora_A"
    stored[name] = stored[name].clone()
    stored[name][0, 0] += 1.0
    save_file(stored, str(file), metadata=metadata)
    result = CliRunner().invoke(app, ["verify", str(old.path), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["bad_checksums"] == [name]
