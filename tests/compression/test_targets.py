"""A global size budget: the greedy allocation alone (``inrank_convert.budget``, synthetic spectra),
the forms of a given size, and ``compress --target-ratio / --target-size`` end to end (real tiny
models: the artifact file, header included, never passes the target; bad input is one line)."""

from __future__ import annotations

import math
import re
import struct

import pytest
import torch
from cli_contract import expect_error, expect_ok
from conftest import build_model, gpt2_config, make_pair, save_hf, train_state

from inrank_convert import PlanOptions, compress, open_artifact
from inrank_convert.artifact import ARTIFACT_FILE, RuleRecord, artifact_bytes, read_manifest
from inrank_convert.linalg.budget import BudgetTooSmall, TensorUnits, allocate, minimum_bytes
from inrank_convert.linalg.criteria import RankRule
from inrank_convert.linalg.forms import Costs, choose_form

WTE = "transformer.wte.weight"

# --------------------------------------------------------------------------- the allocation alone


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


# --------------------------------------------------------------------------- forms of a given size


def drift_plus_rows(rows: int = 600, cols: int = 24, planted: int = 40, seed: int = 0) -> torch.Tensor:
    """An embedding-like update: one drift shared by every row (rank 1, most of the energy) plus own rows."""
    generator = torch.Generator().manual_seed(seed)
    delta = torch.ones(rows, 1) @ torch.randn(1, cols, generator=generator)
    index = torch.randperm(rows, generator=generator)[:planted]
    delta[index] += 0.5 * torch.randn(planted, cols, generator=generator)
    return delta


def test_allocated_forms_have_the_sizes_asked_for():
    delta = drift_plus_rows()
    total = float(delta.double().pow(2).sum())
    costs = Costs(2, 0, delta.numel() * 4)
    lowrank = choose_form(delta, total, RankRule(), costs, "exact", allocation=(3, None))
    assert lowrank.kind == "lowrank" and lowrank.rank == 3 and lowrank.B.shape == (600, 3)
    rows = choose_form(delta, total, RankRule(), costs, "exact", allocation=(1, 25))
    assert rows.kind == "lowrank+rows" and rows.rank == 1 and rows.stored_rows == 25
    assert rows.energy > lowrank.energy  # the planted rows are what low rank cannot keep
    rank_only = choose_form(delta, total, RankRule(), costs, "exact", allocation=(1, 0))
    assert rank_only.kind == "lowrank" and rank_only.rank == 1
    assert choose_form(delta, total, RankRule(), costs, "exact", allocation=(0, 0)).kind == "zero"
    assert choose_form(delta, total, RankRule(), costs, "exact", allocation=(0, None)).kind == "zero"


# --------------------------------------------------------------------------- compress end to end


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("budget"), "gpt2")


def header_bytes(folder) -> int:
    data = (folder / ARTIFACT_FILE).read_bytes()
    return 8 + struct.unpack("<Q", data[:8])[0]


def relative_error(artifact_dir, pair) -> float:
    """||W - W_stored||_F / ||W - W_init||_F over the factorized tensors."""
    artifact = open_artifact(artifact_dir)
    error = energy = 0.0
    for name in pair.factorized_names():
        if name not in artifact.manifest.tensors or artifact.manifest.tensors[name].is_alias:
            continue
        trained, init = pair.trained_state[name].double(), pair.init_state[name].double()
        restored = artifact.reconstruct(name).double()
        error += float((trained - restored).pow(2).sum())
        energy += float((trained - init).pow(2).sum())
    artifact.close()
    return (error / energy) ** 0.5


@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.6])
def test_target_ratio_is_met_and_recorded(pair, tmp_path, ratio):
    out = tmp_path / "out"
    result = compress(pair.trained_dir, out, init=pair.init_dir, options=PlanOptions(target_ratio=ratio))
    target = math.floor(ratio * result.original_bytes)
    assert artifact_bytes(out) <= target
    assert result.compressed_bytes == artifact_bytes(out)
    rule = read_manifest(out).rule
    assert rule.criterion == "budget" and rule.target_bytes == target
    assert rule.threshold == pytest.approx(ratio, abs=1e-5)
    kinds = {layer.kind for layer in result.layers}
    assert "lowrank" in kinds
    # 1-D tensors are always kept as they are.
    one_d = [layer for layer in result.layers if len(layer.shape) == 1]
    assert one_d and all(layer.kind == "dense" for layer in one_d)


def test_more_budget_never_stores_more_error(pair, tmp_path):
    errors = []
    for ratio in (0.12, 0.25, 0.5):
        out = tmp_path / f"r{ratio}"
        compress(pair.trained_dir, out, init=pair.init_dir, options=PlanOptions(target_ratio=ratio))
        errors.append(relative_error(out, pair))
    assert errors == sorted(errors, reverse=True)
    assert errors[0] > errors[-1]


def test_target_size_is_honoured_to_the_byte_at_its_minimum(pair, tmp_path):
    """The refusal names the least target that works; that very target works, one byte less does not."""
    out = tmp_path / "out"
    line = expect_error(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", out, "--target-size", 1000],
                        says=("--target-size", "bytes", "%"), output=out, inputs=(pair.trained_dir,))
    minimum = int(re.search(r"below the (\d+) bytes", line).group(1))
    expect_error(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", out, "--target-size", minimum - 1],
                 says=(str(minimum),), output=out)
    expect_ok(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", out, "--target-size", minimum, "--quiet"])
    assert artifact_bytes(out) <= minimum
    # The header bound holds, and at the minimum every factorized tensor is stored as nothing.
    manifest = read_manifest(out)
    factorized = [manifest.tensors[name] for name in pair.factorized_names() if not manifest.tensors[name].is_alias]
    assert factorized and all(entry.kind == "zero" for entry in factorized)
    assert header_bytes(out) < minimum


def test_target_size_matches_target_ratio(pair, tmp_path):
    by_ratio = compress(pair.trained_dir, tmp_path / "a", init=pair.init_dir, options=PlanOptions(target_ratio=0.3))
    size = math.floor(0.3 * by_ratio.original_bytes)
    by_size = compress(pair.trained_dir, tmp_path / "b", init=pair.init_dir, options=PlanOptions(target_size=size))
    assert [(layer.name, layer.kind, layer.rank) for layer in by_ratio.layers] == \
        [(layer.name, layer.kind, layer.rank) for layer in by_size.layers]
    assert artifact_bytes(tmp_path / "b") <= size


def test_int8_budget_buys_more_rank(pair, tmp_path):
    plain = compress(pair.trained_dir, tmp_path / "a", init=pair.init_dir, options=PlanOptions(target_ratio=0.3))
    int8 = compress(pair.trained_dir, tmp_path / "b", init=pair.init_dir,
                    options=PlanOptions(target_ratio=0.3, quantize="int8"))
    assert artifact_bytes(tmp_path / "b") <= math.floor(0.3 * int8.original_bytes)
    rank = sum(layer.rank or 0 for layer in plain.layers if layer.kind == "lowrank")
    rank8 = sum(layer.rank or 0 for layer in int8.layers if layer.kind == "lowrank")
    assert rank8 > rank


def test_rule_record_without_a_target_reads_as_before():
    old = {"criterion": "energy", "threshold": 0.9, "rank": None}
    record = RuleRecord.from_json(old)
    assert record.target_bytes is None and record.to_json() == old and record.describe() == "energy>=0.9"
    budget = RuleRecord("budget", 0.1, None, 12345)
    assert RuleRecord.from_json(budget.to_json()) == budget and "12345" in budget.describe()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5"])
def test_target_ratio_outside_0_1_is_refused(pair, tmp_path, value):
    out = tmp_path / "out"
    expect_error(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", out, "--target-ratio", value],
                 says=("--target-ratio", "(0, 1]"), output=out, inputs=(pair.trained_dir,))


def test_target_below_the_kept_tensors_names_the_minimum(pair, tmp_path):
    out = tmp_path / "out"
    line = expect_error(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", out, "--target-ratio", "0.001"],
                        says=("--target-ratio", "bytes", "%", "kept whole"), output=out, inputs=(pair.trained_dir,))
    minimum = int(re.search(r"below the (\d+) bytes", line).group(1))
    ratio = float(re.search(r"\(([\d.]+)% of the dense", line).group(1)) / 100
    dense = int(re.search(r"of the dense (\d+)\)", line).group(1))
    assert minimum / dense == pytest.approx(ratio, abs=1e-6)


@pytest.mark.parametrize("extra, says", [
    (["--threshold", "0.9"], "--threshold"),
    (["-t", "0.5"], "--threshold"),
    (["--rank", "4"], "--rank"),
    (["--target-size", "100000"], "--target-size"),
    (["--embed-init"], "--embed-init"),
])
def test_target_with_a_conflicting_option_is_refused(pair, tmp_path, extra, says):
    out = tmp_path / "out"
    expect_error(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", out, "--target-ratio", "0.3", *extra],
                 says=(says, "--target-ratio"), output=out, inputs=(pair.trained_dir,))


def test_target_size_must_be_positive(pair, tmp_path):
    out = tmp_path / "out"
    expect_error(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", out, "--target-size", "0"],
                 says=("--target-size", "positive"), output=out)


# --------------------------------------------------------------------------- rows under a budget


def drift_pair(folder):
    """A tiny GPT-2 pair whose token embedding's update is a drift shared by every row (most of its
    energy) plus own updates on 24 of its 320 rows; the other matrices get planted low-rank updates."""
    config = gpt2_config()
    model = build_model(config, seed=11)
    init_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    init_state["lm_head.weight"] = init_state[WTE]
    trained = train_state(init_state, seed=12)
    trained[WTE] = init_state[WTE] + drift_plus_rows(*init_state[WTE].shape, planted=24, seed=13) * 0.05
    trained["lm_head.weight"] = trained[WTE]
    return save_hf(model, init_state, folder / "init"), save_hf(model, trained, folder / "trained")


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_an_embedding_drift_gets_rank_1_and_rows_within_the_budget(tmp_path, quantize):
    init_dir, trained_dir = drift_pair(tmp_path)
    sizes = []
    for ratio in (0.2, 0.4):
        out = tmp_path / f"out{ratio}"
        result = compress(trained_dir, out, init=init_dir, options=PlanOptions(target_ratio=ratio, quantize=quantize))
        assert artifact_bytes(out) <= math.floor(ratio * result.original_bytes)
        entry = read_manifest(out).tensors[WTE]
        assert entry.kind == "lowrank+rows" and entry.rank == 1 and entry.rows > 0
        rows, cols = entry.shape
        element, vector = (1, 4) if quantize else (2, 0)
        # Stored bytes follow from the sizes alone: what the allocation counted.
        assert entry.bytes == (rows + cols) * element + vector + entry.rows * (cols * element + vector + 8)
        sizes.append(entry.rows)
    assert sizes[0] <= sizes[1]


def test_grown_vocabulary_keeps_its_new_rows_within_the_budget(tmp_path):
    from test_rows import GROWN, grown_pair

    pair = grown_pair(tmp_path, "gpt2")
    out = tmp_path / "out"
    result = compress(pair.ft_dir, out, init=pair.base_dir, options=PlanOptions(target_ratio=0.3))
    assert artifact_bytes(out) <= math.floor(0.3 * result.original_bytes)
    manifest = read_manifest(out)
    assert pair.grown
    for name in pair.grown:
        entry = manifest.tensors[name]
        assert entry.kind in ("lowrank+rows", "dense")
        if entry.kind == "lowrank+rows":
            assert entry.rows >= GROWN and entry.reference_rows == entry.shape[0] - GROWN
    artifact = open_artifact(out)
    try:
        assert tuple(artifact.reconstruct(WTE).shape) == tuple(pair.ft_state[WTE].shape)
    finally:
        artifact.close()
