"""cli/export.py's ``generate`` through the real CLI (typer's CliRunner): deterministic under a seed,
its JSON, the dense-merged model, and bad options in one line. (``decompress`` and ``export-peft``
are tested beside export/.)"""

from __future__ import annotations

import json

import pytest

from tests.helpers.cli_contract import expect_error_line, ok


def test_generate_is_deterministic_under_a_seed(eval_models):
    args = ("generate", eval_models.half, "--prompt", "The history of", "--max-new-tokens", 16, "--temperature", 1.0)
    first = ok(*args, "--seed", 3).stdout
    assert first.startswith("The history of") and len(first) > len("The history of\n")
    assert ok(*args, "--seed", 3).stdout == first
    assert ok(*args, "--seed", 4).stdout != first


def test_generate_json_and_merge(eval_models):
    args = ("generate", eval_models.half, "--prompt", "Hello world", "--max-new-tokens", 8, "--temperature", 0, "--json")
    payload = json.loads(ok(*args).stdout)
    assert {"prompt", "completion", "text", "new_tokens", "tokens_per_second", "seed"} <= set(payload)
    assert payload["prompt_tokens"] == 2 and payload["new_tokens"] == 8  # "Hello world" = [15496, 995]
    merged = json.loads(ok(*args, "--merge").stdout)
    assert merged["completion"] == payload["completion"]  # greedy: the dense-merged model picks the same tokens


@pytest.mark.parametrize("options, says", [
    (("--prompt", ""), ("prompt is empty",)),
    (("--prompt", "The", "--max-new-tokens", 0), ("--max-new-tokens",)),
    (("--prompt", "The", "--temperature", -1), ("--temperature",)),
    (("--prompt", "The", "--top-k", -1), ("--top-k",)),
    (("--prompt", "The", "--max-new-tokens", 500), ("128-token context", "--max-new-tokens")),
])
def test_bad_generate_options(eval_models, options, says):
    expect_error_line("generate", eval_models.full, *options, says=says)
