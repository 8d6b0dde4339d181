"""Perplexity and generation (DESIGN §4, §6): ``report`` and ``generate``.

Every model, dense or compressed, goes through the same ``perplexity`` function on the same
token ids in the same windows, so the numbers compare. Models are loaded one at a time and
dropped after their evaluation, so peak memory is that of the largest model, not the sum.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .architecture import model_context
from .artifact import Manifest, artifact_bytes, describe_artifact, is_artifact, read_manifest
from .compress import check_device
from .data import check_max_tokens, load_tokenizer, read_text, tokenize_text
from .errors import CheckpointError, MismatchError, NonFiniteError, UsageError
from .modeling import check_same_architecture, checkpoint_config, load_compressed, load_dense, model_config
from .sources import open_checkpoint
from .tensors import dtype_name

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
        return {"perplexity": _finite(self.perplexity), "nll": self.nll, "tokens": self.tokens,
                "tokens_processed": self.tokens_processed, "windows": self.windows, "context": self.context,
                "stride": self.stride, "seconds": self.seconds, "tokens_per_second": _finite(self.tokens_per_second)}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def window_length(config, context: int | None = None) -> int:
    """The model's context length, capped by ``context``."""
    if context is not None and context < 2:
        raise UsageError("the window must hold at least 2 tokens", f"--context {context}", "e.g. --context 512")
    limit = model_context(config)
    if limit is None and context is None:
        raise UsageError(f"the {config.model_type} config declares no context length", None,
                         "pass --context N (the window length in tokens)")
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
        raise UsageError(f"--stride must lie in [1, {length}] (the window length)", f"--stride {stride}",
                         f"leave it out for non-overlapping windows, or pass e.g. --stride {max(1, length // 2)}")
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
        fix = f"raise --max-tokens to at least {length}, or pass --context {n_tokens} for shorter windows"
    else:
        fix = f"pass a longer text, or --context {n_tokens} (or less) for shorter windows"
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
                         f"{label}", None, "pass --tokenizer DIR with the model's own tokenizer")


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
                             "evaluate in float32 (--dtype float32); check the checkpoint for NaN weights")
    speed = timed_tokens / (finished - timed_from) if finished > timed_from else math.inf
    return PerplexityResult(nll, scored, processed, len(windows), length, stride or length, finished - started, speed)


# --------------------------------------------------------------------------- generation


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
                "tokens_per_second": _finite(self.tokens_per_second), "seed": self.seed,
                "temperature": self.temperature, "top_k": self.top_k}


def check_generation_options(max_new_tokens: int, temperature: float, top_k: int) -> None:
    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1", f"--max-new-tokens {max_new_tokens}", "e.g. 50")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise UsageError("--temperature must be >= 0", f"--temperature {temperature}",
                         "0 for greedy decoding, e.g. 0.8 for sampling")
    if top_k < 0:
        raise UsageError("--top-k must be >= 0", f"--top-k {top_k}", "0 turns top-k filtering off")


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 50, temperature: float = 0.8,
                  top_k: int = 50, seed: int = 0, device: str | torch.device | None = None) -> GenerationResult:
    """Continue ``prompt`` with the model's own ``generate``: sampling when temperature > 0, else greedy.

    The same seed gives the same text: sampling runs under ``torch.manual_seed(seed)`` inside a
    forked RNG, so the caller's random state is left as it was.
    """
    check_generation_options(max_new_tokens, temperature, top_k)
    device = torch.device(device) if device is not None else _device_of(model)
    if not prompt:
        raise UsageError("the prompt is empty", "--prompt", "pass some text to continue, e.g. --prompt 'The'")
    encoded = tokenizer(prompt, return_tensors="pt")
    input_ids = encoded["input_ids"].to(device)  # [1, prompt_tokens]
    if input_ids.numel() == 0:
        raise UsageError("the prompt gives no tokens", "--prompt", "pass some text to continue")
    check_vocabulary(input_ids, _vocabulary_size(model), f"the {model.config.model_type} model")
    limit = model_context(model.config)
    if limit is not None and input_ids.shape[1] + max_new_tokens > limit:
        raise UsageError(f"the prompt ({input_ids.shape[1]} tokens) plus --max-new-tokens {max_new_tokens} exceeds "
                         f"the model's {limit}-token context", None, "shorten the prompt or lower --max-new-tokens")
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
    check_generation_options(max_new_tokens, temperature, top_k)
    if not prompt:
        raise UsageError("the prompt is empty", "--prompt", "pass some text to continue, e.g. --prompt 'The'")
    manifest = read_manifest(artifact)
    tok = load_tokenizer([Path(artifact), *_source_folders(manifest)], tokenizer)
    model = load_compressed(artifact, device, dtype, merge=merge, init=init)
    return generate_text(model, tok, prompt, max_new_tokens, temperature, top_k, seed, device)


# --------------------------------------------------------------------------- loading models


def _source_folders(manifest: Manifest) -> list[Path]:
    """The source checkpoint's folder (where its tokenizer may be), if it still exists."""
    path = Path(manifest.source.path)
    folder = path if path.is_dir() else path.parent
    return [folder] if folder.is_dir() else []


def stored_parameters(layers: list[dict]) -> int:
    """Numbers an artifact stores: dense tensors whole, factorized ones as r * (rows + cols)."""
    total = 0
    for layer in layers:
        shape = layer["shape"]
        if layer["kind"] == "dense":
            total += math.prod(shape)
        elif layer["kind"] == "lowrank":
            total += layer["rank"] * (shape[0] + shape[-1]) if len(shape) == 2 else math.prod(shape)
    return total


def _unique_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied ones once


# --------------------------------------------------------------------------- report


@dataclass
class ModelSpec:
    """A model to evaluate, resolved (config read, architecture checked) before any is loaded."""

    label: str
    role: str  # original | compressed | also
    path: Path
    kind: str  # artifact | checkpoint
    config: object
    bytes: int


@dataclass
class ModelRow:
    label: str
    role: str
    path: str
    kind: str
    bytes: int
    parameters: int
    result: PerplexityResult
    ratio: float = 0.0
    change_percent: float | None = None

    def to_json(self) -> dict:
        return {"label": self.label, "role": self.role, "path": self.path, "kind": self.kind, "bytes": self.bytes,
                "ratio": self.ratio, "parameters": self.parameters, "change_percent": self.change_percent,
                **self.result.to_json()}


@dataclass
class ReportResult:
    artifact: str
    data: str
    text_tokens: int
    context: int
    stride: int
    device: str
    dtype: str
    original_bytes: int
    compressed_bytes: int
    rule: str
    reference: str
    models: list[ModelRow]
    layers: list[dict]
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.compressed_bytes / self.original_bytes if self.original_bytes else 0.0

    def row(self, role: str) -> ModelRow | None:
        return next((row for row in self.models if row.role == role), None)

    def to_json(self) -> dict:
        original = self.row("original")
        return {
            "artifact": self.artifact, "data": self.data, "text_tokens": self.text_tokens, "context": self.context,
            "stride": self.stride, "device": self.device, "dtype": self.dtype,
            "original_bytes": self.original_bytes, "compressed_bytes": self.compressed_bytes, "ratio": self.ratio,
            "perplexity": {"original": None if original is None else _finite(original.result.perplexity),
                           **{row.label: _finite(row.result.perplexity) for row in self.models}},
            "tokens_per_second": {row.label: _finite(row.result.tokens_per_second) for row in self.models},
            "models": [row.to_json() for row in self.models],
            "rule": self.rule, "reference": self.reference,
            "layers": [{key: layer.get(key) for key in ("name", "shape", "kind", "rank", "energy", "bytes")}
                       for layer in self.layers],
            "notes": self.notes,
        }


def _resolve_original(original: str | Path | None, artifact_config, manifest: Manifest,
                      notes: list[str]) -> ModelSpec | None:
    if original is not None:
        return _original_spec(Path(original), artifact_config, manifest, notes, "--original", None)
    source = Path(manifest.source.path)
    if manifest.source.is_training:
        notes.append("a training checkpoint is its own original (no dense source to compare): pass --original CKPT")
        return None
    if not source.exists():
        notes.append(f"the checkpoint this artifact was compressed from is gone ({source}): no original to compare; "
                     "pass --original CKPT")
        return None
    recorded = {entry.file: entry.bytes for entry in manifest.source.files}
    try:
        return _original_spec(source, artifact_config, manifest, notes, "the recorded source", recorded)
    except (CheckpointError, MismatchError) as err:  # the user did not name it: compare without it
        notes.append(f"the recorded source is no longer usable as the original ({err.message}); pass --original CKPT")
        return None


def _original_spec(original: Path, artifact_config, manifest: Manifest, notes: list[str], option: str,
                   recorded: dict | None) -> ModelSpec:
    checkpoint = open_checkpoint(original)
    try:
        check_same_architecture(checkpoint, artifact_config, manifest, option)
        config = checkpoint_config(checkpoint, artifact_config)
        kind = "artifact" if is_artifact(original) else "checkpoint"
        files = artifact_bytes(original) if kind == "artifact" else sum(f.stat().st_size for f in checkpoint.files)
        if recorded is not None and {f.name: f.stat().st_size for f in checkpoint.files} != recorded:
            notes.append(f"the source checkpoint changed since compression (file sizes differ): {original}")
    finally:
        checkpoint.close()
    # Always loaded dense (an artifact given as the original is reconstructed W_ref + B @ A).
    return ModelSpec("original", "original", original, kind, config, files)


def _resolve_also(path: str | Path, artifact_config, manifest: Manifest, labels: set[str]) -> ModelSpec:
    path = Path(path)
    label = path.name or str(path)
    while label in labels:
        label += "'"
    labels.add(label)
    if is_artifact(path):
        describe_artifact(path)  # validates format and version
        return ModelSpec(label, "also", path, "artifact", model_config(path), artifact_bytes(path))
    checkpoint = open_checkpoint(path)
    try:
        config = checkpoint_config(checkpoint)
        if config is None:  # no config.json: only usable as the artifact's architecture
            check_same_architecture(checkpoint, artifact_config, manifest, f"--also {path}")
            config = artifact_config
        size = sum(f.stat().st_size for f in checkpoint.files)
    finally:
        checkpoint.close()
    return ModelSpec(label, "also", path, "checkpoint", config, size)


def _free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def report(artifact: str | Path, data: str | Path, original: str | Path | None = None, also: Sequence[str | Path] = (),
           device: str = "cpu", dtype: torch.dtype = torch.float32, max_tokens: int | None = None,
           stride: int | None = None, tokenizer: str | Path | None = None, *, context: int | None = None,
           init: str | Path | None = None, merge: bool = False,
           on_window: Callable[[str, int, int], None] | None = None) -> ReportResult:
    """Size and perplexity side by side: the original, the compressed artifact, and each ``also`` model.

    Everything that can be checked cheaply is checked before any model is loaded: the device,
    the artifact, the original's architecture, the tokenizer, the text, the window. Then the
    compressed model runs first (loading it verifies the init reference), then the others, each
    through the same ``perplexity`` on the same tokens and windows. ``on_window(label, done,
    total)`` reports progress.
    """
    check_device(device)
    check_max_tokens(max_tokens)
    if stride is not None and stride < 1:
        raise UsageError("--stride must be at least 1", f"--stride {stride}", "leave it out for non-overlapping windows")
    if context is not None and context < 2:
        raise UsageError("the window must hold at least 2 tokens", f"--context {context}", "e.g. --context 512")
    text = read_text(data)  # a missing, empty or binary file fails before any model or tokenizer is read
    artifact = Path(artifact)
    summary = describe_artifact(artifact)
    manifest = read_manifest(artifact)
    artifact_config = model_config(artifact)
    notes: list[str] = []
    original_spec = _resolve_original(original, artifact_config, manifest, notes)
    labels = {"original", "compressed"}
    specs = [ModelSpec("compressed", "compressed", artifact, "artifact", artifact_config, summary["compressed_bytes"])]
    specs += [_resolve_also(path, artifact_config, manifest, labels) for path in also]
    if original_spec is not None:
        specs.insert(1, original_spec)

    # One window length for every model (the smallest context), so that the numbers compare.
    length = min(window_length(spec.config, context) for spec in specs)
    plan_windows(length, length, stride)  # validates --stride against the window
    tokenizer_folders = [artifact] + ([original_spec.path if original_spec.path.is_dir() else original_spec.path.parent]
                                      if original_spec is not None else [])
    tok = load_tokenizer(tokenizer_folders, tokenizer)
    tokens = tokenize_text(text, tok, max_tokens, str(data))
    for spec in specs:
        check_vocabulary(tokens, getattr(spec.config, "vocab_size", None), f"{spec.label} ({spec.path})")
    check_text_length(tokens.numel(), length, max_tokens)

    rows: dict[str, ModelRow] = {}
    for spec in specs:
        if spec.kind == "artifact" and spec.role != "original":
            model = load_compressed(spec.path, device, dtype, merge=merge, init=init if spec.role == "compressed" else None)
            layers = summary["layers"] if spec.role == "compressed" else describe_artifact(spec.path)["layers"]
            parameters = stored_parameters(layers)
        else:
            model = load_dense(spec.path, spec.config, device, dtype)
            parameters = _unique_parameters(model)
        callback = None if on_window is None else (lambda done, total, label=spec.label: on_window(label, done, total))
        result = perplexity(model, tokens, length, stride, device, callback)
        del model  # before the next model is loaded: peak memory is one model, not two
        _free_memory(device)
        rows[spec.label] = ModelRow(spec.label, spec.role, str(spec.path), spec.kind, spec.bytes, parameters, result)

    ordered = ([rows["original"]] if "original" in rows else []) + [rows["compressed"]] + \
        [rows[spec.label] for spec in specs if spec.role == "also"]
    original_row = rows.get("original")
    original_bytes = original_row.bytes if original_row is not None else summary["original_bytes"]
    for row in ordered:
        row.ratio = row.bytes / original_bytes if original_bytes else 0.0
        if original_row is not None:
            row.change_percent = 100.0 * (row.result.perplexity / original_row.result.perplexity - 1.0)
    return ReportResult(str(artifact), str(data), int(tokens.numel()), length, stride or length, device,
                        dtype_name(dtype), original_bytes, summary["compressed_bytes"], summary["rule"],
                        summary["reference"], ordered, summary["layers"], notes)


# --------------------------------------------------------------------------- plot


def plot_report(result: ReportResult, path: str | Path) -> Path:
    """Bytes on disk vs perplexity, one labelled point per model; the artifact's per-layer ranks as bars."""
    from .analysis import _pyplot, save_figure

    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
    for row in result.models:
        value = _finite(row.result.perplexity)
        if value is None:
            continue
        left.scatter([row.bytes], [value], s=40, zorder=3)
        left.annotate(row.label, (row.bytes, value), textcoords="offset points", xytext=(6, 4), fontsize=8)
    left.set_xscale("log")
    left.set(title=f"Size vs perplexity ({result.text_tokens} tokens, window {result.context})",
             xlabel="bytes on disk (log scale)", ylabel="perplexity")
    left.grid(True, alpha=0.3)
    # Matrices only: 1-D tensors (biases, norms) are always dense and have no rank worth a bar.
    ranked = [layer for layer in result.layers if len(layer["shape"]) == 2]
    positions = range(len(ranked))
    heights = [min(layer["shape"]) if layer["kind"] == "dense" else layer["rank"] or 0 for layer in ranked]
    colors = ["tab:blue" if layer["kind"] == "lowrank" else "tab:gray" if layer["kind"] == "dense" else "tab:red"
              for layer in ranked]
    right.bar(list(positions), heights, color=colors)
    right.set(title=f"Rank per layer ({result.rule}; gray = dense, full rank)", xlabel="layer", ylabel="rank")
    if len(ranked) <= 60:
        right.set_xticks(list(positions))
        right.set_xticklabels([_short(layer["name"]) for layer in ranked], rotation=90, fontsize=6)
    figure.tight_layout()
    return save_figure(figure, path)


def _short(name: str) -> str:
    return name.removesuffix(".weight").removeprefix("transformer.").removeprefix("model.")
