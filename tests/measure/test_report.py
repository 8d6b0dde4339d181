"""measure/report.py (``report``): size and perplexity side by side, through the library and the real
CLI (typer's CliRunner), on real text.

The GPT-2-vocabulary models are conftest's ``eval_models`` (built once per session); the
vocabulary-320 and LLaMA models are conftest's pairs, which have no tokenizer. Every bad input must
exit non-zero with exactly one line on stderr and no traceback.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from inrank_convert.artifact import describe_artifact, read_manifest
from inrank_convert.measure.report import report
from inrank_convert.runtime.modeling import load_dense, model_config
from tests.conftest import build_model, gpt2_config, make_pair
from tests.helpers.cli_contract import expect_error_line, ok
from tests.helpers.eval_models import CONTEXT, TOKENIZER_DIR, WIKI_TEST, needs_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYER_KEYS = {"name", "shape", "kind", "rank", "energy"}
REPORT_KEYS = {"original_bytes", "compressed_bytes", "ratio", "perplexity", "tokens_per_second", "models", "layers"}
ROW_KEYS = {"label", "role", "path", "kind", "bytes", "ratio", "parameters", "perplexity", "change_percent",
            "tokens", "tokens_per_second", "nll", "windows", "context", "stride"}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """Vocabulary-320 models with no tokenizer anywhere, a LLaMA, and a narrow GPT-2 weight file."""
    root = tmp_path_factory.mktemp("report-small")
    gpt2 = make_pair(root, "gpt2")
    llama = make_pair(root, "llama")
    artifact = root / "gpt2-artifact"
    ok("compress", gpt2.trained_dir, "--init", gpt2.init_dir, "-o", artifact, "--quiet")
    narrow = root / "narrow"
    narrow.mkdir()
    model = build_model(gpt2_config(n_embd=32), seed=3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              narrow / "weights.safetensors", metadata={"format": "pt"})
    return {"artifact": artifact, "gpt2": gpt2.trained_dir, "llama": llama.trained_dir,
            "narrow": narrow / "weights.safetensors"}


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """A short real text (enough for a few 64-token windows)."""
    file = tmp_path_factory.mktemp("text") / "short.txt"
    file.write_text("The tower is 324 metres tall, about the same height as an 81-storey building. " * 12)
    return file


@pytest.fixture(scope="module")
def report_json(eval_models, tmp_path_factory) -> dict:
    """One report for several tests: threshold 1.0 vs its original, plus the threshold-0.5 artifact."""
    plot = tmp_path_factory.mktemp("plot") / "report.png"
    result = ok("report", eval_models.full, "--data", WIKI_TEST, "--max-tokens", 1024, "--also", eval_models.half,
                "--json", "--plot", plot)
    payload = json.loads(result.stdout)
    payload["_plot"] = plot
    return payload


# --------------------------------------------------------------------------- report (library)


@needs_data
def test_report_library_rows_and_sizes(eval_models):
    result = report(eval_models.half, WIKI_TEST, max_tokens=2 * CONTEXT)
    assert [row.role for row in result.models] == ["original", "compressed"]
    original, compressed = result.models
    assert original.path == str(eval_models.trained.resolve())  # the recorded source, by default
    # The source's dense tensor bytes (compress's original_bytes), not its file with the header.
    assert original.bytes == read_manifest(eval_models.half).original_bytes
    assert original.bytes < (eval_models.trained / "model.safetensors").stat().st_size
    assert compressed.bytes == describe_artifact(eval_models.half)["compressed_bytes"]
    assert result.ratio == pytest.approx(compressed.bytes / original.bytes) and result.ratio < 0.1
    assert compressed.change_percent == pytest.approx(100 * (compressed.result.perplexity / original.result.perplexity - 1))
    assert original.parameters == sum(p.numel() for p in load_dense(eval_models.trained, model_config(eval_models.trained)).parameters())
    # The compressed model's parameters are the numbers stored in inrank.safetensors.
    with safe_open(str(eval_models.half / "inrank.safetensors"), "pt") as handle:
        stored = sum(handle.get_slice(name).get_shape()[0] * math.prod(handle.get_slice(name).get_shape()[1:])
                     for name in handle.keys())
    assert compressed.parameters == stored == read_manifest(eval_models.half).stored_parameters()
    assert compressed.parameters < original.parameters / 10


# --------------------------------------------------------------------------- report (CLI)


def test_report_json_has_every_key(report_json, eval_models):
    assert REPORT_KEYS <= set(report_json)
    assert set(report_json["perplexity"]) >= {"original", "compressed", "half"}
    assert set(report_json["tokens_per_second"]) == {"original", "compressed", "half"}
    assert all(value > 0 for value in report_json["tokens_per_second"].values())
    assert [row["role"] for row in report_json["models"]] == ["original", "compressed", "also"]
    assert all(ROW_KEYS <= set(row) for row in report_json["models"])
    assert report_json["layers"] and all(LAYER_KEYS <= set(layer) for layer in report_json["layers"])
    original, compressed, half = report_json["models"]
    assert original["path"] == str(eval_models.trained.resolve())  # the recorded source, by default
    inspected = json.loads(ok("inspect", eval_models.full, "--json").stdout)
    # One definition everywhere: dense tensor bytes (tied once, no file header), as compress/inspect count them.
    assert report_json["original_bytes"] == original["bytes"] == inspected["original_bytes"]
    assert original["bytes"] < (eval_models.trained / "model.safetensors").stat().st_size  # the header is not counted
    assert report_json["compressed_bytes"] == compressed["bytes"] == inspected["compressed_bytes"]
    assert report_json["ratio"] == pytest.approx(compressed["bytes"] / original["bytes"])
    assert half["ratio"] < 0.05 and half["parameters"] < original["parameters"] / 20
    assert report_json["text_tokens"] == 1024 and original["windows"] == 1024 // CONTEXT
    assert original["tokens"] == 1024 - 1024 // CONTEXT  # each window's first token has no context


def test_threshold_one_keeps_the_perplexity(report_json):
    ppl = report_json["perplexity"]
    assert ppl["compressed"] == pytest.approx(ppl["original"], rel=1e-3)
    assert abs(report_json["models"][1]["change_percent"]) < 0.1


def test_threshold_half_changes_the_perplexity(report_json):
    """The same comparison fails for a lossy artifact: the test above can fail."""
    ppl = report_json["perplexity"]
    assert ppl["half"] != pytest.approx(ppl["original"], rel=1e-3)
    assert abs(report_json["models"][2]["change_percent"]) > 0.1


def test_report_plot_is_a_png(report_json):
    pytest.importorskip("matplotlib")
    assert report_json["_plot"].read_bytes()[:8] == PNG_MAGIC


def test_report_table(eval_models, text):
    result = ok("report", eval_models.half, "--data", text, "--context", 64, "--stride", 32)
    for word in ("original", "compressed", "perplexity", "tokens/s", "transformer.h.0.mlp.c_fc.weight", "lowrank"):
        assert word in result.stdout
    assert result.stderr == ""


def test_report_explicit_original_and_sliding_windows(eval_models, text):
    payload = json.loads(ok("report", eval_models.half, "--data", text, "--original", eval_models.trained / "model.safetensors",
                            "--context", 64, "--stride", 16, "--json").stdout)
    original = payload["models"][0]
    assert original["path"] == str(eval_models.trained / "model.safetensors") and original["stride"] == 16
    assert original["tokens"] == payload["text_tokens"] - 1  # sliding windows score every token but the first


def test_moved_source_and_changed_or_missing_reference(eval_models, tmp_path):
    """Source gone: report without an original (warning). Reference changed or gone: one-line errors."""
    trained = Path(shutil.copytree(eval_models.trained, tmp_path / "trained"))
    init = Path(shutil.copytree(eval_models.init, tmp_path / "init"))
    artifact = tmp_path / "artifact"
    ok("compress", trained, "--init", init, "-o", artifact, "--threshold", "0.5", "--quiet")
    (trained / "model.safetensors").unlink()  # the source folder is there, its weights are not
    for state in ("emptied", "gone"):
        result = ok("report", artifact, "--data", WIKI_TEST, "--max-tokens", CONTEXT, "--json")
        payload = json.loads(result.stdout)
        assert payload["perplexity"]["original"] is None and [row["role"] for row in payload["models"]] == ["compressed"]
        assert result.stderr.startswith("warning: ") and "--original" in result.stderr, state
        assert payload["ratio"] == pytest.approx(payload["compressed_bytes"] / payload["original_bytes"])
        shutil.rmtree(trained, ignore_errors=True)

    state = load_file(init / "model.safetensors")
    state["transformer.h.0.mlp.c_fc.weight"] = state["transformer.h.0.mlp.c_fc.weight"] + 1.0
    save_file(state, init / "model.safetensors", metadata={"format": "pt"})
    expect_error_line("report", artifact, "--data", WIKI_TEST, "--max-tokens", CONTEXT, says=("changed", "sha256"))
    expect_error_line("generate", artifact, "--prompt", "The", says=("changed",))
    shutil.rmtree(init)
    expect_error_line("report", artifact, "--data", WIKI_TEST, "--max-tokens", CONTEXT, says=("missing", "--init"))
    expect_error_line("generate", artifact, "--prompt", "The", says=("missing",))


@pytest.mark.parametrize("case", ["missing", "empty", "whitespace", "nul-bytes", "not-utf8", "empty-folder"])
def test_bad_data_file(eval_models, tmp_path, case):
    data = tmp_path / "data.txt"
    says = {"missing": ("no such", str(data)), "empty": ("empty", str(data)), "whitespace": ("empty",),
            "nul-bytes": ("binary", "NUL"), "not-utf8": ("binary", "UTF-8"), "empty-folder": ("no text files",)}[case]
    if case == "empty":
        data.write_bytes(b"")
    elif case == "whitespace":
        data.write_text("\n \n")
    elif case == "nul-bytes":
        data.write_bytes(bytes(range(256)) * 4)
    elif case == "not-utf8":
        data.write_bytes("Éléphant déjà vu".encode("latin-1"))
    elif case == "empty-folder":
        data.mkdir()
    expect_error_line("report", eval_models.full, "--data", data, says=says)


def test_no_tokenizer_suggests_the_option(small, text):
    expect_error_line("report", small["artifact"], "--data", text, says=("no tokenizer", "--tokenizer"))
    expect_error_line("generate", small["artifact"], "--prompt", "The", says=("no tokenizer", "--tokenizer"))
    expect_error_line("report", small["artifact"], "--data", text, "--tokenizer", text.parent, says=("no tokenizer files",))


@needs_data
def test_tokenizer_of_another_model(small, text):
    expect_error_line("report", small["artifact"], "--data", text, "--tokenizer", TOKENIZER_DIR,
                 says=("token id", "320-token vocabulary", "--tokenizer"))


@pytest.mark.parametrize("which, says", [("llama", ("another architecture", "model_type", "llama")),
                                         ("gpt2", ("another architecture", "vocab_size", "320")),
                                         ("narrow", ("another architecture", "shape")),
                                         ("missing", ("no such file",))])
def test_original_of_another_architecture(eval_models, small, text, tmp_path, which, says):
    original = tmp_path / "nothing" if which == "missing" else small[which]
    expect_error_line("report", eval_models.full, "--data", text, "--original", original, says=says)


@pytest.mark.parametrize("options, says", [
    (("--max-tokens", 50), ("50 tokens", "128-token window", "--max-tokens")),
    (("--stride", 0), ("--stride",)),
    (("--stride", 500), ("--stride",)),
    (("--context", 1), ("--context",)),
    (("--dtype", "float64"), ("dtype", "float64")),
    (("--also", "/no/such/model"), ("no such file",)),
    (("--plot", "/no/such/folder/plot.png"), ("plot", "/no/such/folder")),
    (("--plot", "report.safetensors"), ("'.safetensors' is not an image format", "--plot")),
])
def test_bad_report_options(eval_models, options, says):
    expect_error_line("report", eval_models.full, "--data", WIKI_TEST, *options, says=says)


def test_text_shorter_than_one_window(eval_models, tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("A short text of a few words.")
    expect_error_line("report", eval_models.full, "--data", data, says=("fewer than one 128-token window",))


def test_report_on_a_model_folder_that_is_no_artifact(eval_models):
    expect_error_line("report", eval_models.trained, "--data", WIKI_TEST, says=("not an inrank-convert artifact",))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("command", ["report", "generate"])
def test_cuda_device_without_cuda(eval_models, command):
    args = ["--data", WIKI_TEST] if command == "report" else ["--prompt", "The"]
    expect_error_line(command, eval_models.full, *args, "--device", "cuda", says=("CUDA is not available", "--device cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_report_on_cuda_matches_cpu(eval_models):
    args = ("report", eval_models.half, "--data", WIKI_TEST, "--max-tokens", 512, "--json")
    cpu = json.loads(ok(*args).stdout)["perplexity"]
    cuda = json.loads(ok(*args, "--device", "cuda").stdout)["perplexity"]
    for label in ("original", "compressed"):
        assert cuda[label] == pytest.approx(cpu[label], rel=1e-3)
    generated = json.loads(ok("generate", eval_models.half, "--prompt", "The", "--device", "cuda", "--json").stdout)
    assert generated["new_tokens"] > 0


def _word_level_tokenizer(folder: Path) -> None:
    """A real tokenizer that is not GPT-2's: whole words, ids in GPT-2's range (so that only the
    tokenizer comparison, not the vocabulary-size check, can tell the models apart)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(WIKI_TEST.read_text(encoding="utf-8").split()[:4000]))
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("option", ["--also", "--original"])
def test_a_model_with_another_tokenizer_is_refused(eval_models, tmp_path, option):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(eval_models.trained, other)
    _word_level_tokenizer(other)
    line = expect_error_line("report", eval_models.full, "--data", WIKI_TEST, "--max-tokens", 512, option, other,
                        says=("own tokenizer", "splits the text differently", str(other)))
    assert "first difference at token" in line


def test_a_model_with_the_same_tokenizer_files_is_accepted(eval_models, tmp_path):
    """The check compares token ids, not folders: a copy of the model with its tokenizer is scored."""
    same = tmp_path / "same-tokenizer"
    shutil.copytree(eval_models.trained, same)
    payload = json.loads(ok("report", eval_models.full, "--data", WIKI_TEST, "--max-tokens", 512, "--also", same,
                            "--json").stdout)
    rows = {row["label"]: row for row in payload["models"]}
    assert rows["same-tokenizer"]["perplexity"] == pytest.approx(rows["original"]["perplexity"], rel=1e-6)
    # One definition of bytes: a checkpoint's dense tensor bytes, as compress and inspect count them.
    inspected = json.loads(ok("inspect", eval_models.full, "--json").stdout)
    assert rows["same-tokenizer"]["bytes"] == rows["original"]["bytes"] == inspected["original_bytes"]
