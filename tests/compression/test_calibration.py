"""Calibration statistics and the whitened factorization (issue 11, item 1), on tiny real GPT-2 and
LLaMA models and real text.

The fixture models have a 320-token vocabulary, so the real text (Tiny Shakespeare) goes through a
byte-level BPE with 320 ids trained here with the ``tokenizers`` package on the text itself: a real
subword tokenizer (256 byte ids + 64 merges) whose ids all fit the models, and whose token
frequencies are those of real text (clamping GPT-2 ids into 320 would not be). The GPT-2 tokenizer
itself serves the out-of-vocabulary test: its ids run far beyond 320, as with a wrong --tokenizer.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from inrank_convert.compression.calibration import collect_statistics
from inrank_convert.core.errors import NonFiniteError, UsageError
from inrank_convert.linalg.whitening import whitened_factorize, whitened_singular_values
from tests.conftest import SHARED_DATA, make_pair

TEXT = SHARED_DATA / "tinyshakespeare" / "input.txt"
GPT2_TOKENIZER = SHARED_DATA / "gpt2-tokenizer"
WINDOW = 64  # the fixture models' context (n_positions / max_position_embeddings)
VOCAB = 320
needs_text = pytest.mark.skipif(not TEXT.is_file(), reason=f"Tiny Shakespeare absent under {SHARED_DATA}")


@pytest.fixture(scope="module")
def shakespeare_ids() -> torch.Tensor:
    """Token ids of the first 200 KB of Tiny Shakespeare under a 320-id byte-level BPE trained on it."""
    if not TEXT.is_file():
        pytest.skip(f"Tiny Shakespeare absent under {SHARED_DATA}")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = TEXT.read_text()[:200_000]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.long)
    assert ids.numel() > 50 * WINDOW and int(ids.max()) < VOCAB and int(ids.min()) >= 0
    return ids


def trained_model(tmp_path, arch: str):
    pair = make_pair(tmp_path, arch)
    return pair, AutoModelForCausalLM.from_pretrained(pair.trained_dir)


def linear_layers(model) -> dict[str, torch.nn.Module]:
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


@torch.no_grad()
def captured_inputs(model, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every Linear/Conv1D layer's inputs ([rows, in], float64), kept whole: the direct oracle."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in linear_layers(model).items():
        def hook(module, args, name=name):
            seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]).double())
        handles.append(module.register_forward_pre_hook(hook))
    model.eval()
    for batch in batches:
        model(batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in seen.items()}


def output_error(X: torch.Tensor, residual: torch.Tensor, conv1d: bool) -> float:
    """||layer output error|| on inputs X of a weight residual in its stored orientation."""
    return float(torch.linalg.matrix_norm(X @ (residual if conv1d else residual.T)))


def plain_truncation(delta: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def oracle_truncation(delta: torch.Tensor, gram: torch.Tensor, damping: float, rank: int, conv1d: bool):
    """The whitened problem solved directly in float64: the best rank-r approximation (Frobenius) of
    D S with S the symmetric square root of the damped Gram, mapped back through S^{-1}. (Any square
    root gives the same product: two roots differ by an orthogonal factor on the right.)"""
    D = delta.T if conv1d else delta
    damped = gram + damping * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=torch.float64)
    w, Q = torch.linalg.eigh(damped)
    root = (Q * w.sqrt()) @ Q.T
    U, S, Vh = torch.linalg.svd(D @ root, full_matrices=False)
    best = torch.linalg.solve(root, ((U[:, :rank] * S[:rank]) @ Vh[:rank]).T).T  # (...) @ root^{-1}
    return (best.T if conv1d else best), S


# --------------------------------------------------------------------------- (a) statistics


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


# --------------------------------------------------------------------------- (b) whitened factorization


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_whitened_factors_minimize_the_output_error_and_match_the_oracle(tmp_path, shakespeare_ids, arch):
    pair, model = trained_model(tmp_path, arch)
    tokens = shakespeare_ids[:32 * WINDOW]
    stats = collect_statistics(model, tokens, block_size=None)
    X = captured_inputs(model, [tokens.reshape(32, WINDOW)])
    assert stats.grams
    gains = []
    for name in stats.grams:
        conv1d = stats.conv1d[name]
        delta = (pair.trained_state[name] - pair.init_state[name]).double()  # stored orientation
        gram = X[name].T @ X[name]  # the direct Gram: the oracle and the factorization see the same one
        for rank in (1, 3):
            B, A, info = whitened_factorize(delta, gram, rank, conv1d=conv1d, name=name)
            assert B.dtype == torch.float64 and B.shape == (delta.shape[0], rank) and A.shape == (rank, delta.shape[1])
            assert info["method"] == "cholesky" and info["damping"] == 1e-6
            whitened = output_error(X[name], delta - B @ A, conv1d)
            plain = output_error(X[name], delta - plain_truncation(delta, rank), conv1d)
            # Optimal for the damped problem: never worse than the plain SVD beyond the damping's reach.
            assert whitened <= plain * (1 + 1e-6), (name, rank, whitened, plain)
            gains.append(whitened / plain)
            best, spectrum = oracle_truncation(delta, gram, info["damping"], rank, conv1d)
            assert torch.allclose(info["singular_values"], spectrum, rtol=1e-9, atol=1e-12 * float(spectrum[0]))
            assert abs(whitened - output_error(X[name], delta - best, conv1d)) <= 1e-9 * whitened, (name, rank)
            difference = float(torch.linalg.matrix_norm(B @ A - best))
            assert difference <= 1e-7 * float(torch.linalg.matrix_norm(best)), (name, rank, difference)
    # Real activations are not white: on some layer the whitened choice is clearly better (the fixture's
    # planted updates are random directions, so most gains are a few percent; a plain SVD would give 1).
    assert min(gains) < 0.95, sorted(gains)


def test_factors_come_back_in_the_update_dtype_and_the_spectrum_alone_agrees(tmp_path, shakespeare_ids):
    pair, model = trained_model(tmp_path, "gpt2")
    name = "transformer.h.0.mlp.c_fc.weight"  # Conv1D [64, 256]
    stats = collect_statistics(model, shakespeare_ids, block_size=None, max_tokens=8 * WINDOW, names={name})
    delta = pair.trained_state[name] - pair.init_state[name]
    B, A, info = whitened_factorize(delta, stats.grams[name], 4, conv1d=True)
    assert B.dtype == A.dtype == torch.float32 and B.shape == (64, 4) and A.shape == (4, 256)
    spectrum, alone = whitened_singular_values(delta, stats.grams[name], conv1d=True)
    assert spectrum.numel() == 64 and torch.equal(spectrum, info["singular_values"])
    assert alone["method"] == info["method"] and abs(alone["total_energy"] - float(spectrum.square().sum())) < 1e-9 * alone["total_energy"]
    # The B @ A of rank 0 is empty and the full rank reproduces the update.
    B0, A0, _ = whitened_factorize(delta, stats.grams[name], 0, conv1d=True)
    assert B0.shape == (64, 0) and A0.shape == (0, 256)
    Bf, Af, _ = whitened_factorize(delta.double(), stats.grams[name], 64, conv1d=True)
    assert torch.allclose(Bf @ Af, delta.double(), atol=1e-8 * float(delta.abs().max()))


# --------------------------------------------------------------------------- (c) singular Grams


def _layer_and_update(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    delta = torch.randn(48, 32, generator=generator, dtype=torch.float64)  # Linear [out, in]
    return generator, delta


def test_a_rank_deficient_gram_takes_the_damped_path_and_still_minimizes():
    generator, delta = _layer_and_update()
    X = torch.randn(10, 32, generator=generator, dtype=torch.float64)  # 10 rows: rank 10 of 32
    X[:, 5] = 0  # a feature that never fires: an exact zero pivot, so an undamped Cholesky must fail
    gram = X.T @ X
    B, A, info = whitened_factorize(delta, gram, 3, damping=0.0, name="layer.x")
    assert info["method"] == "cholesky-damped" and info["damping"] > 0
    assert any("Cholesky failed with damping 0" in note for note in info["notes"])
    assert bool(torch.isfinite(B).all() and torch.isfinite(A).all())
    whitened = output_error(X, delta - B @ A, False)
    plain = output_error(X, delta - plain_truncation(delta, 3), False)
    assert whitened <= plain * (1 + 1e-6) and whitened < 0.9 * plain
    # Only 10 directions carry signal: rank 10 explains the inputs' outputs (up to the damping).
    B, A, _ = whitened_factorize(delta, gram, 10, damping=0.0)
    assert output_error(X, delta - B @ A, False) <= 1e-2 * output_error(X, delta, False)


def test_an_indefinite_gram_falls_back_to_the_eigendecomposition():
    generator, delta = _layer_and_update(1)
    X = torch.randn(200, 32, generator=generator, dtype=torch.float64)
    gram = X.T @ X
    broken = gram - 1.5 * float(torch.linalg.eigvalsh(gram)[0]) * torch.eye(32, dtype=torch.float64)  # lambda_min < 0
    B, A, info = whitened_factorize(delta, broken, 4, name="layer.y")
    assert info["method"] == "eigh" and info["damping"] == pytest.approx(1e-2)
    assert any("eigendecomposition" in note for note in info["notes"])
    assert bool(torch.isfinite(B).all() and torch.isfinite(A).all())
    # The floored square root still serves the true Gram's problem about as well as the plain SVD.
    assert output_error(X, delta - B @ A, False) <= output_error(X, delta - plain_truncation(delta, 4), False) * 1.05


def test_a_zero_gram_gives_the_plain_svd_and_a_nan_gram_names_the_layer():
    _, delta = _layer_and_update(2)
    B, A, info = whitened_factorize(delta, torch.zeros(32, 32, dtype=torch.float64), 5)
    assert info["method"] == "cholesky"
    assert torch.allclose(B @ A, plain_truncation(delta, 5), atol=1e-10)
    gram = torch.eye(32, dtype=torch.float64)
    gram[3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="layer.z"):
        whitened_factorize(delta, gram, 5, name="layer.z")


# --------------------------------------------------------------------------- (d) bad input


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
