"""Fixtures of the linear algebra tests."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.forms import energy, planted_drift_and_rows


@pytest.fixture(scope="module")
def planted():
    """(delta, planted row indices, its energy, its float64 spectrum): a drift shared by every row of a
    tall update plus own updates on a few rows (an embedding), as in ``planted_drift_and_rows``."""
    delta, index = planted_drift_and_rows()
    total = energy(delta)
    values = torch.linalg.svdvals(delta.double())  # float64 reference spectrum
    return delta, index, total, values
