"""Fixtures of the runtime tests."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.inputs.text import read_text_tokens
from tests.helpers.eval_models import CONTEXT, WIKI_TEST, gpt2_tokenizer


@pytest.fixture(scope="module")
def wiki_tokens() -> torch.Tensor:
    """The first 4 windows of WikiText-2 test text under the GPT-2 tokenizer."""
    if not WIKI_TEST.is_file():
        pytest.skip(f"shared data absent: {WIKI_TEST}")
    return read_text_tokens(WIKI_TEST, gpt2_tokenizer(), max_tokens=4 * CONTEXT)
