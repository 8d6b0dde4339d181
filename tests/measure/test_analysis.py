"""measure/analysis.py (``spectrum``): the exact singular values of every factorizable update, and
the rank each threshold gives (the rank compress keeps, against a float64 oracle), thresholds parsed
and checked."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.core.errors import UsageError
from inrank_convert.measure.analysis import SPECTRUM_VALUES_KEPT, parse_thresholds, spectrum_report
from tests.conftest import energy_rank_float64, form_rank_float64, inrank_rank_float64


def test_thresholds_are_parsed_and_must_lie_in_0_1():
    assert parse_thresholds("0.5,0.9, 0.99,") == [0.5, 0.9, 0.99]
    assert parse_thresholds("1") == [1.0]
    for text, says in (("0.5,high", "cannot parse thresholds"), ("0,0.9", r"must lie in \(0, 1\]"),
                       ("1.5", "must lie in"), ("", "must lie in"), (" , ", "must lie in")):
        with pytest.raises(UsageError, match=says):
            parse_thresholds(text)


@pytest.mark.parametrize("criterion, oracle", [("energy-rest", form_rank_float64), ("energy", energy_rank_float64),
                                               ("inrank", inrank_rank_float64)])
def test_the_spectrum_and_ranks_of_every_update_against_float64(llama_pair, criterion, oracle):
    thresholds = [0.5, 0.9]
    result = spectrum_report(llama_pair.trained_dir, thresholds, criterion, init=llama_pair.init_dir)
    assert (result.reference_mode, result.criterion, result.thresholds) == ("reference", criterion, thresholds)
    assert {layer.name for layer in result.layers} == set(llama_pair.factorized_names())
    for layer in result.layers:
        delta = llama_pair.trained_state[layer.name].double() - llama_pair.init_state[layer.name].double()
        exact = torch.linalg.svdvals(delta)
        assert len(layer.singular_values) == min(SPECTRUM_VALUES_KEPT, exact.numel())
        assert torch.allclose(torch.tensor(layer.singular_values, dtype=torch.float64), exact[:SPECTRUM_VALUES_KEPT],
                              rtol=1e-4, atol=1e-6 * float(exact[0])), layer.name
        assert layer.total_energy == pytest.approx(float(delta.square().sum()), rel=1e-6)
        assert layer.ranks == {t: oracle(delta, t) for t in thresholds}, layer.name
        assert layer.ranks[0.5] <= layer.ranks[0.9]
        payload = layer.to_json()
        assert payload["full_rank"] == min(layer.shape) and set(payload["ranks"]) == {"0.5", "0.9"}
        assert payload["frobenius_norm"] == pytest.approx(float(delta.norm()), rel=1e-6)
