"""Calibration and size targets on a real run (the session's ``real_run``: a 2x64 GPT-2 trained on Tiny
Shakespeare with the GPT-2 tokenizer, perplexity on held-out text): calibrated compression, the
global budget against uniform thresholds, the perplexity target, and ``sweep`` against ``compress``
+ ``report``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from inrank_convert import PlanOptions, compress, load_compressed
from inrank_convert.artifact import Artifact, artifact_bytes, read_manifest
from inrank_convert.artifact.storage import round_trip
from inrank_convert.compression.calibration import collect_statistics
from inrank_convert.compression.job import CalibrationRequest
from inrank_convert.compression.perplexity_target import compress_to_perplexity
from inrank_convert.inputs.sources import open_artifact
from inrank_convert.inputs.text import load_tokenizer, read_text, tokenize_text
from inrank_convert.linalg.whitening import WHITENED_ENGINE
from inrank_convert.runtime.evaluate import perplexity
from inrank_convert.runtime.modeling import load_dense, model_config
from tests.conftest import GPT2_TOKENIZER_DIR, REAL_TEXT, needs_real_data, saved_byte_level_bpe
from tests.helpers.cli_contract import expect_error, expect_ok

pytestmark = needs_real_data
CALIB_TOKENS = 8192


def measured(folder: Path, tokens: torch.Tensor) -> float:
    return perplexity(load_compressed(folder), tokens).perplexity


@pytest.fixture(scope="module")
def dense_perplexity(real_run) -> float:
    return perplexity(load_dense(real_run.trained, model_config(real_run.trained)), real_run.tokens).perplexity


@pytest.fixture(scope="module")
def calibrated(real_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("calibrated") / "artifact"
    compress(real_run.run, out, options=PlanOptions(target_ratio=0.15),
             calibration=CalibrationRequest(real_run.train_text, CALIB_TOKENS))
    return out


def test_calibrated_compress_is_recorded_and_honours_the_budget(real_run, calibrated):
    manifest = read_manifest(calibrated)
    text = read_text(real_run.train_text)
    assert manifest.calibration["text_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert manifest.calibration["tokens"] == CALIB_TOKENS and manifest.calibration["damping"] > 0
    assert artifact_bytes(calibrated) <= manifest.rule.target_bytes == int(0.15 * manifest.original_bytes)
    whitened = [name for name, entry in manifest.tensors.items() if entry.svd == WHITENED_ENGINE]
    # Every block projection (nn Conv1D) has an input Gram; the token embedding has none.
    assert len(whitened) == 8 and all(".h." in name for name in whitened), whitened
    assert manifest.tensors["transformer.wte.weight"].svd != WHITENED_ENGINE
    shown = json.loads(expect_ok(["inspect", calibrated, "--json"]).stdout)
    assert shown["calibration"] == manifest.calibration and "perplexity_target" not in shown
    assert "calibrated on 8192 tokens" in expect_ok(["inspect", calibrated]).stdout


def test_whitened_factors_beat_plain_truncation_on_the_layer_outputs(real_run, calibrated):
    """For every whitened layer, the stored factors' output error on the calibration activations
    (tr(E G E^T) with E = delta - B A, G = X^T X) is at most that of the plain SVD at the same rank,
    both stored in the same precision (measured: 2x to 2,900x smaller on this run)."""
    model = load_dense(real_run.trained, model_config(real_run.trained))
    ids = tokenize_text(read_text(real_run.train_text), load_tokenizer(None, GPT2_TOKENIZER_DIR), CALIB_TOKENS)
    stats = collect_statistics(model, ids, max_tokens=CALIB_TOKENS)
    artifact: Artifact = open_artifact(calibrated)
    checked = 0
    try:
        for name, entry in artifact.tensors.items():
            if entry.svd != WHITENED_ENGINE:
                continue
            reference = artifact.reference.get(name).double()
            delta = model.state_dict()[name].double() - reference  # Conv1D: stored [in, out]
            B, A = artifact.factors(name)
            D, approx = delta.T, (B.double() @ A.double()).T  # [out, in]
            U, S, Vh = torch.linalg.svd(D, full_matrices=False)
            root = S[:entry.rank].sqrt()
            # The plain factors as compress stores them (balanced, in the artifact's storage precision).
            plain_B, plain_A, _ = round_trip((U[:, :entry.rank] * root).float(),
                                             (root[:, None] * Vh[:entry.rank]).float(), None, entry.storage)
            plain = plain_B.double() @ plain_A.double()
            gram = stats.grams[name]
            whitened_error = float(torch.einsum("oi,ij,oj->", D - approx, gram, D - approx))
            plain_error = float(torch.einsum("oi,ij,oj->", D - plain, gram, D - plain))
            assert whitened_error <= plain_error * (1 + 1e-3), (name, whitened_error, plain_error)
            checked += 1
    finally:
        artifact.close()
    assert checked == 8


def test_greedy_budget_is_at_least_as_good_as_uniform_thresholds_at_equal_bytes(real_run, tmp_path, dense_perplexity):
    for quantize in ("none", "int8"):
        uniform = tmp_path / f"uniform-{quantize}"
        compress(real_run.run, uniform, options=PlanOptions(quantize=quantize))
        size = artifact_bytes(uniform)
        budget = tmp_path / f"budget-{quantize}"
        compress(real_run.run, budget, options=PlanOptions(quantize=quantize, target_size=size))
        assert artifact_bytes(budget) <= size
        uniform_ppl, budget_ppl = measured(uniform, real_run.tokens), measured(budget, real_run.tokens)
        print(f"{quantize}: {size} bytes: uniform {uniform_ppl:.3f}, greedy {budget_ppl:.3f}, dense {dense_perplexity:.3f}")
        assert budget_ppl <= uniform_ppl * 1.002, (quantize, uniform_ppl, budget_ppl)


def test_calibration_loses_less_perplexity_at_equal_bytes(real_run, tmp_path, dense_perplexity, calibrated):
    plain = tmp_path / "plain"
    compress(real_run.run, plain, options=PlanOptions(target_ratio=0.15))
    plain_change = measured(plain, real_run.tokens) / dense_perplexity - 1
    calibrated_change = measured(calibrated, real_run.tokens) / dense_perplexity - 1
    print(f"plain {plain_change:+.4%}, calibrated {calibrated_change:+.4%}")
    assert calibrated_change < plain_change, (plain_change, calibrated_change)


def test_perplexity_target_is_met_and_a_smaller_artifact_would_not_be(real_run, tmp_path, dense_perplexity):
    out = tmp_path / "searched"
    result = compress_to_perplexity(real_run.run, out, max_increase=2.0, eval_text=real_run.eval_text,
                                    eval_tokens=4096)
    assert result.dense_perplexity == pytest.approx(dense_perplexity, rel=1e-9)
    again = measured(out, real_run.tokens)
    assert again == pytest.approx(result.perplexity, rel=1e-9)
    assert 100 * (again / dense_perplexity - 1) <= 2.0
    failed = [step for step in result.steps if not step.within]
    assert failed, "the search never measured a candidate above the target"
    largest_failed = max(failed, key=lambda step: step.target_bytes)
    assert largest_failed.increase_percent > 2.0 and largest_failed.bytes < artifact_bytes(out)
    # The bracket is tight: the failing candidate is within 2% of the chosen target.
    record = read_manifest(out).perplexity_target
    assert record["target_bytes"] <= largest_failed.target_bytes * 1.02 + 1
    assert artifact_bytes(out) <= record["target_bytes"]
    assert record["perplexity"] == pytest.approx(again, rel=1e-5) and record["max_increase_percent"] == 2.0
    assert record["eval_tokens"] == 4096 and record["steps"] == len(result.steps)
    assert not list(out.parent.glob(".inrank-search-*"))
    assert json.loads(expect_ok(["inspect", out, "--json"]).stdout)["perplexity_target"] == record
    assert expect_ok(["verify", out]).exit_code == 0  # the rewritten header still matches every checksum


def test_a_perplexity_target_no_size_under_the_cap_reaches_names_the_best_found(real_run, tmp_path):
    out = tmp_path / "out"
    line = expect_error(["compress", real_run.run, "-o", out, "--max-perplexity-increase", "0.001",
                         "--eval-text", real_run.eval_text, "--eval-tokens", "2048", "--target-ratio", "0.05", "--quiet"],
                        ("best found", "--target-ratio"), output=out, inputs=(real_run.run,))
    assert "bytes at +" in line
    assert not list(tmp_path.glob(".inrank-search-*"))


def test_sweep_rows_equal_compress_plus_report(real_run, tmp_path):
    result = expect_ok(["sweep", real_run.run, "--data", real_run.eval_text, "--max-tokens", "2048",
                        "--thresholds", "0.9", "--ratios", "0.15", "--no-int8", "--int4", "--mixed", "--calibrate",
                        real_run.train_text, "--calib-tokens", str(CALIB_TOKENS), "--plot", tmp_path / "sweep.png",
                        "--json"])
    swept = json.loads(result.stdout)
    rows = {row["setting"]: row for row in swept["rows"]}
    assert set(rows) == {f"{base} --quantize {storage}{calibrated}" for storage in ("none", "int4")
                         for base, calibrated in (("-t 0.9", ""), ("--target-ratio 0.15", ""),
                                                  ("--target-ratio 0.15", " --calibrate"))} | \
        {f"--target-ratio 0.15 --quantize mixed{calibrated}" for calibrated in ("", " --calibrate")}  # budgets only
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    # int4 stores the same budget's numbers in fewer bits, so it affords more of them (and a threshold's
    # ranks in fewer bytes).
    assert rows["-t 0.9 --quantize int4"]["bytes"] < rows["-t 0.9 --quantize none"]["bytes"]
    # A row's label is the compress command that reproduces it (--calibrate's text follows it).
    for setting, text in [("-t 0.9 --quantize none", []),
                          ("--target-ratio 0.15 --quantize none --calibrate",
                           [real_run.train_text, "--calib-tokens", str(CALIB_TOKENS)]),
                          ("--target-ratio 0.15 --quantize int4 --calibrate",
                           [real_run.train_text, "--calib-tokens", str(CALIB_TOKENS)]),
                          ("--target-ratio 0.15 --quantize mixed --calibrate",
                           [real_run.train_text, "--calib-tokens", str(CALIB_TOKENS)])]:
        flags = [*setting.split(), *text]
        out = tmp_path / setting.replace(" ", "_")
        expect_ok(["compress", real_run.run, "-o", out, *flags, "--quiet"])
        report = json.loads(expect_ok(["report", out, "--data", real_run.eval_text, "--max-tokens", "2048",
                                       "--json"]).stdout)
        compressed = next(row for row in report["models"] if row["role"] == "compressed")
        original = next(row for row in report["models"] if row["role"] == "original")
        assert rows[setting]["bytes"] == compressed["bytes"]
        assert rows[setting]["perplexity"] == pytest.approx(compressed["perplexity"], rel=1e-9)
        assert swept["dense_perplexity"] == pytest.approx(original["perplexity"], rel=1e-9)


# --------------------------------------------------------------------------- LLaMA, bad input


@pytest.fixture(scope="module")
def small_vocab_tokenizer(tmp_path_factory) -> Path:
    """A real byte-level BPE with the fixture models' 320 ids, trained on Tiny Shakespeare (tokenizer.json)."""
    return saved_byte_level_bpe(REAL_TEXT.read_text()[:100_000], tmp_path_factory.mktemp("tokenizer"))


def test_llama_calibrated_compress_whitens_every_projection_but_the_untied_head(llama_pair, real_run, tmp_path,
                                                                               small_vocab_tokenizer):
    out = tmp_path / "llama"
    expect_ok(["compress", llama_pair.trained_dir, "--init", llama_pair.init_dir, "-o", out, "--target-ratio", "0.3",
               "--calibrate", real_run.train_text, "--calib-tokens", "4096", "--tokenizer", small_vocab_tokenizer,
               "--quiet"])
    manifest = read_manifest(out)
    whitened = {name for name, entry in manifest.tensors.items() if entry.svd == WHITENED_ENGINE}
    projections = {name for name in manifest.tensors if name.endswith("proj.weight")}
    assert len(projections) == 14 and projections <= whitened | {n for n, e in manifest.tensors.items() if e.kind == "dense"}
    # The head's Gram (the body's output, collected without computing logits) ranks rows, but the head
    # itself is allocated and factorized by its plain spectrum.
    assert manifest.tensors["lm_head.weight"].has_factors and "lm_head.weight" not in whitened
    assert artifact_bytes(out) <= manifest.rule.target_bytes
    ids = tokenize_text(read_text(real_run.eval_text), load_tokenizer(None, small_vocab_tokenizer), 1024)
    assert torch.isfinite(torch.tensor(perplexity(load_compressed(out), ids).perplexity))


def test_calibration_bad_input(gpt2_pair, real_run, tmp_path):
    run, out = real_run.run, tmp_path / "out"
    empty, binary, short = tmp_path / "empty.txt", tmp_path / "binary.txt", tmp_path / "short.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"text\x00\x01\x02")
    short.write_text("To be, or not to be.")
    target = ["--target-ratio", "0.2"]
    cases = [
        (["--calibrate", tmp_path / "missing.txt", *target], ("no such", "missing.txt")),
        (["--calibrate", empty, *target], ("empty", "empty.txt")),
        (["--calibrate", binary, *target], ("binary", "binary.txt")),
        (["--calibrate", short, *target], ("fewer than one 64-token window", "--calibrate")),
        (["--calibrate", real_run.train_text, "--calib-tokens", "10", *target], ("window", "--calib-tokens")),
        (["--calibrate", real_run.train_text, "--calib-tokens", "0", *target], ("--calib-tokens", "at least 1")),
        (["--calibrate", real_run.train_text], ("needs a size or perplexity target",)),
        (["--calib-tokens", "100", *target], ("--calib-tokens", "--calibrate")),
        (["--max-perplexity-increase", "1"], ("--eval-text",)),
        (["--eval-text", real_run.eval_text], ("--max-perplexity-increase",)),
        (["--max-perplexity-increase", "0", "--eval-text", real_run.eval_text], ("positive",)),
        (["--max-perplexity-increase", "1", "--eval-text", real_run.eval_text, "-t", "0.9"], ("--threshold",)),
        (["--max-perplexity-increase", "1", "--eval-text", real_run.eval_text, "--rank", "4"], ("--rank",)),
        (["--max-perplexity-increase", "1", "--eval-text", real_run.eval_text, "--embed-init"], ("--embed-init",)),
        (["--max-perplexity-increase", "1", "--eval-text", tmp_path / "nope.txt"], ("no such", "nope.txt")),
    ]
    for flags, says in cases:
        expect_error(["compress", run, "-o", out, *flags], says, output=out, inputs=(run, real_run.train_text))
    # Ids from another model's tokenizer (GPT-2's, 50257 ids) beyond the fixture model's 320.
    expect_error(["compress", gpt2_pair.trained_dir, "--init", gpt2_pair.init_dir, "-o", out, "--target-ratio", "0.3",
                  "--calibrate", real_run.train_text, "--tokenizer", GPT2_TOKENIZER_DIR],
                 ("beyond the 320-token vocabulary", "--tokenizer"), output=out, inputs=(gpt2_pair.trained_dir,))
