"""inrank-convert demo end to end on tiny settings: real data, its fallback, and a second run."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from inrank_convert.cli import app
from inrank_convert.core.errors import StoppedError
from inrank_convert.demo import DemoSettings, run_demo
from tests.conftest import SHARED_DATA

TINY = ["--steps", "4", "--resume-steps", "2", "--eval-tokens", "256", "--n-embd", "32", "--n-layer", "1"]
HAS_DATA = (SHARED_DATA / "gpt2-tokenizer" / "vocab.json").is_file() and \
    (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").is_file()


def run_cli(args: list) -> object:
    return CliRunner().invoke(app, [str(arg) for arg in args])


def check_outputs(out: Path, summary: dict) -> None:
    for name in ("dense/step-4", "inrank/step-4", "dense-artifact", "inrank-artifact", "resumed/step-2", "continued/step-2"):
        assert (out / name).is_dir(), name
    assert (out / "runs.png").stat().st_size > 0 and (out / "report.png").stat().st_size > 0
    models = summary["measured"]["models"]
    assert len(models) == 6  # dense, its artifact, InRank, its artifact, the resumed and the continued model
    for row in models:
        assert row["perplexity"] > 1 and row["bytes"] > 0
    dense, inrank, resumed, continued = summary["story"]
    assert dense["steps"] == inrank["steps"] == 4 and resumed["steps"] == continued["steps"] == 2
    # The story's numbers are the runs' own: validation from metrics.jsonl, perplexity from the report.
    runs = summary["comparison"]["runs"]
    assert dense["val_perplexity"] == pytest.approx(runs[0]["final_val_perplexity"])
    assert inrank["val_perplexity"] == pytest.approx(runs[1]["final_val_perplexity"])
    by_path = {row["path"]: row["perplexity"] for row in models}
    assert inrank["artifact_perplexity"] == by_path[summary["inrank_artifact"]["output"]]
    assert dense["checkpoint_perplexity"] == by_path[summary["dense"]["checkpoints"][-1]]
    assert dense["rank_fraction_final"] is None and 0 < inrank["rank_fraction_final"] <= 0.5
    assert inrank["total_rank"] == summary["inrank"]["total_rank"] > 0
    assert 0 < dense["artifact_bytes"] < dense["checkpoint_bytes"]
    types = {row["type"] for row in summary["ranks"]}
    assert {"attn.c_attn", "mlp.c_fc"} <= types
    assert resumed["total_rank"] >= resumed["start_total_rank"]
    # The continuation is the dense run's last checkpoint trained on: every parameter, on the resumed run's tokens.
    assert continued["val_perplexity"] == pytest.approx(math.exp(summary["continued"]["val_loss"]))
    assert continued["trainable_parameters"] == summary["dense"]["trainable_parameters"] > 0 < resumed["trainable_parameters"]
    assert continued["checkpoint_perplexity"] == by_path[summary["continued"]["checkpoints"][-1]]


@pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data (GPT-2 tokenizer, Tiny Shakespeare, WikiText-2)")
def test_demo_on_the_shared_data_and_again_into_the_same_folder(tmp_path):
    out = tmp_path / "demo"
    first = run_cli(["demo", "--out", out, *TINY])
    assert first.exit_code == 0, first.output
    summary = json.loads((out / "demo.json").read_text())
    assert summary["data"]["source"] == "shared"
    check_outputs(out, summary)
    assert "Dense vs InRank" in first.stdout and "InRank, compressed" in first.stdout and "resumed InRank" in first.stdout
    stale = out / "dense-artifact" / "stale-marker"
    stale.write_text("from the first run")
    second = run_cli(["demo", "--out", out, *TINY, "--json"])
    assert second.exit_code == 0, second.output
    assert not stale.exists()  # replaced, not mixed with the first run's outputs
    check_outputs(out, json.loads(second.stdout))


@pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data (GPT-2 tokenizer, Tiny Shakespeare, WikiText-2)")
def test_a_stop_request_during_a_stage_ends_the_demo_there(tmp_path):
    # Ctrl-C during the first training: that run saves a checkpoint and ends early; the demo must not
    # go on to train the InRank run and compare it with a partial dense run.
    out = tmp_path / "demo"
    settings = DemoSettings(out=out, steps=4, resume_steps=2, eval_tokens=256, n_embd=32, n_layer=1, n_head=1,
                            block_size=16, batch_size=4)
    asked = []

    def stop_once(record: dict) -> None:
        if not asked:
            asked.append(record["step"])
            os.kill(os.getpid(), signal.SIGINT)  # the loop's handler turns it into a stop request

    with pytest.raises(StoppedError) as stopped:
        run_demo(settings, on_step=stop_once)
    assert stopped.value.exit_code == 130 and "dense" in stopped.value.message
    assert (out / "dense").is_dir() and not (out / "inrank").exists()
    assert json.loads((out / "demo.json").read_text()) == {}  # the folder's claim only, no results


def test_demo_without_the_data_folder_trains_a_tokenizer_and_says_so(tmp_path):
    notes = []
    settings = DemoSettings(out=tmp_path / "demo", data_dir=tmp_path / "no-such-data", steps=4, resume_steps=2,
                            eval_tokens=256, n_embd=32, n_layer=1, n_head=1, block_size=16, batch_size=4,
                            fallback_chars=300_000)
    result = run_demo(settings, on_stage=notes.append)
    assert result.data.source == "fallback"
    assert any("no-such-data" in note and "missing or unreadable" in note for note in notes)
    assert any("standard library" in note for note in notes)
    check_outputs(tmp_path / "demo", result.to_json())
    assert (tmp_path / "demo" / "fallback-data" / "tokenizer" / "tokenizer.json").is_file()


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    result = run_cli(["demo", "--out", tmp_path / "mine", *TINY])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "not written by the demo" in result.stderr
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
