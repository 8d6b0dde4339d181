"""The scale benchmark's pair builder (benchmarks/bench_scale.py), at a toy size: sharded safetensors
with an index and a LLaMA config.json that compress reads as one checkpoint and verify accepts."""

from __future__ import annotations

import json

from benchmarks.bench_scale import build_pair, config, shard_shapes
from tests.helpers.cli_contract import expect_ok, run_json


def test_the_scale_pair_is_a_sharded_llama_checkpoint_compress_reads(tmp_path):
    shards = shard_shapes(layers=2, hidden=32, intermediate=64, vocab=50)
    model_config = {**config(2), "hidden_size": 32, "intermediate_size": 64, "vocab_size": 50,
                    "num_attention_heads": 4, "num_key_value_heads": 4}
    init, trained = build_pair(tmp_path, shards, model_config)
    index = json.loads((trained / "model.safetensors.index.json").read_text())
    assert len({file for file in index["weight_map"].values()}) == len(shards) == 4
    out = tmp_path / "artifact"
    result = run_json(["compress", trained, "--init", init, "-o", out, "--rank", "4", "--json"])
    factorized = [layer for layer in result["layers"] if layer["kind"] == "lowrank"]
    assert len(factorized) == 2 * 7 + 2 and all(layer["dtype"] == "bfloat16" for layer in factorized)
    assert json.loads(expect_ok(["verify", out, "--json"]).stdout)["ok"]
