"""cli/inspect.py through ``inspect``: an artifact's header as JSON and as a table, for lowrank+rows
tensors (a grown vocabulary's new rows, a drifted embedding's rows) and their storage."""

from __future__ import annotations

import pytest

from inrank_convert import read_manifest
from tests.helpers.cli_contract import expect_ok, run_json
from tests.helpers.rows import GROWN, VOCAB, WTE


def test_inspect_shows_grown_rows(grown):
    pair, out = grown
    payload = run_json(["inspect", out, "--json"])
    layers = {layer["name"]: layer for layer in payload["layers"]}
    assert pair.grown
    for name in pair.grown:
        layer = layers[name]
        assert layer["kind"] == "lowrank+rows" and layer["rows"] >= GROWN and layer["reference_rows"] == VOCAB
        assert layer["storage"] == "int8" and 0.0 < layer["error"] < 1.0  # the default storage
    table = expect_ok(["inspect", out]).stdout
    [line] = [line for line in table.splitlines() if pair.grown[0] in line]
    assert "lowrank+rows" in line and f"{layers[pair.grown[0]]['rows']} ({GROWN} new)" in line
    assert "int8" in line
    totals = next(row for row in table.splitlines() if "reference:" in row)
    assert f"{len(pair.grown)} lowrank+rows" in totals


def test_inspect_shows_rows_and_storage(drifted):
    _, _, out, quantize = drifted
    storage = "bfloat16" if quantize == "none" else quantize
    payload = run_json(["inspect", out, "--json"])
    layers = {layer["name"]: layer for layer in payload["layers"]}
    assert layers and all({"name", "shape", "kind", "rank", "energy", "bytes", "dtype", "rows", "storage", "error"}
                          <= set(layer) for layer in layers.values())
    entry = read_manifest(out).tensors[WTE]
    wte = layers[WTE]
    assert (wte["kind"], wte["rank"], wte["rows"], wte["storage"]) == ("lowrank+rows", 1, entry.rows, storage)
    assert wte["error"] == pytest.approx(entry.error) and 0.0 < wte["error"] < 0.5
    assert wte["reference_rows"] is None
    dense = layers["transformer.h.0.ln_1.weight"]
    assert dense["kind"] == "dense" and dense["rows"] is None and dense["storage"] == "float32"
    assert layers["transformer.h.0.attn.c_attn.weight"]["storage"] == storage

    lines = expect_ok(["inspect", out]).stdout.splitlines()
    header = next(line for line in lines if "tensor" in line and "kind" in line)
    assert "rows" in header and "storage" in header and "rank" in header and "energy" in header
    [row] = [line for line in lines if WTE in line]
    cells = row.replace("│", " ").split()
    assert cells[:5] == [WTE, f"{VOCAB}x64", "lowrank+rows", "1", str(entry.rows)] and cells[-1] == storage
    totals = next(line for line in lines if "reference:" in line)
    assert "1 lowrank+rows" in totals


@pytest.mark.parametrize("named", [None, "energy", "energy-rest"])
def test_the_criterion_applied_is_the_one_inspect_shows(drifted, tmp_path, named):
    """The drifted embedding (a rank-1 drift holding >90% of its update), at -t 0.9: `--criterion energy`
    keeps the plain rule's rank 1 and nothing else; the default (energy-rest) keeps the drift and the rows.
    `compress --json`, `inspect`, `inspect --json` and the manifest all name the rule."""
    init_dir, trained_dir, _, _ = drifted
    out = tmp_path / "out"
    made = run_json(["compress", trained_dir, "--init", init_dir, "-o", out, "--json", "-t", "0.9",
                     *(["--criterion", named] if named else [])])
    applied = named or "energy-rest"
    rule = f"{applied}>=0.9"
    assert made["rule"] == rule and read_manifest(out).rule.criterion == applied
    payload = run_json(["inspect", out, "--json"])
    assert payload["rule"] == rule
    assert f"rule: {rule}" in expect_ok(["inspect", out]).stdout
    wte = {layer["name"]: layer for layer in payload["layers"]}[WTE]
    if applied == "energy":
        assert (wte["kind"], wte["rank"], wte["rows"]) == ("lowrank", 1, None)
    else:
        assert wte["kind"] == "lowrank+rows" and wte["rank"] == 1 and wte["rows"] > 0
