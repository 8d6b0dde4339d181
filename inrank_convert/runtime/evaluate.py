"""Perplexity and generation (docs/design.md §7): what ``report`` measures and what ``generate`` does.

Every model, dense or compressed, goes through the same ``perplexity`` function on the same
token ids in the same windows, so the numbers compare.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from inrank_convert.artifact import Manifest, read_manifest
from inrank_convert.core.distributed import check_device
from inrank_convert.core.errors import NonFiniteError, UsageError, flag
from inrank_convert.inputs.text import load_tokenizer
from inrank_convert.model.architecture import check_seed, model_context
from inrank_convert.runtime.modeling import load_compressed, load_dense

_ROWS_PER_CHUNK = 1024  # log-softmax rows cast to float32 at a time (1024 x 128k vocab = 512 MB)


# --------------------------------------------------------------------------- perplexity


@dataclass
class PerplexityResult:
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored (each once)
    tokens_processed: int  # tokens fed through the model (more than scored with a stride)
    windows: int
    context: int  # window length
    stride: int
    seconds: float  # wall time of every window
    tokens_per_second: float  # tokens fed through the model per second, after the first (warm-up) window

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.nll < 700 else math.inf

    def to_json(self) -> dict:
        return {"perplexity": finite_or_none(self.perplexity), "nll": self.nll, "tokens": self.tokens,
                "tokens_processed": self.tokens_processed, "windows": self.windows, "context": self.context,
                "stride": self.stride, "seconds": self.seconds, "tokens_per_second": finite_or_none(self.tokens_per_second)}


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN or Infinity: such a number is reported as null."""
    return value if value is not None and math.isfinite(value) else None


def window_length(config, context: int | None = None) -> int:
    """The model's context length, capped by ``context``."""
    if context is not None and context < 2:
        raise UsageError("the window must hold at least 2 tokens", f"{flag('--context')} {context}", f"e.g. {flag('--context')} 512")
    limit = model_context(config)
    if limit is None and context is None:
        raise UsageError(f"the {config.model_type} config declares no context length", None,
                         f"pass {flag('--context')} N (the window length in tokens)")
    return min(limit, context) if limit is not None and context is not None else limit or context


def plan_windows(n_tokens: int, length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first_target)`` over ``n_tokens`` tokens; each token is scored at most once.

    A window feeds tokens ``[begin, end)`` and scores the predictions of tokens
    ``[first_target, end)``. Without a stride (``stride == length``) the windows do not overlap
    and the first token of each has no context, so it is not scored. With ``stride < length``
    (Hugging Face's sliding-window recipe) a window scores only the tokens past the previous
    window's end, each with at least ``length - stride`` tokens of context: every token but
    the very first is scored exactly once.
    """
    stride = length if stride is None else stride
    if stride < 1 or stride > length:
        raise UsageError(f"{flag('--stride')} must lie in [1, {length}] (the window length)", f"{flag('--stride')} {stride}",
                         f"leave it out for non-overlapping windows, or pass e.g. {flag('--stride')} {max(1, length // 2)}")
    windows = []
    begin, previous_end = 0, 0
    while True:
        end = min(begin + length, n_tokens)
        first = max(previous_end, begin + 1)
        if end > first:
            windows.append((begin, end, first))
        if end >= n_tokens:
            return windows
        previous_end = end
        begin += stride


def check_text_length(n_tokens: int, length: int, max_tokens: int | None = None) -> None:
    """Refuse a text shorter than one window: its perplexity would not be the model's at full context."""
    if n_tokens >= length:
        return
    if max_tokens is not None and n_tokens == max_tokens:
        fix = f"raise {flag('--max-tokens')} to at least {length}, or pass {flag('--context')} {n_tokens} for shorter windows"
    else:
        fix = f"pass a longer text, or {flag('--context')} {n_tokens} (or less) for shorter windows"
    raise UsageError(f"the text has {n_tokens} tokens, fewer than one {length}-token window", None, fix)


def _vocabulary_size(model) -> int | None:
    """Rows of the input embedding (PEFT wraps it: the size is on its base layer)."""
    embedding = model.get_input_embeddings()
    embedding = getattr(embedding, "base_layer", embedding)
    return getattr(embedding, "num_embeddings", None) or getattr(model.config, "vocab_size", None)


def check_vocabulary(tokens: torch.Tensor, vocab_size: int | None, label: str) -> None:
    """Token ids the model has no embedding for mean that the tokenizer belongs to another model."""
    if vocab_size is None or tokens.numel() == 0:
        return
    highest = int(tokens.max())
    if highest >= vocab_size:
        raise UsageError(f"the tokenizer gives token id {highest}, beyond the {vocab_size}-token vocabulary of "
                         f"{label}", None, f"pass {flag('--tokenizer')} DIR with the model's own tokenizer")


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, context: int | None = None, stride: int | None = None,
               device: str | torch.device | None = None,
               on_window: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """exp(mean token NLL) of ``tokens`` (1-D ids) under ``model``, in windows of its context length.

    The same code for every model: logits are cast to float32 before the log-softmax, and the
    NLL is summed in float64. ``on_window(done, total)`` is called after each window.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    tokens = tokens.reshape(-1)
    length = window_length(model.config, context)
    check_text_length(tokens.numel(), length)
    check_vocabulary(tokens, _vocabulary_size(model), f"the {model.config.model_type} model")
    windows = plan_windows(tokens.numel(), length, stride)
    model.eval()
    total_nll, scored, processed = 0.0, 0, 0
    _synchronize(device)
    started = time.perf_counter()
    timed_from, timed_tokens = started, 0
    for index, (begin, end, first) in enumerate(windows):
        ids = tokens[begin:end].to(device)[None]  # [1, end - begin]
        logits = model(ids, use_cache=False).logits[0]  # [end - begin, vocab]
        # Row j predicts token j + 1: targets [first, end) are predicted by rows [first - 1, end - 1).
        predictions = logits[first - 1 - begin:end - 1 - begin]
        targets = ids[0, first - begin:end - begin]
        for row in range(0, targets.numel(), _ROWS_PER_CHUNK):  # bounded float32 copies of a large vocabulary
            chunk = predictions[row:row + _ROWS_PER_CHUNK].float()
            total_nll += float(F.cross_entropy(chunk, targets[row:row + _ROWS_PER_CHUNK], reduction="sum").double())
        del logits, predictions
        scored += end - first
        processed += end - begin
        if index == 0 and len(windows) > 1:
            # The first window pays one-time kernel and allocator setup: leave it out of the speed.
            _synchronize(device)
            timed_from = time.perf_counter()
        else:
            timed_tokens += end - begin
        if on_window is not None:
            on_window(index + 1, len(windows))
    _synchronize(device)
    finished = time.perf_counter()
    nll = total_nll / scored
    if not math.isfinite(nll):
        raise NonFiniteError("the model's log-likelihood is not finite (NaN or Inf logits)", None,
                             f"evaluate in float32 ({flag('--dtype')} float32); check the checkpoint for NaN weights")
    speed = timed_tokens / (finished - timed_from) if finished > timed_from else math.inf
    return PerplexityResult(nll, scored, processed, len(windows), length, stride or length, finished - started, speed)


def free_memory(device: str | torch.device) -> None:
    """Give back what the last model held (before the next one is loaded: peak memory is one model)."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def checkpoint_perplexity(path: str | Path, tokens: torch.Tensor, context: int, device: str = "cpu",
                          config=None, init: str | Path | None = None) -> float:
    """The perplexity on ``tokens`` (windows of ``context``) of the model at ``path``: an artifact
    run from its factors (``init``: where its reference is, if not where recorded), or, with its
    ``config``, any checkpoint form loaded dense. The model is dropped before this returns."""
    model = load_dense(path, config, device) if config is not None else load_compressed(path, device, init=init)
    try:
        return perplexity(model, tokens, context, device=device).perplexity
    finally:
        del model
        free_memory(device)


# --------------------------------------------------------------------------- generation


def _source_folders(manifest: Manifest) -> list[Path]:
    """The source checkpoint's folder (where its tokenizer may be), if it still exists."""
    path = Path(manifest.source.path)
    folder = path if path.is_dir() else path.parent
    return [folder] if folder.is_dir() else []




@dataclass
class GenerationResult:
    prompt: str
    completion: str  # the generated text only
    prompt_tokens: int
    new_tokens: int
    seconds: float
    seed: int
    temperature: float
    top_k: int

    @property
    def text(self) -> str:
        return self.prompt + self.completion

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else math.inf

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "completion": self.completion, "text": self.text,
                "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens, "seconds": self.seconds,
                "tokens_per_second": finite_or_none(self.tokens_per_second), "seed": self.seed,
                "temperature": self.temperature, "top_k": self.top_k}


def check_generation_options(max_new_tokens: int, temperature: float, top_k: int, seed: int = 0) -> None:
    check_seed(seed, "--seed")  # the one seed check every command makes
    if max_new_tokens < 1:
        raise UsageError(f"{flag('--max-new-tokens')} must be at least 1", f"{flag('--max-new-tokens')} {max_new_tokens}", "e.g. 50")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise UsageError(f"{flag('--temperature')} must be >= 0", f"{flag('--temperature')} {temperature}",
                         "0 for greedy decoding, e.g. 0.8 for sampling")
    if top_k < 0:
        raise UsageError(f"{flag('--top-k')} must be >= 0", f"{flag('--top-k')} {top_k}", "0 turns top-k filtering off")


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 50, temperature: float = 0.8,
                  top_k: int = 50, seed: int = 0, device: str | torch.device | None = None) -> GenerationResult:
    """Continue ``prompt`` with the model's own ``generate``: sampling when temperature > 0, else greedy.

    The same seed gives the same text: sampling runs under ``torch.manual_seed(seed)`` inside a
    forked RNG, so the caller's random state is left as it was.
    """
    check_generation_options(max_new_tokens, temperature, top_k, seed)
    device = torch.device(device) if device is not None else _device_of(model)
    if not prompt:
        raise UsageError("the prompt is empty", flag("--prompt"), f"pass some text to continue, e.g. {flag('--prompt')} 'The'")
    encoded = tokenizer(prompt, return_tensors="pt")
    input_ids = encoded["input_ids"].to(device)  # [1, prompt_tokens]
    if input_ids.numel() == 0:
        raise UsageError("the prompt gives no tokens", flag("--prompt"), "pass some text to continue")
    check_vocabulary(input_ids, _vocabulary_size(model), f"the {model.config.model_type} model")
    limit = model_context(model.config)
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise UsageError(f"the prompt ({input_ids.shape[1]} tokens) plus {flag('--max-new-tokens')} {max_new_tokens} exceeds "
                         f"the model's {limit}-token context", None, f"shorten the prompt or lower {flag('--max-new-tokens')}")
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    options = {"max_new_tokens": max_new_tokens, "pad_token_id": pad, "attention_mask": encoded["attention_mask"].to(device)}
    if temperature > 0:
        options.update(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=None)
    else:
        options.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    model.eval()
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        _synchronize(device)
        started = time.perf_counter()
        output = model.generate(input_ids, **options)  # [1, prompt_tokens + new]
        _synchronize(device)
        seconds = time.perf_counter() - started
    new_ids = output[0, input_ids.shape[1]:]
    completion = tokenizer.decode(new_ids, skip_special_tokens=True)
    return GenerationResult(prompt, completion, input_ids.shape[1], int(new_ids.numel()), seconds, seed,
                            temperature, top_k)


def generate(artifact: str | Path, prompt: str, max_new_tokens: int = 50, temperature: float = 0.8,
             top_k: int = 50, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32,
             tokenizer: str | Path | None = None, init: str | Path | None = None,
             merge: bool = False) -> GenerationResult:
    """Text generation from the compressed form (the artifact's tokenizer, or ``tokenizer``)."""
    check_device(device)
    check_generation_options(max_new_tokens, temperature, top_k, seed)
    if not prompt:
        raise UsageError("the prompt is empty", flag("--prompt"), f"pass some text to continue, e.g. {flag('--prompt')} 'The'")
    manifest = read_manifest(artifact)
    tok = load_tokenizer([Path(artifact), *_source_folders(manifest)], tokenizer)
    model = load_compressed(artifact, device, dtype, merge=merge, init=init)
    return generate_text(model, tok, prompt, max_new_tokens, temperature, top_k, seed, device)
