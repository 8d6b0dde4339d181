"""runtime/evaluate.py: perplexity in windows (each token scored once), against Hugging Face's own
``labels=`` loss and its documented sliding-window recipe written out here, and generation.

Real models on real text: conftest's ``eval_models``, a tiny GPT-2 whose vocabulary is GPT-2's
(50257 tokens, so the real GPT-2 tokenizer fits it), "trained" = init + planted rank-4 updates, on
WikiText-2 test text (``wiki_tokens``).
"""

from __future__ import annotations

import math

import pytest
import torch

from inrank_convert.core.errors import UsageError, cli_flags
from inrank_convert.inputs.text import load_tokenizer
from inrank_convert.runtime.evaluate import generate_text, perplexity, plan_windows
from inrank_convert.runtime.modeling import load_compressed, load_dense, model_config
from tests.helpers.eval_models import CONTEXT, needs_data


@pytest.fixture(scope="module")
def trained_model(eval_models):
    return load_dense(eval_models.trained, model_config(eval_models.trained))


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("n, length, stride", [(512, 128, None), (515, 128, None), (512, 128, 32), (500, 128, 100),
                                               (128, 128, 1), (130, 64, 64), (1000, 128, 127)])
def test_windows_score_each_token_at_most_once(n, length, stride):
    windows = plan_windows(n, length, stride)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert len(scored) == len(set(scored)), "a token is scored twice"
    assert all(end - begin <= length and begin < first for begin, end, first in windows)
    assert windows[-1][1] == n, "the text's end is not reached"
    if stride is not None and stride < length:
        assert scored == list(range(1, n)), "sliding windows must score every token but the first, once"
    else:  # non-overlapping: every token but the first of each window, which has no context there
        assert scored == [t for t in range(n) if t % length != 0]


@pytest.mark.parametrize("stride", [0, -3, 129])
def test_bad_stride_is_refused(stride):
    # Called from Python the message names the parameter; under a CLI command with --stride, the flag.
    with pytest.raises(UsageError, match="stride") as refused:
        plan_windows(512, 128, stride)
    assert "--" not in refused.value.message
    with cli_flags({"--stride"}), pytest.raises(UsageError, match="--stride"):
        plan_windows(512, 128, stride)


# --------------------------------------------------------------------------- perplexity


@needs_data
def test_one_window_equals_hugging_face_loss(trained_model, wiki_tokens):
    tokens = wiki_tokens[:CONTEXT]
    result = perplexity(trained_model, tokens)
    with torch.no_grad():
        loss = trained_model(tokens[None], labels=tokens[None]).loss
    assert result.windows == 1 and result.tokens == CONTEXT - 1
    assert result.nll == pytest.approx(float(loss), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)


@needs_data
def test_non_overlapping_windows_average_hugging_face_losses(trained_model, wiki_tokens):
    result = perplexity(trained_model, wiki_tokens)
    with torch.no_grad():
        losses = [float(trained_model(chunk[None], labels=chunk[None]).loss) for chunk in wiki_tokens.split(CONTEXT)]
    assert result.windows == 4 and result.tokens == wiki_tokens.numel() - 4
    assert result.nll == pytest.approx(sum(losses) / len(losses), rel=1e-5)  # equal windows: equal weights
    assert result.tokens_per_second > 0 and result.seconds > 0


def hugging_face_sliding_window(model, tokens: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The recipe of huggingface.co/docs/transformers/perplexity, with the exact count of scored tokens.

    The documented recipe weights each window's mean loss by ``(labels != -100).sum() - 1``; but
    the model's loss shifts labels left by one, so a label is lost only where it sits at position
    0 (the first window): the exact count is that of the labels at positions 1 and after.
    """
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq_len = tokens.numel()
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = tokens[begin:end][None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = int((target_ids[:, 1:] != -100).sum())  # labels the shifted loss actually scores
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@needs_data
@pytest.mark.parametrize("stride", [32, 100])
def test_sliding_window_matches_the_documented_recipe(trained_model, wiki_tokens, stride):
    result = perplexity(trained_model, wiki_tokens, stride=stride)
    expected_nll, expected_tokens = hugging_face_sliding_window(trained_model, wiki_tokens, CONTEXT, stride)
    assert result.tokens == expected_tokens == wiki_tokens.numel() - 1  # each token once, all but the first
    assert result.tokens_processed > result.tokens
    assert result.nll == pytest.approx(expected_nll, rel=1e-5)
    assert 0 < result.perplexity < math.inf
    assert result.stride == stride and result.context == CONTEXT


@needs_data
def test_context_option_caps_the_window(trained_model, wiki_tokens):
    result = perplexity(trained_model, wiki_tokens, context=64)
    assert result.context == 64 and result.windows == 8


@needs_data
def test_text_shorter_than_one_window_is_refused(trained_model, wiki_tokens):
    with pytest.raises(UsageError, match="fewer than one 128-token window"):
        perplexity(trained_model, wiki_tokens[:100])


# --------------------------------------------------------------------------- generation


@needs_data
def test_generation_is_deterministic_and_leaves_the_rng_alone(eval_models):
    model, tokenizer = load_compressed(eval_models.half), load_tokenizer(eval_models.half)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = generate_text(model, tokenizer, "The history of", max_new_tokens=12, temperature=1.0, seed=5)
    assert torch.equal(torch.rand(3), expected_next), "generate_text moved the caller's random stream"
    again = generate_text(model, tokenizer, "The history of", max_new_tokens=12, temperature=1.0, seed=5)
    other = generate_text(model, tokenizer, "The history of", max_new_tokens=12, temperature=1.0, seed=6)
    assert first.completion == again.completion and first.new_tokens == 12
    assert other.completion != first.completion
    greedy = [generate_text(model, tokenizer, "The history of", max_new_tokens=8, temperature=0, seed=s).completion
              for s in (0, 1)]
    assert greedy[0] == greedy[1]
    assert first.text == "The history of" + first.completion


@needs_data
def test_generation_longer_than_the_context_is_refused(eval_models):
    model, tokenizer = load_compressed(eval_models.half), load_tokenizer(eval_models.half)
    with pytest.raises(UsageError, match="context"):
        generate_text(model, tokenizer, "The history of", max_new_tokens=CONTEXT)
