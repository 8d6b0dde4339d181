"""linalg/budget.py: the greedy allocation of ranks and rows to a size budget, on synthetic spectra:
the budget honoured to the byte, the steeper spectrum first, the dense fallback, rows units and
their fixed part, a budget below what must be kept."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from inrank_convert.linalg.budget import BudgetTooSmall, TensorUnits, allocate, band_chain, minimum_bytes


def spectrum_units(values: list[float], rows: int, cols: int, element: int = 2, dense_element: int = 4) -> TensorUnits:
    """A low-rank tensor's units from singular values (gains s_i^2 / sum s^2), bf16 factors of a float32 tensor."""
    energies = [v * v for v in values]
    total = sum(energies)
    return TensorUnits(tuple(e / total for e in energies), len(values), (rows + cols) * element,
                       (rows + cols) * element, rows * cols * dense_element)


def synthetic_tensors(seed: int = 0) -> list[TensorUnits]:
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for rows, cols, decay in ((64, 64, 0.9), (128, 32, 0.7), (96, 48, 0.97), (40, 200, 0.5), (16, 16, 0.99)):
        n = min(rows, cols)
        noise = 1.0 + 0.1 * torch.rand(n, generator=generator)
        values = sorted((noise * decay ** torch.arange(n, dtype=torch.float64)).tolist(), reverse=True)
        tensors.append(spectrum_units(values, rows, cols))
    return tensors


def next_step_cost(tensor: TensorUnits, units: int, dense: bool, gain: float) -> float:
    """The cheapest step that would still add energy: a tensor's next unit (while cheaper than dense) or going dense."""
    if dense:
        return math.inf
    costs = []
    if units < len(tensor.gains) and tensor.gains[units] > 1e-12 and tensor.cost(units + 1) < tensor.dense:
        costs.append(tensor.cost(units + 1) - tensor.cost(units))
    if tensor.dense_gain > gain + 1e-12:
        costs.append(tensor.dense - tensor.cost(units))
    return min(costs, default=math.inf)


def test_budget_is_honoured_to_the_byte_on_synthetic_spectra():
    tensors = synthetic_tensors()
    full = sum(tensor.dense for tensor in tensors)
    budgets = sorted([0, 1, 255, 1000, 4097, 12345, full // 10, full // 3, full // 2, full - 1, full, 2 * full])
    assert budgets
    gains = []
    for budget in budgets:
        given = allocate(tensors, budget)
        assert len(given) == len(tensors)
        spent = sum(item.bytes for item in given)
        assert spent <= budget
        for tensor, item in zip(tensors, given, strict=True):
            assert item.bytes == (tensor.dense if item.dense else tensor.cost(item.units))
            # Nothing left over could buy one more step of any tensor: the budget is used to the byte.
            assert budget - spent < next_step_cost(tensor, item.units, item.dense, item.gain)
        gains.append(sum(item.gain for item in given))
    assert gains == sorted(gains), "more budget never keeps less energy"
    assert gains[-1] == pytest.approx(len(tensors))  # everything fits: every tensor whole


def test_greedy_takes_the_steeper_spectrum_first():
    steep = spectrum_units([10.0, 1.0, 1.0, 1.0], 8, 8)  # first unit: 97% of its energy
    flat = spectrum_units([1.0, 1.0, 1.0, 1.0], 8, 8)  # each unit: 25%
    unit = steep.lead_cost
    one = allocate([flat, steep], unit)
    assert [item.units for item in one] == [0, 1]
    # The second unit goes to the flat spectrum (25% of its energy beats the steep one's 1%).
    two = allocate([flat, steep], 2 * unit)
    assert [item.units for item in two] == [1, 1]


def test_dense_fallback_when_the_allocation_would_cost_the_dense_bytes():
    # 3 units of 100 bytes, dense 250: two units (200 bytes, 70%) or dense (250 bytes, 100%), never 3 units.
    tensor = TensorUnits((0.4, 0.3, 0.3), 3, 100, 100, 250)
    at_dense = allocate([tensor], 250)[0]
    assert at_dense.dense and at_dense.bytes == 250 and at_dense.gain == 1.0
    assert allocate([tensor], 10_000)[0].dense
    below = allocate([tensor], 249)[0]
    assert not below.dense and below.units == 2 and below.bytes == 200
    # A tensor whose forced part alone costs its dense bytes starts dense.
    forced = TensorUnits((0.5,), 0, 10, 10, 100, fixed=120, fixed_gain=0.5)
    assert minimum_bytes([forced]) == 100
    assert allocate([forced], 100)[0].dense


def test_rows_units_take_the_dominant_component_first_and_count_their_fixed_rows():
    # A rows-form tensor: 1 component of 400 bytes, then rows of 70 bytes each, 2 forced rows (140 bytes).
    tensor = TensorUnits((0.6, 0.1, 0.1, 0.05), 1, 400, 70, 10_000, fixed=140, fixed_gain=0.1)
    assert tensor.cost(0) == 140 and tensor.cost(1) == 540 and tensor.cost(3) == 680
    given = allocate([tensor], 700)[0]
    assert (given.units, given.bytes) == (3, 680)
    assert given.split(tensor.lead) == (1, 2)
    assert given.gain == pytest.approx(0.1 + 0.6 + 0.1 + 0.1)


def test_budget_below_the_fixed_part_is_refused():
    tensors = [TensorUnits((1.0,), 1, 10, 10, 100, fixed=30), TensorUnits((1.0,), 1, 10, 10, 50)]
    assert minimum_bytes(tensors) == 30
    with pytest.raises(BudgetTooSmall) as caught:
        allocate(tensors, 29)
    assert caught.value.minimum == 30
    assert [item.bytes for item in allocate(tensors, 30)] == [30, 0]


def test_leading_components_at_their_own_cost():
    """int4 stores the two leading components at 8 bits: ``head_costs`` prices them apart, and the
    allocation is the brute-force best over every split of a small budget."""
    import itertools

    tensors = [TensorUnits((0.5, 0.2, 0.1, 0.1, 0.1), 5, 30, 30, 1000, head_costs=(60, 60)),
               TensorUnits((0.3, 0.3, 0.2, 0.2), 4, 20, 20, 1000, head_costs=(40, 40)),
               TensorUnits((0.6, 0.1, 0.1, 0.1, 0.1), 1, 50, 12, 1000, head_costs=(90,))]  # lead 1, then rows
    assert tensors[0].cost(0) == 0 and tensors[0].cost(1) == 60 and tensors[0].cost(3) == 150
    assert tensors[2].cost(1) == 90 and tensors[2].cost(3) == 114  # one component, then rows at 12
    for budget in (59, 60, 100, 150, 200, 260, 330):
        given = allocate(tensors, budget)
        assert sum(item.bytes for item in given) <= budget
        best = max(sum(sum(t.gains[:n]) for t, n in zip(tensors, counts, strict=True))
                   for counts in itertools.product(*(range(len(t.gains) + 1) for t in tensors))
                   if sum(t.cost(n) for t, n in zip(tensors, counts, strict=True)) <= budget)
        got = sum(item.gain for item in given)
        # The greedy walks each tensor's concave hull: within one step's gain of the optimum.
        assert best - 0.3 <= got <= best + 1e-12, (budget, got, best)


# --------------------------------------------------------------------------- precision bands (mixed storage)

BAND_ERRORS = {8: 0.0001, 4: 0.02, 3: 0.07, 2: 0.25}  # a component's energy left as error at each width
BAND_COSTS = {8: 10, 4: 5, 3: 4, 2: 3}  # bytes of one component at each width
BAND_SPECTRA = [(0.5, 0.2, 0.1, 0.08, 0.06, 0.03), (0.3, 0.25, 0.2, 0.15, 0.05, 0.05), (0.9, 0.05, 0.02, 0.01, 0.01, 0.01)]


def _band_value(bands, gains) -> float:
    widths = [bits for bits, count in bands for _ in range(count)]
    return sum(gain * (1 - BAND_ERRORS[bits]) for gain, bits in zip(gains, widths, strict=False))


def _band_cost(bands) -> int:
    return sum(BAND_COSTS[bits] * count for bits, count in bands)


def _every_band_choice(rank: int) -> list[tuple[tuple[int, int], ...]]:
    """Every bands a tensor of ``rank`` components can take: any count at each width, widest first."""
    return [tuple((bits, k) for bits, k in zip((8, 4, 3, 2), counts, strict=True) if k)
            for counts in itertools.product(range(rank + 1), repeat=4) if sum(counts) <= rank]


@pytest.mark.parametrize("gains", BAND_SPECTRA)
def test_band_chain_is_the_brute_force_optimum_at_each_of_its_points(gains):
    chain = band_chain(gains, BAND_COSTS, BAND_ERRORS, limit=10**9)
    choices = _every_band_choice(len(gains))
    assert chain.bands[0] == () and chain.bands[-1] == ((8, len(gains)),)  # it ends at every component at 8 bits
    for count, bands in enumerate(chain.bands):
        # The moves' gains and costs add up to what the bands are worth and cost ...
        assert sum(chain.gains[:count]) == pytest.approx(_band_value(bands, gains), abs=1e-12)
        assert sum(chain.costs[:count]) == _band_cost(bands)
        # ... and no choice of widths in as many bytes is worth more.
        best = max(_band_value(choice, gains) for choice in choices if _band_cost(choice) <= _band_cost(bands))
        assert _band_value(bands, gains) == pytest.approx(best, abs=1e-12), bands
    # The limit stops it: nothing past the bytes given.
    short = band_chain(gains, BAND_COSTS, BAND_ERRORS, limit=20)
    assert sum(short.costs) <= 20 and short.bands == chain.bands[:len(short.bands)]


def test_allocate_over_band_chains_is_near_the_brute_force_optimum():
    first, second = BAND_SPECTRA[0], BAND_SPECTRA[1]
    chains = [band_chain(gains, BAND_COSTS, BAND_ERRORS, limit=1000) for gains in (first, second)]
    points = [[(_band_cost(choice), _band_value(choice, gains)) for choice in _every_band_choice(6)]
              for gains in (first, second)]
    exact = 0
    budgets = range(7, 121, 7)
    for budget in budgets:
        given = allocate([chain.units(dense=1000) for chain in chains], budget)
        assert sum(item.bytes for item in given) <= budget
        got = sum(item.gain for item in given)
        best = max(a_gain + b_gain for a_cost, a_gain in points[0] for b_cost, b_gain in points[1]
                   if a_cost + b_cost <= budget)
        assert got <= best + 1e-12 and got >= 0.99 * best, (budget, got, best)
        exact += got >= best - 1e-12
    assert exact >= len(budgets) // 2
