"""linalg/stored_error.py: the error of what a reader gets back, measured block by block on the
[rows, cols] reconstruction and priced from the factors' norms alone, against a direct computation."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.artifact.storage import encode_factors, round_trip
from inrank_convert.linalg import gram
from inrank_convert.linalg.criteria import RankRule
from inrank_convert.linalg.forms import choose_form
from inrank_convert.linalg.stored_error import output_error, stored_error, svd_stored_error
from tests.helpers.forms import THRESHOLD, bf16_costs, bf16_source_costs, energy, planted_low_rank, scattered


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_stored_error_is_the_relative_error_of_what_is_read_back(planted, storage):
    delta, _, total, _ = planted
    rows, cols = delta.shape
    form = choose_form(delta, total, RankRule("energy-rest", THRESHOLD), bf16_costs(delta), engine="exact")
    assert form.kind == "lowrank+rows"
    B, A, stored_rows = round_trip(form.B, form.A, form.rows, storage)
    # Small blocks, so that the blockwise walk crosses many block boundaries.
    measured = stored_error(delta, total, B, A, stored_rows, form.row_index, block=300)
    rebuilt = B.double() @ A.double() + scattered(rows, form.row_index, stored_rows.double())
    direct = (energy(delta.double() - rebuilt) / total) ** 0.5
    assert measured == pytest.approx(direct, rel=1e-4, abs=1e-7)
    # The truncation alone: the error the kept energy implies.
    assert stored_error(delta, total, form.B, form.A, form.rows, form.row_index) == pytest.approx(
        (1 - form.energy) ** 0.5, rel=1e-3)


def test_stored_error_of_a_plain_low_rank_form():
    generator = torch.Generator().manual_seed(9)
    delta = torch.randn(64, 40, generator=generator)
    total = energy(delta)
    form = choose_form(delta, total, RankRule("energy-rest", THRESHOLD), bf16_costs(delta), engine="exact")
    assert form.kind == "lowrank"
    direct = (energy(delta.double() - form.B.double() @ form.A.double()) / total) ** 0.5
    assert stored_error(delta, total, form.B, form.A, None, None) == pytest.approx(direct, rel=1e-4)
    assert stored_error(torch.zeros(4, 4), 0.0, torch.zeros(4, 0), torch.zeros(0, 4), None, None) == 0.0


@pytest.mark.parametrize("engine", ["exact", "randomized", "auto"])
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_the_stored_error_of_svd_factors_from_their_norms(engine, storage):
    """svd_stored_error (no [rows, cols] product) agrees with the measured stored error."""
    delta, total = planted_low_rank(noise=0.3)
    form = choose_form(delta, total, RankRule("energy-rest", THRESHOLD), bf16_costs(delta), engine=engine,
                       generator=torch.Generator().manual_seed(0))
    assert form.kind == "lowrank" and form.svd_factors
    B, A, _ = round_trip(form.B, form.A, None, storage)
    measured = stored_error(delta, total, B, A, None, None)
    assert svd_stored_error(total, form.B, form.A, B, A) == pytest.approx(measured, rel=1e-4)
    B_q, A_q, scale = encode_factors(form.B, form.A, storage)  # as compress passes them: not decoded
    assert svd_stored_error(total, form.B, form.A, B_q, A_q, stored_scale=scale) == pytest.approx(measured, rel=1e-4)
    # Below SVD_ERROR_FLOOR of the energy it declines (the caller measures).
    assert svd_stored_error(total, form.B, form.A, B, A) is not None
    tight = choose_form(delta, total, RankRule("energy-rest", 0.999), bf16_costs(delta), engine=engine,
                        generator=torch.Generator().manual_seed(0))
    if tight.kind == "lowrank":
        assert svd_stored_error(total, tight.B, tight.A, *round_trip(tight.B, tight.A, None, storage)[:2]) is None


@pytest.mark.parametrize("shape", [(3000, 96), (96, 3000)])
@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_the_stored_error_of_a_bfloat16_product_from_norms(shape, storage, monkeypatch):
    """A noise-only update past the adaptive basis, its factor computed by a bfloat16 product: the
    same form, rank and bytes as the float32 product; svd_stored_error, given the product's
    measured error, agrees with the stored error measured on the [rows, cols] reconstruction (and
    without it would not: it would miss what the product added)."""
    monkeypatch.setattr(gram, "REDUCED_PRODUCT_MIN_WORK", 0)  # a product this small would stay float32
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    total, costs = energy(delta), bf16_source_costs(delta)
    rule = RankRule("energy-rest", THRESHOLD)
    plain = choose_form(delta, total, rule, costs)
    form = choose_form(delta, total, rule, costs, products=torch.bfloat16)
    assert plain.engine == "gram" and form.engine == "gram-bfloat16" and form.product_error is not None
    assert (form.kind, form.rank) == (plain.kind, plain.rank) == ("lowrank", plain.rank)
    B, A, _ = round_trip(form.B, form.A, None, storage)
    measured = stored_error(delta, total, B, A, None, None)
    estimated = svd_stored_error(total, form.B, form.A, B, A, form.product_error)
    assert estimated == pytest.approx(measured, rel=2e-5)
    B_q, A_q, scale = encode_factors(form.B, form.A, storage)  # as compress passes them: not decoded
    assert svd_stored_error(total, form.B, form.A, B_q, A_q, form.product_error,
                                  scale) == pytest.approx(estimated, rel=1e-6)
    plain_B, plain_A, _ = round_trip(plain.B, plain.A, None, storage)
    assert measured == pytest.approx(stored_error(delta, total, plain_B, plain_A, None, None), rel=1e-4)
    ignored = svd_stored_error(total, form.B, form.A, B, A)  # the product's error left out
    assert abs(ignored - measured) > 5 * abs(estimated - measured), (ignored, estimated, measured)


@pytest.mark.parametrize("conv1d", [False, True])
def test_output_error_is_the_relative_error_of_the_layers_outputs(conv1d, monkeypatch):
    """output_error against the outputs themselves: inputs X [n, in] with a far from isotropic
    spread (feature i scaled by 10^(-2i/in)), a low-rank + rows form, the relative error of the
    outputs X (delta - stored)^T, in both orientations (GPT-2's Conv1D stores [in, out], its rows
    input features), walked in blocks small enough to cross many block boundaries."""
    generator = torch.Generator().manual_seed(4)
    out_features, in_features, rank = 48, 40, 3
    X = torch.randn(500, in_features, generator=generator, dtype=torch.float64) \
        * torch.logspace(0, -2, in_features, dtype=torch.float64)  # [n, in]
    stored_rows, stored_cols = (in_features, out_features) if conv1d else (out_features, in_features)
    B = torch.randn(stored_rows, rank, generator=generator)
    A = torch.randn(rank, stored_cols, generator=generator)
    row_index = torch.tensor([2, 9, 30])
    rows = torch.randn(3, stored_cols, generator=generator)
    noise = torch.randn(stored_rows, stored_cols, generator=generator)
    delta = B @ A + scattered(stored_rows, row_index, rows) + 0.5 * noise  # what the form leaves: the noise
    residual = delta.double() - B.double() @ A.double() - scattered(stored_rows, row_index, rows.double())
    as_linear = (lambda matrix: matrix.T) if conv1d else (lambda matrix: matrix)  # [out, in]
    direct = float((X @ as_linear(residual).T).norm() / (X @ as_linear(delta.double()).T).norm())
    monkeypatch.setattr("inrank_convert.linalg.stored_error.PRODUCT_BLOCK_BYTES", 8 * in_features * 5)
    measured = output_error(delta, B, A, rows, row_index, X.T @ X, conv1d=conv1d)
    assert 0.05 < direct < 0.9
    assert measured == pytest.approx(direct, rel=1e-6)
    # The outputs, not the weights: an isotropic Gram gives the plain relative Frobenius error, which
    # differs from the output error under this spread of inputs.
    plain = output_error(delta, B, A, rows, row_index, torch.eye(in_features, dtype=torch.float64), conv1d=conv1d)
    assert plain == pytest.approx(stored_error(delta, energy(delta), B, A, rows, row_index), rel=1e-5)
    assert abs(plain - measured) > 0.01 * measured
    # An update that moves no output: an output error of 0, not a division by zero.
    assert output_error(torch.zeros(4, 4), torch.zeros(4, 1), torch.zeros(1, 4), None, None,
                        torch.eye(4, dtype=torch.float64)) == 0.0
