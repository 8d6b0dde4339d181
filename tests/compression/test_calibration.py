"""compression/calibration.py: what a trained model's layers see on real text: every layer's input
Gram and the token counts against a direct computation on tiny real GPT-2 and LLaMA models, limits
on what is collected, the embedding, the head and their tie, row scores, and bad input.

The fixture models have a 320-token vocabulary, so the real text (Tiny Shakespeare) goes through a
byte-level BPE with 320 ids trained on the text itself (conftest's ``shakespeare_ids``): a real
subword tokenizer (256 byte ids + 64 merges) whose ids all fit the models, and whose token
frequencies are those of real text (clamping GPT-2 ids into 320 would not be). The GPT-2 tokenizer
itself serves the out-of-vocabulary test: its ids run far beyond 320, as with a wrong --tokenizer.
"""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from inrank_convert.compression.calibration import collect_statistics
from inrank_convert.core.errors import UsageError
from tests.conftest import SHARED_DATA
from tests.helpers.calibration import (
    GPT2_TOKENIZER,
    TEXT,
    VOCAB,
    WINDOW,
    captured_inputs,
    linear_layers,
    needs_text,
    trained_model,
)

# --------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_grams_and_token_counts_equal_the_direct_computation(tmp_path, shakespeare_ids, arch):
    pair, model = trained_model(tmp_path, arch)
    tokens = shakespeare_ids[:5 * WINDOW + 17]  # five full windows and a shorter last one
    model.train()
    stats = collect_statistics(model, tokens, block_size=None, max_tokens=None, windows_per_batch=2)
    assert model.training  # mode restored
    assert all(not m._forward_pre_hooks for m in model.modules())  # hooks removed
    layers = linear_layers(model)
    assert layers and set(stats.grams) == set(layers)
    X = captured_inputs(model, [tokens[:5 * WINDOW].reshape(5, WINDOW), tokens[5 * WINDOW:][None]])
    for name, module in layers.items():
        direct = X[name].T @ X[name]
        gram = stats.grams[name]
        assert gram.dtype == torch.float64 and gram.shape == direct.shape
        assert float(torch.linalg.matrix_norm(gram - direct)) <= 1e-6 * float(torch.linalg.matrix_norm(direct)), name
        assert stats.rows[name] == X[name].shape[0] == tokens.numel()
        assert stats.conv1d[name] == isinstance(module, Conv1D)
    assert any(stats.conv1d.values()) == (arch == "gpt2")
    assert torch.equal(stats.token_counts, torch.bincount(tokens, minlength=VOCAB))
    assert stats.tokens == tokens.numel() and stats.window == WINDOW and stats.windows == 6
    assert abs(float(stats.token_frequencies().sum()) - 1) < 1e-12
    stats.text_sha256 = "ab" * 32
    assert stats.to_json() == {"text_sha256": "ab" * 32, "tokens": tokens.numel(), "window": WINDOW, "windows": 6,
                               "layers": len(layers)}


def test_max_tokens_block_size_and_names_limit_what_is_collected(tmp_path, shakespeare_ids):
    _, model = trained_model(tmp_path, "llama")
    name = "model.layers.1.mlp.down_proj.weight"
    stats = collect_statistics(model, shakespeare_ids, block_size=16, max_tokens=100, names={name})
    assert list(stats.grams) == [name] and stats.grams[name].shape == (128, 128)
    assert stats.tokens == 100 and stats.rows[name] == 100 and stats.window == 16 and stats.windows == 7
    assert torch.equal(stats.token_counts, torch.bincount(shakespeare_ids[:100], minlength=VOCAB))
    # float32 products per forward, float64 sums: the same Gram to float32 accuracy.
    fast = collect_statistics(model, shakespeare_ids, block_size=16, max_tokens=100, names={name},
                              batch_dtype=torch.float32)
    assert fast.grams[name].dtype == torch.float64
    gap = float(torch.linalg.matrix_norm(fast.grams[name] - stats.grams[name]))
    assert 0 < gap <= 1e-5 * float(torch.linalg.matrix_norm(stats.grams[name]))


# --------------------------------------------------------------------------- bad input


@needs_text
def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    if not (GPT2_TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"GPT-2 tokenizer absent under {SHARED_DATA}")
    from inrank_convert.inputs.text import load_tokenizer, tokenize_text

    _, model = trained_model(tmp_path, "gpt2")
    ids = tokenize_text(TEXT.read_text()[:20_000], load_tokenizer(None, GPT2_TOKENIZER), 4 * WINDOW)
    assert int(ids.max()) >= VOCAB  # the GPT-2 tokenizer does not belong to this 320-token model
    with pytest.raises(UsageError, match=r"beyond the 320-token vocabulary.*calib\.txt.*tokenizer") as err:
        collect_statistics(model, ids, block_size=None, where="calib.txt")
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="cannot be negative"):
        collect_statistics(model, torch.full((WINDOW,), -1), block_size=None)


def test_a_text_shorter_than_one_window_is_refused(tmp_path):
    _, model = trained_model(tmp_path, "llama")
    short = torch.arange(40) % VOCAB
    with pytest.raises(UsageError, match=r"40 tokens, fewer than one 64-token window: short\.txt.*longer text"):
        collect_statistics(model, short, block_size=None, where="short.txt")
    with pytest.raises(UsageError, match=r"fewer than one 64-token window.*calib_tokens"):
        collect_statistics(model, torch.arange(1000) % VOCAB, block_size=None, max_tokens=40)
    # A shorter window makes the same text enough.
    stats = collect_statistics(model, short, block_size=32)
    assert stats.windows == 2 and stats.tokens == 40


def test_row_scores_weigh_the_heads_gram_and_the_token_counts():
    """A token-indexed tensor's residual rows: the head's output energy e^T G e and the embedding's
    count x ||e||^2, each relative to its total, averaged when tied, scaled to the plain energy."""
    from inrank_convert.compression.calibration import CalibrationStats
    from inrank_convert.linalg.forms import split_residual

    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(50, 8, generator=generator)
    X = torch.randn(200, 8, generator=generator) * torch.linspace(0.1, 3.0, 8)
    gram = (X.T @ X).double()
    counts = torch.randint(0, 5, (50,), generator=generator)
    V = torch.linalg.svd(delta, full_matrices=False).Vh[:1]
    V, B, _, residual, forced = split_residual(delta, V, None)
    E = (delta - B @ V).double()
    head = torch.einsum("ti,ij,tj->t", E, gram, E)
    embedding = residual * counts.double()

    def stats(**roles):
        return CalibrationStats({"lm_head.weight": gram}, {}, {}, counts, int(counts.sum()), 8, 1, **roles)

    tied = stats(input_embedding="wte.weight", head="lm_head.weight", tied=True).row_scores(
        "wte.weight", delta, V, B, residual)
    expected = (head / head.sum() + embedding / embedding.sum()) / 2 * residual.sum()
    assert torch.allclose(tied, expected, rtol=1e-10) and tied.sum() == pytest.approx(float(residual.sum()))
    untied = stats(input_embedding="embed.weight", head="lm_head.weight", tied=False)
    assert torch.allclose(untied.row_scores("embed.weight", delta, V, B, residual),
                          embedding / embedding.sum() * residual.sum(), rtol=1e-10)
    assert torch.allclose(untied.row_scores("lm_head.weight", delta, V, B, residual),
                          head / head.sum() * residual.sum(), rtol=1e-10)
    assert untied.row_scores("model.layers.0.mlp.up_proj.weight", delta, V, B, residual) is None
    # The ranking differs from the plain energies (else calibration would change nothing).
    assert not torch.equal(torch.argsort(tied, descending=True), torch.argsort(residual, descending=True))


def test_collect_statistics_finds_the_embedding_the_head_and_the_tie(tmp_path, shakespeare_ids):
    pair, model = trained_model(tmp_path, "gpt2")
    stats = collect_statistics(model, shakespeare_ids, max_tokens=4 * WINDOW, names={"transformer.wte.weight"})
    assert (stats.input_embedding, stats.head, stats.tied) == ("transformer.wte.weight", "lm_head.weight", True)
    assert set(stats.grams) == {"lm_head.weight"}  # a tied embedding brings the head's Gram along
    final = model.transformer(shakespeare_ids[:WINDOW][None]).last_hidden_state[0].double()  # [window, width]
    first = collect_statistics(model, shakespeare_ids, max_tokens=WINDOW, names={"transformer.wte.weight"})
    assert torch.allclose(first.grams["lm_head.weight"], final.T @ final, rtol=1e-5, atol=1e-6)
    _, llama = trained_model(tmp_path / "llama", "llama")
    stats = collect_statistics(llama, shakespeare_ids, max_tokens=WINDOW)
    assert (stats.input_embedding, stats.head, stats.tied) == ("model.embed_tokens.weight", "lm_head.weight", False)
