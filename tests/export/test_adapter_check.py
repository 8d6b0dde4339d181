"""export/adapter_check.py (``export-peft --data``): the reference, base + adapter and artifact
perplexities on the same tokens, for the exact adapter (base + adapter is the artifact) and the vLLM
one (its drops cost something), and an artifact that is not there refused before any text is read."""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli_contract import expect_error, expect_ok

pytest.importorskip("peft")


def test_cli_vllm_json_stderr_and_perplexities(llama, tokenizer_and_text, tmp_path):
    pair, out, _ = llama
    tokenizer, text = tokenizer_and_text
    result = expect_ok(["export-peft", out, "-o", tmp_path / "adapter", "--target", "vllm", "--max-rank", "3",
                        "--data", text, "--tokenizer", tokenizer, "--max-tokens", "256", "--json"])
    payload = json.loads(result.stdout)
    assert payload["target"] == "vllm" and payload["max_rank"] == 3 and payload["max_lora_rank"] == 8
    assert payload["modules_to_save"] == [] and payload["biases"] == []
    # LLaMA: vLLM serves the embedding and head LoRAs, under the same cap as the projections.
    assert {d["what"] for d in payload["dropped"]} == {"norm", "truncated"}
    assert {"model.embed_tokens", "lm_head"} <= set(payload["target_modules"])
    scores = payload["perplexity"]
    assert scores["tokens"] == 256 and scores["context"] == 64
    assert all(scores[key] > 1 for key in ("reference", "adapter", "artifact"))
    assert scores["adapter"] != pytest.approx(scores["artifact"], rel=1e-4)  # the norms and the rank cap cost something
    assert scores["adapter_change_percent"] == pytest.approx(100 * (scores["adapter"] / scores["artifact"] - 1))
    # stderr: one warning line, then one indented line per kind of drop
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("warning: the vllm adapter leaves out") and len(lines) == 3
    assert [line.split()[1] for line in lines[1:]] == ["truncated", "norm"]

    # The exact adapter measured the same way: base + adapter is the artifact.
    table = expect_ok(["export-peft", out, "-o", tmp_path / "exact", "--data", text, "--tokenizer", tokenizer,
                       "--max-tokens", "256"])
    assert "base + peft adapter" in table.stdout and "artifact" in table.stdout and "Perplexity on" in table.stdout
    exact = json.loads(expect_ok(["export-peft", out, "-o", tmp_path / "exact2", "--data", text, "--tokenizer",
                                  tokenizer, "--max-tokens", "256", "--json"]).stdout)["perplexity"]
    assert exact["adapter"] == pytest.approx(exact["artifact"], rel=1e-5)
    assert exact["artifact"] == pytest.approx(scores["artifact"], rel=1e-6)
    assert exact["reference"] == pytest.approx(scores["reference"], rel=1e-6)
    assert exact["reference"] != pytest.approx(exact["artifact"], rel=1e-3)
    text_out = expect_ok(["export-peft", out, "-o", tmp_path / "plain", "--target", "vllm"]).stdout
    assert "--max-lora-rank 8" in text_out


def test_missing_artifact_with_data(tokenizer_and_text, tmp_path):
    tokenizer, text = tokenizer_and_text
    expect_error(["export-peft", tmp_path / "nope", "-o", tmp_path / "a", "--target", "vllm", "--data", text,
                  "--tokenizer", tokenizer], says=("no such artifact",), output=tmp_path / "a", inputs=(text,))
