"""training/loop.py: a rank decision grows the factors and leaves the function unchanged, stage 2
(--stage2-at) freezes the ranks, and SIGINT stops at a checkpoint the resumed run continues exactly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from inrank_convert.core.distributed import World
from inrank_convert.training.entrypoints import resume, train
from inrank_convert.training.loop import decide_ranks
from inrank_convert.training.rank_control import RankController, RankPolicy, factorize_model, low_rank_layers
from inrank_convert.weights.run_folder import read_metrics
from tests.conftest import REPO
from tests.helpers.cli_contract import expect_ok
from tests.helpers.training import HAS_DATA, SMALL, TEXT, TOKENIZER, losses, options, tiny_config

needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data (GPT-2 tokenizer and Tiny Shakespeare)")


@needs_data
def test_sigint_saves_a_checkpoint_and_the_resumed_run_matches(tmp_path, config_path):
    args = ["--data", TEXT, "--tokenizer", TOKENIZER, "--steps", "400", "--mode", "inrank", "--recipe", "reference",
            "--batch-size", "4",
            "--block-size", "16", "--log-every", "1", "--buffer", "2", "--rank-warmup", "3", "--rank-every", "3",
            "--seed", "3", "--lr", "3e-3", "--warmup", "0", "--min-lr", "3e-3", "--factorize", "all"]
    run = tmp_path / "run"
    command = [sys.executable, "-m", "inrank_convert", "train", str(config_path), "-o", str(run), *map(str, args)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(run)) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: interrupted at step") and "Traceback" not in stderr
    stopped = int(last_line.split("interrupted at step ")[1].split(";")[0])
    assert 3 <= stopped < 400 and (run / f"step-{stopped}" / "train_state").is_dir()
    # Resume up to a few steps past the interruption and compare with an uninterrupted run that long.
    total = stopped + 3
    resume(run, None, {"steps": total})
    reference = tmp_path / "reference"
    train(config_path, reference, options(steps=total, warmup=0, min_lr=3e-3))  # a constant LR: same schedule
    assert losses(run) == losses(reference)


def test_growing_the_factors_leaves_the_function_unchanged(config_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_path.parent)).eval()
    policy = RankPolicy(threshold=0.99, buffer=2, warmup=0, every=1)
    ranks = factorize_model(model, policy, efficient=False, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in low_rank_layers(model):  # a full-rank update, so that the controller grows every layer
            layer.lora_B.normal_(0, 0.02, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 50257, (2, 16), generator=generator)
    before = model(input_ids=ids).logits

    session = SimpleNamespace(controller=RankController(policy, ranks), model=model, optimizer=optimizer,
                              world=World(), options=options(), step=1, wrap=lambda: None)
    widths = [layer.rank for _, layer in low_rank_layers(model)]
    decide_ranks(session)
    grown = [layer.rank for _, layer in low_rank_layers(model)]
    assert all(g > w for g, w in zip(grown, widths, strict=True))
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-6)
    param_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert all(id(layer.lora_A) in param_ids for _, layer in low_rank_layers(model))


@needs_data
def test_stage_two_freezes_the_ranks(tmp_path):
    config = tiny_config(tmp_path / "config", n_layer=2)
    data = tmp_path / "text.txt"
    data.write_text(TEXT.read_text()[:20_000])
    run = tmp_path / "run"
    expect_ok(["train", config, "-o", run, "--data", data, "--steps", "16", *SMALL, "--mode", "inrank",
               "--recipe", "reference", "--efficient",
               "--factorize", "mlp", "--initial-rank", "2", "--buffer", "2", "--rank-warmup", "2", "--rank-every", "2",
               "--stage2-at", "8", "--log-every", "1", "--quiet"])
    records = read_metrics(run)
    ranks = {record["step"]: record["ranks"] for record in records}
    assert set(ranks[1]) == {"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj",
                             "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"}
    assert set(ranks[1].values()) == {2}
    assert all(ranks[step] == ranks[8] for step in range(8, 17)), "a rank changed after stage 2"
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in records)
