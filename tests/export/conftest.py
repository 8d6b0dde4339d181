"""Fixtures of the export tests: a compressed LLaMA, and a tokenizer with a text that fits it."""

from __future__ import annotations

import random

import pytest

from inrank_convert import PlanOptions, RankRule, compress
from tests.conftest import make_pair


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A LLaMA whose every tensor changed, compressed at energy 0.9 (ranks 3-4 of the planted 4)."""
    folder = tmp_path_factory.mktemp("llama")
    pair = make_pair(folder, "llama")
    out = folder / "out"
    compress(pair.trained_dir, out, init=pair.init_dir, options=PlanOptions(rule=RankRule("energy-rest", 0.9)))
    return pair, out, folder


@pytest.fixture(scope="module")
def tokenizer_and_text(tmp_path_factory):
    """A word-level tokenizer.json with the fixtures' 320 ids, and 600 words of text over them."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models

    folder = tmp_path_factory.mktemp("tokenizer")
    words = [f"w{i}" for i in range(319)]
    tokenizer = Tokenizer(tokenizer_models.WordLevel({word: i for i, word in enumerate(["[UNK]", *words])},
                                                     unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    generator = random.Random(0)
    text = folder / "text.txt"
    text.write_text(" ".join(generator.choice(words) for _ in range(600)) + "\n")
    return folder, text
