"""Perplexity, windows, text reading, tokenizers and generation (inrank_convert.data / .evaluate).

Real models on real text: a tiny GPT-2 whose vocabulary is GPT-2's (50257 tokens, so the real
GPT-2 tokenizer fits it), "trained" = init + planted rank-4 updates, on WikiText-2 test text.
The models are built once per session (``eval_models``, shared with test_report_cli.py).
Oracles are independent: Hugging Face's own ``labels=`` loss, and its documented
sliding-window recipe written out here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, build_model, gpt2_config, planted_update, save_hf
from safetensors import safe_open

from inrank_convert import PlanOptions, RankRule, compress
from inrank_convert.artifact import describe_artifact, read_manifest
from inrank_convert.core.errors import UsageError, cli_flags
from inrank_convert.inputs.text import load_tokenizer, read_text, read_text_tokens
from inrank_convert.measure.report import report
from inrank_convert.runtime.evaluate import generate_text, perplexity, plan_windows
from inrank_convert.runtime.modeling import load_compressed, load_dense, model_config

TOKENIZER_DIR = SHARED_DATA / "gpt2-tokenizer"
WIKI_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
CONTEXT = 128
UPDATE_SCALE = 1.0  # planted update norm relative to each weight's norm: a clear perplexity shift at t = 0.5
needs_data = pytest.mark.skipif(not ((TOKENIZER_DIR / "vocab.json").is_file() and WIKI_TEST.is_file()),
                                reason=f"shared data (GPT-2 tokenizer, WikiText-2) absent under {SHARED_DATA}")


@dataclass
class EvalModels:
    root: Path
    init: Path  # HF folders with the GPT-2 tokenizer saved beside the weights
    trained: Path
    full: Path  # artifact at energy threshold 1.0 (every tensor kept exactly)
    half: Path  # artifact at energy threshold 0.5 (low-rank layers, a different model)


_CACHE: dict[str, EvalModels] = {}


def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(vocab=str(TOKENIZER_DIR / "vocab.json"), merges=str(TOKENIZER_DIR / "merges.txt"))


def eval_models(tmp_path_factory) -> EvalModels:
    """Built once per session, whichever test file asks first."""
    if "models" in _CACHE:
        return _CACHE["models"]
    root = tmp_path_factory.mktemp("eval-models")
    config = gpt2_config(vocab_size=50257, n_positions=CONTEXT, bos_token_id=50256, eos_token_id=50256)
    model = build_model(config, seed=7)
    init_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    init_state["lm_head.weight"] = init_state["transformer.wte.weight"]  # tied, as in the model
    generator = torch.Generator().manual_seed(1)
    trained_state = {}
    for name, tensor in init_state.items():
        if name == "lm_head.weight":
            trained_state[name] = trained_state["transformer.wte.weight"]
        elif tensor.ndim == 2:
            trained_state[name] = tensor + planted_update(tensor.shape, 4, UPDATE_SCALE * float(tensor.norm()), generator)
        else:
            trained_state[name] = tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
    tokenizer = gpt2_tokenizer()
    init = save_hf(model, init_state, root / "init")
    trained = save_hf(model, trained_state, root / "trained")
    for folder in (init, trained):  # compress copies tokenizer.json into the artifact
        tokenizer.save_pretrained(folder)
    full, half = root / "full", root / "half"
    compress(trained, full, init=init, options=PlanOptions(rule=RankRule("energy", 1.0)))
    compress(trained, half, init=init, options=PlanOptions(rule=RankRule("energy", 0.5)))
    _CACHE["models"] = EvalModels(root, init, trained, full, half)
    return _CACHE["models"]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> EvalModels:
    if not ((TOKENIZER_DIR / "vocab.json").is_file() and WIKI_TEST.is_file()):
        pytest.skip(f"shared data (GPT-2 tokenizer, WikiText-2) absent under {SHARED_DATA}")
    return eval_models(tmp_path_factory)


@pytest.fixture(scope="module")
def wiki_tokens() -> torch.Tensor:
    if not WIKI_TEST.is_file():
        pytest.skip(f"shared data absent: {WIKI_TEST}")
    return read_text_tokens(WIKI_TEST, gpt2_tokenizer(), max_tokens=4 * CONTEXT)


@pytest.fixture(scope="module")
def trained_model(models):
    return load_dense(models.trained, model_config(models.trained))


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("n, length, stride", [(512, 128, None), (515, 128, None), (512, 128, 32), (500, 128, 100),
                                               (128, 128, 1), (130, 64, 64), (1000, 128, 127)])
def test_windows_score_each_token_at_most_once(n, length, stride):
    windows = plan_windows(n, length, stride)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert len(scored) == len(set(scored)), "a token is scored twice"
    assert all(end - begin <= length and begin < first for begin, end, first in windows)
    assert windows[-1][1] == n, "the text's end is not reached"
    if stride is not None and stride < length:
        assert scored == list(range(1, n)), "sliding windows must score every token but the first, once"
    else:  # non-overlapping: every token but the first of each window, which has no context there
        assert scored == [t for t in range(n) if t % length != 0]


@pytest.mark.parametrize("stride", [0, -3, 129])
def test_bad_stride_is_refused(stride):
    # Called from Python the message names the parameter; under a CLI command with --stride, the flag.
    with pytest.raises(UsageError, match="stride") as refused:
        plan_windows(512, 128, stride)
    assert "--" not in refused.value.message
    with cli_flags({"--stride"}), pytest.raises(UsageError, match="--stride"):
        plan_windows(512, 128, stride)


# --------------------------------------------------------------------------- perplexity


@needs_data
def test_one_window_equals_hugging_face_loss(trained_model, wiki_tokens):
    tokens = wiki_tokens[:CONTEXT]
    result = perplexity(trained_model, tokens)
    with torch.no_grad():
        loss = trained_model(tokens[None], labels=tokens[None]).loss
    assert result.windows == 1 and result.tokens == CONTEXT - 1
    assert result.nll == pytest.approx(float(loss), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)


@needs_data
def test_non_overlapping_windows_average_hugging_face_losses(trained_model, wiki_tokens):
    result = perplexity(trained_model, wiki_tokens)
    with torch.no_grad():
        losses = [float(trained_model(chunk[None], labels=chunk[None]).loss) for chunk in wiki_tokens.split(CONTEXT)]
    assert result.windows == 4 and result.tokens == wiki_tokens.numel() - 4
    assert result.nll == pytest.approx(sum(losses) / len(losses), rel=1e-5)  # equal windows: equal weights
    assert result.tokens_per_second > 0 and result.seconds > 0


def hugging_face_sliding_window(model, tokens: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The recipe of huggingface.co/docs/transformers/perplexity, with the exact count of scored tokens.

    The documented recipe weights each window's mean loss by ``(labels != -100).sum() - 1``; but
    the model's loss shifts labels left by one, so a label is lost only where it sits at position
    0 (the first window): the exact count is that of the labels at positions 1 and after.
    """
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    seq_len = tokens.numel()
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = tokens[begin:end][None]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = int((target_ids[:, 1:] != -100).sum())  # labels the shifted loss actually scores
        nll_sum += float(loss) * valid
        n_tokens += valid
        prev_end = end
        if end == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@needs_data
@pytest.mark.parametrize("stride", [32, 100])
def test_sliding_window_matches_the_documented_recipe(trained_model, wiki_tokens, stride):
    result = perplexity(trained_model, wiki_tokens, stride=stride)
    expected_nll, expected_tokens = hugging_face_sliding_window(trained_model, wiki_tokens, CONTEXT, stride)
    assert result.tokens == expected_tokens == wiki_tokens.numel() - 1  # each token once, all but the first
    assert result.tokens_processed > result.tokens
    assert result.nll == pytest.approx(expected_nll, rel=1e-5)
    assert 0 < result.perplexity < math.inf
    assert result.stride == stride and result.context == CONTEXT


@needs_data
def test_context_option_caps_the_window(trained_model, wiki_tokens):
    result = perplexity(trained_model, wiki_tokens, context=64)
    assert result.context == 64 and result.windows == 8


@needs_data
def test_text_shorter_than_one_window_is_refused(trained_model, wiki_tokens):
    with pytest.raises(UsageError, match="fewer than one 128-token window"):
        perplexity(trained_model, wiki_tokens[:100])


@needs_data
def test_low_rank_layers_compute_what_their_dense_reconstruction_does(models, wiki_tokens):
    """LowRankLinear (never forming B @ A) and the dense W_ref + B @ A give the same perplexity."""
    compressed = load_compressed(models.half)
    assert any(type(module).__name__ == "LowRankLinear" for module in compressed.modules())
    dense = load_dense(models.half, model_config(models.half))  # the artifact read as a checkpoint
    low_rank = perplexity(compressed, wiki_tokens)
    reconstructed = perplexity(dense, wiki_tokens)
    assert low_rank.nll == pytest.approx(reconstructed.nll, rel=1e-5)


# --------------------------------------------------------------------------- report (library)


@needs_data
def test_report_library_rows_and_sizes(models):
    result = report(models.half, WIKI_TEST, max_tokens=2 * CONTEXT)
    assert [row.role for row in result.models] == ["original", "compressed"]
    original, compressed = result.models
    assert original.path == str(models.trained.resolve())  # the recorded source, by default
    # The source's dense tensor bytes (compress's original_bytes), not its file with the header.
    assert original.bytes == read_manifest(models.half).original_bytes
    assert original.bytes < (models.trained / "model.safetensors").stat().st_size
    assert compressed.bytes == describe_artifact(models.half)["compressed_bytes"]
    assert result.ratio == pytest.approx(compressed.bytes / original.bytes) and result.ratio < 0.1
    assert compressed.change_percent == pytest.approx(100 * (compressed.result.perplexity / original.result.perplexity - 1))
    assert original.parameters == sum(p.numel() for p in load_dense(models.trained, model_config(models.trained)).parameters())
    # The compressed model's parameters are the numbers stored in inrank.safetensors.
    with safe_open(str(models.half / "inrank.safetensors"), "pt") as handle:
        stored = sum(handle.get_slice(name).get_shape()[0] * math.prod(handle.get_slice(name).get_shape()[1:])
                     for name in handle.keys())
    assert compressed.parameters == stored == read_manifest(models.half).stored_parameters()
    assert compressed.parameters < original.parameters / 10


# --------------------------------------------------------------------------- text and tokenizers


@needs_data
def test_max_tokens_reads_the_prefix_of_the_whole_text(tmp_path):
    tokenizer = gpt2_tokenizer()
    text = WIKI_TEST.read_text()[:60_000]
    (tmp_path / "slice.txt").write_text(text)
    whole = tokenizer.encode(text, verbose=False)
    assert len(whole) > 3000
    for count in (2, 100, 2048, len(whole), len(whole) + 10):
        ids = read_text_tokens(tmp_path / "slice.txt", tokenizer, max_tokens=count)
        assert ids.tolist() == whole[:count]


@needs_data
def test_tokenizers_from_every_source_agree(models):
    expected = [15496, 995]  # "Hello world" (shared/data/README.md)
    assert load_tokenizer(None, TOKENIZER_DIR).encode("Hello world") == expected  # vocab.json + merges.txt
    assert load_tokenizer(models.half).encode("Hello world") == expected  # tokenizer.json copied by compress
    assert load_tokenizer(None, models.half / "tokenizer.json").encode("Hello world") == expected


def test_no_tokenizer_suggests_the_option(tmp_path):
    with cli_flags({"--tokenizer"}), pytest.raises(UsageError, match="--tokenizer"):
        load_tokenizer([tmp_path])
    with pytest.raises(UsageError, match="pass tokenizer DIR"):  # from Python: the parameter, not a flag
        load_tokenizer([tmp_path])
    with pytest.raises(UsageError, match="no tokenizer files"):
        load_tokenizer([tmp_path], tmp_path)


def test_folder_of_text_files(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first file")
    (folder / "sub" / "b.txt").write_text("\ufeffsecond file")  # a byte-order mark is dropped
    (folder / ".hidden").write_text("never read")
    (folder / "empty.txt").write_text("  \n")
    assert read_text(folder) == "first file\n\nsecond file"


@pytest.mark.parametrize("content, says", [(b"", "empty"), (b" \n\n ", "empty"), (b"text\x00more", "NUL"),
                                           (b"caf\xe9 au lait", "UTF-8")])
def test_bad_text_files(tmp_path, content, says):
    (tmp_path / "data.txt").write_bytes(content)
    with pytest.raises(UsageError, match=says):
        read_text(tmp_path / "data.txt")


def test_missing_text_and_empty_folder(tmp_path):
    with pytest.raises(UsageError, match="no such"):
        read_text(tmp_path / "nothing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no text files"):
        read_text(tmp_path / "empty")


# --------------------------------------------------------------------------- generation


@needs_data
def test_generation_is_deterministic_and_leaves_the_rng_alone(models):
    model, tokenizer = load_compressed(models.half), load_tokenizer(models.half)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = generate_text(model, tokenizer, "The history of", max_new_tokens=12, temperature=1.0, seed=5)
    assert torch.equal(torch.rand(3), expected_next), "generate_text moved the caller's random stream"
    again = generate_text(model, tokenizer, "The history of", max_new_tokens=12, temperature=1.0, seed=5)
    other = generate_text(model, tokenizer, "The history of", max_new_tokens=12, temperature=1.0, seed=6)
    assert first.completion == again.completion and first.new_tokens == 12
    assert other.completion != first.completion
    greedy = [generate_text(model, tokenizer, "The history of", max_new_tokens=8, temperature=0, seed=s).completion
              for s in (0, 1)]
    assert greedy[0] == greedy[1]
    assert first.text == "The history of" + first.completion


@needs_data
def test_generation_longer_than_the_context_is_refused(models):
    model, tokenizer = load_compressed(models.half), load_tokenizer(models.half)
    with pytest.raises(UsageError, match="context"):
        generate_text(model, tokenizer, "The history of", max_new_tokens=CONTEXT)
