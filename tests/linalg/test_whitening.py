"""linalg/whitening.py: the update factorized for a layer's output error on real inputs: optimal
against a float64 oracle of the whitened problem on tiny real GPT-2 and LLaMA models and real text,
factors in the update's dtype, and singular Grams (rank-deficient, indefinite, zero, NaN)."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.compression.calibration import collect_statistics
from inrank_convert.core.errors import NonFiniteError
from inrank_convert.linalg.whitening import whitened_factorize, whitened_singular_values
from tests.helpers.calibration import WINDOW, captured_inputs, output_error, plain_truncation, trained_model

# --------------------------------------------------------------------------- on real models and text


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

# --------------------------------------------------------------------------- singular Grams


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
