"""compression/targets.py: a global size target, ``compress --target-ratio / --target-size`` end to
end on real tiny models: the artifact file, header included, never passes the target; more budget
never stores more error; rows under a budget, a grown vocabulary's included; bad input is one line.
The allocation alone: linalg/test_budget.py."""

from __future__ import annotations

import math
import re
import struct

import pytest

from inrank_convert import PlanOptions, compress, open_artifact
from inrank_convert.artifact import ARTIFACT_FILE, artifact_bytes, read_manifest
from tests.conftest import build_model, gpt2_config, make_pair, save_hf, train_state
from tests.helpers.cli_contract import expect_error, expect_ok
from tests.helpers.forms import drift_plus_rows
from tests.helpers.rows import GROWN, grown_pair

WTE = "transformer.wte.weight"


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
    plain = compress(pair.trained_dir, tmp_path / "a", init=pair.init_dir,
                     options=PlanOptions(target_ratio=0.3, quantize="none"))
    int8 = compress(pair.trained_dir, tmp_path / "b", init=pair.init_dir, options=PlanOptions(target_ratio=0.3))
    assert artifact_bytes(tmp_path / "b") <= math.floor(0.3 * int8.original_bytes)
    rank = sum(layer.rank or 0 for layer in plain.layers if layer.kind == "lowrank")
    rank8 = sum(layer.rank or 0 for layer in int8.layers if layer.kind == "lowrank")
    assert rank8 > rank


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


@pytest.mark.parametrize("quantize", ["none", "int8"])
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
        element, vector = (1, 4) if quantize == "int8" else (2, 0)
        # Stored bytes follow from the sizes alone: what the allocation counted.
        assert entry.bytes == (rows + cols) * element + vector + entry.rows * (cols * element + vector + 8)
        sizes.append(entry.rows)
    assert sizes[0] <= sizes[1]


def test_grown_vocabulary_keeps_its_new_rows_within_the_budget(tmp_path):
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
