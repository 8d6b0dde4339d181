"""training/checkpoint.py: an InRank run's step folders are artifacts that inspect, report and
decompress read, their LowRankLinear model computing the merged one."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.artifact import describe_artifact
from inrank_convert.export.dense import decompress
from inrank_convert.runtime.modeling import load_compressed
from tests.helpers.training import HAS_DATA

pytestmark = pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data (GPT-2 tokenizer and Tiny Shakespeare)")


def test_checkpoints_are_artifacts_that_inspect_report_and_decompress_read(inrank_run, tmp_path):
    run, _ = inrank_run
    described = describe_artifact(run / "step-12")
    assert described["reference"] == "seed"
    kinds = {layer["name"]: layer["kind"] for layer in described["layers"]}
    assert kinds["transformer.h.0.attn.c_attn.weight"] == "lowrank"
    assert described["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    decompress(run / "step-12", tmp_path / "dense")
    model = load_compressed(run / "step-12")
    dense = load_compressed(run / "step-12", merge=True)
    ids = torch.arange(16)[None]
    assert torch.allclose(model(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5)
