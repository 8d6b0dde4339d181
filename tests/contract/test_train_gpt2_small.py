"""The GPT-2-small training benchmark: its commands are ones the CLI accepts at GPT-2 small's shape,
it refuses a GPU it does not have in one line, and a tiny CPU run of it gives its table."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import train_gpt2_small as bench
from inrank_convert.cli.app import app

HAS_DATA = (bench.DATA / "tinyshakespeare" / "input.txt").is_file() and (bench.DATA / "gpt2-tokenizer").is_dir()


def test_rows_at_gpt2_small_shape_parse(tmp_path, capsys):
    from typer.main import get_command

    assert bench.main(["--list", "--out", str(tmp_path)]) == 0
    listed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert list(listed) == [row.name for row in bench.ROWS]
    click_command = get_command(app)
    for row in bench.ROWS:
        args = bench.command(row, tmp_path, bench.Shape(), 1000, "cuda", "bfloat16", bench.DATA)[3:]
        assert listed[row.name] == " ".join(["inrank_convert", *args])
        params = click_command.commands["train"].make_context("train", args[1:]).params
        assert (params["device"], params["dtype"], params["block_size"]) == ("cuda", "bfloat16", 256)
        assert params["output"] == tmp_path / row.name
        assert params["efficient"] == row.efficient
        if row.inrank:
            assert (params["mode"], params["buffer"]) == ("inrank", 96)
        assert params["max_rank"] == (128 if row.capped else None)
    assert not (tmp_path / "config").exists()  # --list writes nothing


def test_an_unknown_row_is_one_line(tmp_path, capsys):
    assert bench.main(["no-such-row", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown row 'no-such-row'; rows: " + ", ".join(row.name for row in bench.ROWS))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.skipif(not HAS_DATA, reason=f"needs the shared data in {bench.DATA}")
def test_cuda_without_a_gpu_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert bench.main(["dense", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device cuda but torch sees no CUDA device")
    assert not out.exists()


@pytest.mark.skipif(not HAS_DATA, reason=f"needs the shared data in {bench.DATA}")
def test_a_tiny_cpu_run_gives_the_table(tmp_path, capsys):
    out = tmp_path / "out"
    tiny = ["--device", "cpu", "--dtype", "float32", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
            "--block", "16", "--batch", "4", "--steps", "20"]
    assert bench.main(["efficient-r128", "--out", str(out), *tiny]) == 0  # runs dense first: the baseline
    printed = capsys.readouterr().out
    rows = {row["row"]: row for row in json.loads((out / "table.json").read_text())}
    assert set(rows) == {"dense", "efficient-r128"}
    dense, capped = rows["dense"], rows["efficient-r128"]
    assert dense["change_percent"] == 0 and math.isfinite(capped["change_percent"])
    assert capped["rank_final"] == pytest.approx(5 / 32)  # both MLP matrices capped at 32 // 6 = 5 of their 32
    # The dense warm-up (20 / 5 = 4 steps) counts as full rank in the mean.
    assert capped["rank_final"] < capped["rank_mean"] < 1
    assert capped["trainable_parameters"] < dense["trainable_parameters"]
    for row in rows.values():
        assert 0 < row["step_seconds"] < 60 and row["best_val_perplexity"] <= row["val_perplexity"]
    assert "| efficient-r128 |" in printed and " ms |" in printed
    config = json.loads((out / "config" / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_positions"]) == (1, 32, 16)
