"""inrank-convert demo end to end on tiny settings: real data, its fallback, and a second run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from typer.testing import CliRunner

from inrank_convert.cli import app
from inrank_convert.demo import DemoSettings, run_demo

TINY = ["--steps", "4", "--resume-steps", "2", "--eval-tokens", "256", "--n-embd", "32", "--n-layer", "1"]
HAS_DATA = (SHARED_DATA / "gpt2-tokenizer" / "vocab.json").is_file() and \
    (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").is_file()


def run_cli(args: list) -> object:
    return CliRunner().invoke(app, [str(arg) for arg in args])


def check_outputs(out: Path, summary: dict, expect_ranks: bool = True) -> None:
    for name in ("run/step-0", "run/step-4", "artifact-t0.9", "artifact-t0.99", "inrank/step-2", "resumed-artifact"):
        assert (out / name).is_dir(), name
    assert (out / "report.png").stat().st_size > 0 and (out / "report-resumed.png").stat().st_size > 0
    models = {row["path"]: row for stage in ("before", "after") for row in summary[stage]["models"]}
    assert len(models) == 5  # dense, two artifacts, the resumed model and its compressed form
    for row in models.values():
        assert row["perplexity"] > 1 and row["bytes"] > 0
    sizes = [a["compressed_bytes"] for a in summary["artifacts"]]
    assert sizes[0] < sizes[1]  # the lower threshold keeps less
    types = {row["type"] for row in summary["ranks"]}
    assert {"attn.c_attn", "mlp.c_fc"} <= types
    assert summary["resumed"]["step"] == 2
    # After 4 steps at t=0.99 a tiny model's updates may be stored dense (no rank to grow): only with real data.
    assert summary["resumed"]["total_rank"] > 0 or not expect_ranks


@pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data (GPT-2 tokenizer, Tiny Shakespeare, WikiText-2)")
def test_demo_on_the_shared_data_and_again_into_the_same_folder(tmp_path):
    out = tmp_path / "demo"
    first = run_cli(["demo", "--out", out, *TINY])
    assert first.exit_code == 0, first.output
    summary = json.loads((out / "demo.json").read_text())
    assert summary["data"]["source"] == "shared"
    check_outputs(out, summary)
    assert "Mean rank per layer type" in first.stdout and "resumed, compressed" in first.stdout and "resumed InRank" in first.stdout
    stale = out / "artifact-t0.9" / "stale-marker"
    stale.write_text("from the first run")
    second = run_cli(["demo", "--out", out, *TINY, "--json"])
    assert second.exit_code == 0, second.output
    assert not stale.exists()  # replaced, not mixed with the first run's outputs
    check_outputs(out, json.loads(second.stdout))


def test_demo_without_the_data_folder_trains_a_tokenizer_and_says_so(tmp_path):
    notes = []
    settings = DemoSettings(out=tmp_path / "demo", data_dir=tmp_path / "no-such-data", steps=4, resume_steps=2,
                            eval_tokens=256, n_embd=32, n_layer=1, n_head=1, block_size=16, batch_size=4,
                            fallback_chars=300_000)
    result = run_demo(settings, on_stage=notes.append)
    assert result.data.source == "fallback"
    assert any("no-such-data" in note and "missing or unreadable" in note for note in notes)
    assert any("standard library" in note for note in notes)
    check_outputs(tmp_path / "demo", result.to_json(), expect_ranks=False)
    assert (tmp_path / "demo" / "fallback-data" / "tokenizer" / "tokenizer.json").is_file()


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    result = run_cli(["demo", "--out", tmp_path / "mine", *TINY])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "not written by the demo" in result.stderr
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
