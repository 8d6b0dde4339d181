"""The CLI through typer's CliRunner: every command, and every --json output parses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from inrank_convert import __version__
from inrank_convert.cli import app

LAYER_KEYS = {"name", "shape", "kind", "rank", "energy", "bytes"}


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def run_json(*args: str) -> dict:
    return json.loads(run(*args, "--json").stdout)


def test_compress_and_inspect_json_agree(tmp_path, gpt2_pair):
    out = tmp_path / "out"
    compressed = run_json("compress", gpt2_pair.trained_dir, "--init", gpt2_pair.init_dir, "-o", out)
    for key in ("original_bytes", "compressed_bytes", "ratio", "reference", "layers"):
        assert key in compressed
    assert compressed["reference"] == "reference"
    assert compressed["layers"]
    assert all(LAYER_KEYS <= set(layer) for layer in compressed["layers"])
    assert {layer["kind"] for layer in compressed["layers"]} <= {"lowrank", "dense", "zero"}
    inspected = run_json("inspect", out)
    assert inspected["compressed_bytes"] == compressed["compressed_bytes"]
    assert inspected["ratio"] == pytest.approx(compressed["ratio"])
    simplify = lambda layers: [{k: layer[k] for k in LAYER_KEYS} for layer in layers]  # noqa: E731
    assert simplify(inspected["layers"]) == simplify(compressed["layers"])
    assert 0 < compressed["ratio"] < 0.5


def test_compress_table_output(tmp_path, llama_pair):
    result = run("compress", llama_pair.trained_dir, "--init", llama_pair.init_dir, "-o", tmp_path / "out",
                 "--threshold", "0.8", "--criterion", "inrank", "--svd", "exact")
    assert "lowrank" in result.stdout and "reference: reference" in result.stdout
    inspect = run("inspect", tmp_path / "out")
    assert "model.layers.0.mlp.up_proj.weight" in inspect.stdout and "inrank>=0.8" in inspect.stdout


def test_dry_run_writes_nothing(tmp_path, gpt2_pair):
    plan = run_json("compress", gpt2_pair.trained_dir, "--init", gpt2_pair.init_dir, "-o", tmp_path / "out",
                    "--dry-run", "--no-embeddings")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".inrank-tmp-*"))
    actions = {entry["name"]: entry["action"] for entry in plan["layers"]}
    assert actions["transformer.wte.weight"] == "dense" and actions["transformer.h.0.mlp.c_fc.weight"] == "factorize"
    # The same JSON shape as compress --json: every key of the real run, with what only the SVD can tell null.
    done = run_json("compress", gpt2_pair.trained_dir, "--init", gpt2_pair.init_dir, "-o", tmp_path / "real",
                    "--no-embeddings")
    assert set(plan) - {"dry_run"} == set(done) and plan["dry_run"] is True
    assert plan["original_bytes"] == done["original_bytes"] and plan["tied"] == done["tied"]
    assert plan["source"] == done["source"] and plan["reference"] == done["reference"] and plan["rule"] == done["rule"]
    assert [layer["name"] for layer in plan["layers"]] == [layer["name"] for layer in done["layers"]]
    assert all(set(real) <= set(planned) | {"energy", "svd", "storage", "error", "bands"}
               for planned, real in zip(plan["layers"], done["layers"], strict=True))
    assert plan["ratio"] is None and all(layer["rank"] is None for layer in plan["layers"])
    table = run("compress", gpt2_pair.trained_dir, "--init", gpt2_pair.init_dir, "--dry-run")
    assert "factorize" in table.stdout and "nothing written" in table.stdout


def test_default_output_name(tmp_path, gpt2_pair):
    run("compress", gpt2_pair.trained_dir, "--init", gpt2_pair.init_dir, "-q")
    assert (gpt2_pair.trained_dir.parent / "gpt2-trained-inrank" / "inrank.safetensors").is_file()


def test_spectrum_json_and_plot(tmp_path, gpt2_pair):
    plot = tmp_path / "spectra.png"
    spectrum = run_json("spectrum", gpt2_pair.trained_dir, "--init", gpt2_pair.init_dir,
                        "--thresholds", "0.5,0.9,0.99", "--plot", plot)
    assert spectrum["thresholds"] == [0.5, 0.9, 0.99]
    layer = next(item for item in spectrum["layers"] if item["name"] == "transformer.h.0.attn.c_attn.weight")
    assert layer["ranks"]["0.5"] <= layer["ranks"]["0.9"] <= layer["ranks"]["0.99"] <= 64
    assert layer["singular_values"] == sorted(layer["singular_values"], reverse=True)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = run("spectrum", gpt2_pair.trained_dir, "--init", gpt2_pair.init_dir, "--criterion", "inrank")
    assert "r@0.9" in table.stdout
    # A plot path that is no image format fails before the spectra are computed, and writes nothing.
    wrong = tmp_path / "spectra.safetensors"
    failed = CliRunner().invoke(app, ["spectrum", str(gpt2_pair.trained_dir), "--init", str(gpt2_pair.init_dir),
                                      "--plot", str(wrong)])
    assert failed.exit_code == 2 and "not an image format" in failed.stderr and "Traceback" not in failed.output
    assert failed.stderr.strip().count("\n") == 0 and not wrong.exists()


def test_spectrum_ranks_match_compress(tmp_path, llama_pair):
    spectrum = run_json("spectrum", llama_pair.trained_dir, "--init", llama_pair.init_dir, "--thresholds", "0.8")
    compressed = run_json("compress", llama_pair.trained_dir, "--init", llama_pair.init_dir, "-o", tmp_path / "o",
                          "--threshold", "0.8")
    ranks = {layer["name"]: layer["rank"] for layer in compressed["layers"] if layer["kind"] == "lowrank"}
    assert ranks and set(ranks) <= {layer["name"] for layer in spectrum["layers"]}
    for layer in spectrum["layers"]:
        if layer["name"] in ranks:
            assert layer["ranks"]["0.8"] == ranks[layer["name"]], layer["name"]


def test_decompress_and_verify(tmp_path, llama_pair):
    out = tmp_path / "out"
    run("compress", llama_pair.trained_dir, "--init", llama_pair.init_dir, "-o", out, "-q")
    verified = run_json("verify", out)
    assert verified["ok"] and verified["checksums_ok"] and verified["reference_ok"] and verified["source_checked"]
    assert verified["layers"]
    for layer in verified["layers"]:
        assert layer["measured_error"] == pytest.approx(layer["expected_error"], rel=1e-3, abs=1e-6)
    assert "verify: OK" in run("verify", out).stdout
    decompressed = run_json("decompress", out, "-o", tmp_path / "dense")
    assert (tmp_path / "dense" / "model.safetensors").is_file() and decompressed["tensors"] > 0


def test_verify_detects_a_damaged_factor(tmp_path, gpt2_pair):
    out = tmp_path / "out"
    run("compress", gpt2_pair.trained_dir, "--init", gpt2_pair.init_dir, "-o", out, "-q")
    file = out / "inrank.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the last tensor's data, header intact
    file.write_bytes(bytes(data))
    result = run("verify", out, ok=False)
    assert result.exit_code == 1
    assert "MISMATCH" in result.stdout and result.stderr.count("\n") == 1


def test_version_and_help():
    assert __version__ in run("--version").stdout
    for command in ("compress", "inspect", "spectrum", "decompress", "verify"):
        assert "Example: inrank-convert " + command in run(command, "--help").stdout


def test_python_dash_m_entry_point(tmp_path, gpt2_pair):
    result = subprocess.run([sys.executable, "-m", "inrank_convert", "compress", str(gpt2_pair.trained_dir),
                             "--init", str(gpt2_pair.init_dir), "-o", str(tmp_path / "out"), "--json"],
                            capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["reference"] == "reference"
