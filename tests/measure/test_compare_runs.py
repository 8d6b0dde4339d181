"""measure/compare_runs.py (``compare-runs``): two real training runs (tiny GPT-2, GPT-2 tokenizer,
Tiny Shakespeare) side by side; its JSON against the runs' own metrics.jsonl, the --data scoring
against report's perplexity, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from inrank_convert.inputs.text import load_tokenizer, read_text, tokenize_text
from inrank_convert.runtime.evaluate import perplexity
from inrank_convert.runtime.modeling import load_dense, model_config
from inrank_convert.training.entrypoints import train
from inrank_convert.training.options import TrainOptions
from inrank_convert.weights.run_folder import read_metrics
from tests.conftest import GPT2_TOKENIZER_DIR, REAL_TEXT, needs_real_data, saved_byte_level_bpe
from tests.helpers.cli_contract import expect_error, expect_ok

pytestmark = needs_real_data
STEPS = 12


def tiny_config(folder: Path, layers: int = 2) -> Path:
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=layers, n_head=2, n_positions=32, vocab_size=50257, bos_token_id=50256,
               eos_token_id=50256).save_pretrained(folder)
    return folder / "config.json"


def run_of(root: Path, name: str, mode: str, *, layers: int = 2, tokenizer: Path = GPT2_TOKENIZER_DIR,
           steps: int = STEPS, texts: Path | None = None) -> Path:
    """A run of ``steps`` steps into ``root / name`` on ``texts``' train.txt / val.txt (default: ``root``'s)."""
    texts = texts or root
    config = tiny_config(root / f"config-{name}", layers)
    train(config, root / name, TrainOptions(data=str(texts / "train.txt"), val_data=str(texts / "val.txt"), steps=steps,
                                            mode=mode, batch_size=4, block_size=16, lr=3e-3, log_every=2,
                                            save_every=6, tokenizer=str(tokenizer), buffer=2, rank_warmup=3,
                                            rank_every=3, seed=3))
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    text = REAL_TEXT.read_text()
    (root / "train.txt").write_text(text[:60_000])
    (root / "val.txt").write_text(text[-20_000:])
    return root, run_of(root, "dense", "dense"), run_of(root, "inrank", "inrank")


def test_compare_runs_json_equals_the_metrics_and_scores_every_common_step(runs, tmp_path):
    root, dense, inrank = runs
    result = expect_ok(["compare-runs", dense, inrank, "--data", root / "val.txt", "--max-tokens", "1024",
                        "--plot", tmp_path / "runs.png", "--json"])
    compared = json.loads(result.stdout)
    assert compared["same_val_data"] is True and compared["data_tokens"] == 1024
    assert (tmp_path / "runs.png").stat().st_size > 10_000
    by_label = {run["label"]: run for run in compared["runs"]}
    assert set(by_label) == {"dense", "inrank"}
    for label, folder in (("dense", dense), ("inrank", inrank)):
        shown, records = by_label[label], read_metrics(folder)
        assert shown["final_step"] == STEPS and shown["mode"] == label
        assert [(p["step"], p["val_loss"]) for p in shown["val_curve"]] == \
            [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        assert shown["val_curve"], "the runs evaluated on --val-data"
        speeds = [r["tokens_per_second"] for r in records[1:]]
        assert shown["tokens_per_second"] == pytest.approx(sum(speeds) / len(speeds))
        assert shown["final_val_perplexity"] == pytest.approx(math.exp(shown["final_val_loss"]))
        assert [p["step"] for p in shown["data_curve"]] == [6, 12]
    # The default recipe's dense warm-up steps (2 of 12) hold every rank: they count as the full rank, 128.
    ranks = [(r["step"], r["total_rank"] if "total_rank" in r else 128) for r in read_metrics(inrank)
             if "total_rank" in r or r.get("dense_warmup")]
    shown = by_label["inrank"]
    assert ranks and ranks[0] == (1, 128) and [(p["step"], p["total_rank"]) for p in shown["rank_curve"]] == ranks
    # Full rank: the 4 factorized MLP matrices (the default) of a 2x32 GPT-2, min(rows, cols) = 32 each.
    assert shown["full_rank"] == 4 * 32
    assert shown["final_rank_fraction"] == pytest.approx(ranks[-1][1] / 128)
    assert by_label["dense"]["rank_curve"] == [] and by_label["dense"]["final_rank_fraction"] is None
    # The --data column is report's perplexity of the final checkpoint on the same tokens.
    final = dense / f"step-{STEPS}"
    tokens = tokenize_text(read_text(root / "val.txt"), load_tokenizer(None, GPT2_TOKENIZER_DIR), 1024)
    expected = perplexity(load_dense(final, model_config(final)), tokens).perplexity
    assert by_label["dense"]["data_curve"][-1]["perplexity"] == pytest.approx(expected, rel=1e-9)
    table = expect_ok(["compare-runs", dense, inrank]).stdout
    assert "total rank / full rank" in table and "dense (dense)" in table


def test_compare_runs_bad_input(runs, tmp_path, small_tokenizer):
    root, dense, inrank = runs
    no_metrics = tmp_path / "no-metrics"
    shutil.copytree(dense, no_metrics)
    (no_metrics / "metrics.jsonl").unlink()
    expect_error(["compare-runs", no_metrics, inrank], ("no metrics", "no-metrics"), inputs=(no_metrics, inrank))
    expect_error(["compare-runs", tmp_path / "nowhere", inrank], ("no such run folder",))
    other = run_of(tmp_path, "one-layer", "dense", layers=1, steps=6, texts=root)
    expect_error(["compare-runs", dense, other], ("different architectures", "n_layer"), inputs=(dense, other))
    retokenized = run_of(tmp_path, "bpe", "dense", tokenizer=small_tokenizer, steps=6, texts=root)
    expect_error(["compare-runs", dense, retokenized], ("different tokenizers",), inputs=(dense, retokenized))
    expect_error(["compare-runs", dense, inrank, "--data", tmp_path / "missing.txt"], ("no such",))


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> Path:
    """Another real tokenizer (a 320-id byte-level BPE trained on the text): ids fit the 50257 vocabulary."""
    return saved_byte_level_bpe(REAL_TEXT.read_text()[:50_000], tmp_path_factory.mktemp("bpe"))
