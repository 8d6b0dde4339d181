"""Tiny GPT-2 training runs on real text (Tiny Shakespeare, the GPT-2 tokenizer): their config,
options and losses, for the training tests and the train / resume contract; and a GPT-2 whose MLP
weights carry planted low-rank updates, for the switch and the cut."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from inrank_convert.training.entrypoints import resume
from inrank_convert.training.options import TrainOptions, TrainResult
from inrank_convert.training.rank_control import factorized_layers
from inrank_convert.weights.run_folder import read_metrics
from tests.conftest import SHARED_DATA, build_model, gpt2_config

TEXT = SHARED_DATA / "tinyshakespeare" / "input.txt"
TOKENIZER = SHARED_DATA / "gpt2-tokenizer"
VALID = SHARED_DATA / "wikitext-2-raw" / "wiki.valid.raw"
HAS_DATA = (TOKENIZER / "vocab.json").is_file() and TEXT.is_file()
# The CLI flags of a tiny run.
SMALL = ["--tokenizer", TOKENIZER, "--block-size", "16", "--batch-size", "4"]


def tiny_config(folder: Path, **overrides) -> Path:
    """A 1x32 GPT-2 config.json with GPT-2's vocabulary and no dropout (``overrides`` change it)."""
    from transformers import GPT2Config

    settings = dict(n_embd=32, n_layer=1, n_head=2, n_positions=32, vocab_size=50257, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=50256, eos_token_id=50256)
    settings.update(overrides)
    GPT2Config(**settings).save_pretrained(folder)
    return folder / "config.json"


def options(**overrides) -> TrainOptions:
    """TrainOptions of a short InRank run (12 steps, ranks decided from step 3) on Tiny Shakespeare, with
    the reference recipe (no dense warm-up, exact growth, the inrank criterion) unless overridden."""
    settings = dict(data=str(TEXT), steps=12, mode="inrank", batch_size=4, block_size=16, lr=3e-3, log_every=1,
                    tokenizer=str(TOKENIZER), buffer=2, rank_warmup=3, rank_every=3, seed=3)
    settings.update(overrides)
    if settings["mode"] == "inrank":
        settings.setdefault("factorize", "all")  # these tests exercise every kind of layer
        settings.setdefault("recipe", "reference")  # the InRank reference's mechanics, unless a test names another
    return TrainOptions(**settings)


def losses(run: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in read_metrics(run)}


def resume_without_last_checkpoints(run: Path, copy: Path, steps: tuple[int, ...]) -> TrainResult:
    """``run`` copied to ``copy`` without the checkpoints of ``steps`` (as if cut short there), resumed to its end."""
    shutil.copytree(run, copy)
    for step in steps:
        shutil.rmtree(copy / f"step-{step}")
    return resume(copy, None, {})


def planted_rank_3_updates(efficient: bool, seed: int):
    """A GPT-2 whose MLP weights are its init plus a planted rank-3 update: (model, the trained
    weights by layer, the init's weights by tensor name; None with ``efficient``, which has no init)."""
    init = build_model(gpt2_config(), seed=0)
    model = build_model(gpt2_config(), seed=0)
    generator = torch.Generator().manual_seed(seed)
    layers = factorized_layers(model, "mlp")
    assert layers
    with torch.no_grad():
        for _, module in layers:
            rows, cols = module.weight.shape
            module.weight += 0.05 * torch.randn(rows, 3, generator=generator) @ torch.randn(3, cols, generator=generator)
    trained = {name: module.weight.detach().clone() for name, module in layers}
    init_weights = None if efficient else {f"{name}.weight": module.weight.detach().clone()
                                           for name, module in factorized_layers(init, "mlp")}
    return model, trained, init_weights
