"""A calibrated compress records each calibrated layer's output error on the calibration text
(``output_error`` beside the weight-space ``error``): the one measured directly on the layer's
inputs with the weights a reader builds, in every storage, shown by inspect."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from inrank_convert import PlanOptions, compress
from inrank_convert.artifact import read_manifest
from inrank_convert.compression.job import CalibrationRequest
from tests.conftest import RIVER_TEXT, make_pair
from tests.helpers.calibration import linear_layers, recorded_output_errors
from tests.helpers.cli_contract import expect_ok

TOKENS = 2048


@pytest.mark.parametrize(("arch", "quantize"), [("gpt2", "int8"), ("gpt2", "int4"), ("llama", "mixed")])
def test_recorded_output_error_is_what_the_calibration_texts_outputs_see(tmp_path, tokenizer_file, arch, quantize):
    pair = make_pair(tmp_path, arch)
    text = tmp_path / "river.txt"
    text.write_text(RIVER_TEXT)
    out = tmp_path / "artifact"
    compress(pair.trained_dir, out, init=pair.init_dir, options=PlanOptions(target_ratio=0.3, quantize=quantize),
             calibration=CalibrationRequest(text, TOKENS, tokenizer_file))
    manifest = read_manifest(out)
    found = recorded_output_errors(pair, out, RIVER_TEXT, tokenizer_file, TOKENS)
    # Every factorized Linear/Conv1D records one; the embeddings (no input Gram) do not.
    factorized = {name for name, entry in manifest.tensors.items() if entry.has_factors}
    projections = set(linear_layers(AutoModelForCausalLM.from_pretrained(pair.trained_dir)))
    assert found and set(found) == factorized & projections and factorized - projections
    for name, (recorded, measured) in found.items():
        assert recorded == pytest.approx(measured, rel=2e-3, abs=1e-6), name
    assert any(recorded > 1e-3 for recorded, _ in found.values())  # a budget of 30%: the errors are not nil
    # inspect shows it: a column in the table, a key per layer in --json.
    assert "output error" in expect_ok(["inspect", out]).stdout
    layers = {layer["name"]: layer for layer in json.loads(expect_ok(["inspect", out, "--json"]).stdout)["layers"]}
    assert {name: layers[name]["output_error"] for name in found} == {name: manifest.tensors[name].output_error
                                                                      for name in found}
