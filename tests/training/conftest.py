"""Fixtures of the training tests: a 2x32 GPT-2 config with GPT-2's vocabulary (with and without
dropout) and one InRank run of it, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from inrank_convert.training.entrypoints import train
from inrank_convert.training.options import TrainOptions
from tests.helpers.training import VALID, options


def run_config(folder: Path, dropout: float = 0.0, **overrides) -> Path:
    from transformers import GPT2Config

    settings = dict(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=50257, resid_pdrop=dropout,
                    embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=50256, eos_token_id=50256)
    settings.update(overrides)
    GPT2Config(**settings).save_pretrained(folder)
    return folder / "config.json"


@pytest.fixture(scope="session")
def config_path(tmp_path_factory) -> Path:
    return run_config(tmp_path_factory.mktemp("config"))


@pytest.fixture(scope="session")
def dropout_config(tmp_path_factory) -> Path:
    return run_config(tmp_path_factory.mktemp("config-dropout"), dropout=0.1)


@pytest.fixture(scope="session")
def inrank_run(tmp_path_factory, dropout_config) -> tuple[Path, TrainOptions]:
    """12 InRank steps with a checkpoint at 6 (ranks are decided at 3, 6, 9, 12; dropout on)."""
    run = tmp_path_factory.mktemp("runs") / "inrank"
    opts = options(save_every=6, val_data=str(VALID) if VALID.is_file() else None)
    train(dropout_config, run, opts)
    return run, opts
