"""``report``: size and perplexity side by side for the original, the artifact and any other models.

Everything that can be checked cheaply is checked before any model is loaded. Models are then
loaded one at a time and dropped after their evaluation, so peak memory is that of the largest
model, not the sum; each goes through ``evaluate.perplexity`` on the same tokens and windows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inrank_convert.artifact import Manifest, artifact_bytes, describe_artifact, is_artifact, read_manifest
from inrank_convert.compression.plan import dense_tensor_bytes
from inrank_convert.core.distributed import check_device
from inrank_convert.core.errors import CheckpointError, MismatchError, UsageError, flag
from inrank_convert.core.hub import resolve_model
from inrank_convert.core.tensors import dtype_name
from inrank_convert.inputs.sources import open_checkpoint
from inrank_convert.inputs.text import (
    check_max_tokens,
    first_tokenizer_folder,
    has_tokenizer,
    load_tokenizer,
    read_text,
    tokenize_text,
)
from inrank_convert.runtime.evaluate import (
    PerplexityResult,
    check_text_length,
    check_vocabulary,
    finite_or_none,
    free_memory,
    perplexity,
    plan_windows,
    window_length,
)
from inrank_convert.runtime.modeling import (
    check_same_architecture,
    checkpoint_config,
    load_compressed,
    load_dense,
    model_config,
)


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
            "perplexity": {"original": None if original is None else finite_or_none(original.result.perplexity),
                           **{row.label: finite_or_none(row.result.perplexity) for row in self.models}},
            "tokens_per_second": {row.label: finite_or_none(row.result.tokens_per_second) for row in self.models},
            "models": [row.to_json() for row in self.models],
            "rule": self.rule, "reference": self.reference,
            "layers": [{key: layer.get(key) for key in ("name", "shape", "kind", "rank", "energy", "bytes")}
                       for layer in self.layers],
            "notes": self.notes,
        }


def _resolve_original(original: str | Path | None, artifact_config, manifest: Manifest,
                      notes: list[str]) -> ModelSpec | None:
    if original is not None:
        return _original_spec(resolve_model(original), artifact_config, manifest, notes, flag("--original"), None)
    source = Path(manifest.source.path)
    if manifest.source.is_training:
        notes.append(f"a training checkpoint is its own original (no dense source to compare): pass {flag('--original')} CKPT")
        return None
    if not source.exists():
        notes.append(f"the checkpoint this artifact was compressed from is gone ({source}): no original to compare; "
                     f"pass {flag('--original')} CKPT")
        return None
    recorded = {entry.file: entry.bytes for entry in manifest.source.files}
    try:
        return _original_spec(source, artifact_config, manifest, notes, "the recorded source", recorded)
    except (CheckpointError, MismatchError) as err:  # the user did not name it: compare without it
        notes.append(f"the recorded source is no longer usable as the original ({err.message}); pass {flag('--original')} CKPT")
        return None


def _original_spec(original: Path, artifact_config, manifest: Manifest, notes: list[str], option: str,
                   recorded: dict | None) -> ModelSpec:
    checkpoint = open_checkpoint(original)
    try:
        check_same_architecture(checkpoint, artifact_config, manifest, option)
        config = checkpoint_config(checkpoint, artifact_config)
        kind = "artifact" if is_artifact(original) else "checkpoint"
        # One definition of a model's bytes everywhere (compress, inspect, report): a checkpoint's dense
        # tensor bytes (tied weights once, no file headers), an artifact's files on disk.
        size = artifact_bytes(original) if kind == "artifact" else dense_tensor_bytes(checkpoint)
        if recorded is not None and {f.name: f.stat().st_size for f in checkpoint.files} != recorded:
            notes.append(f"the source checkpoint changed since compression (file sizes differ): {original}")
    finally:
        checkpoint.close()
    # Always loaded dense (an artifact given as the original is reconstructed W_ref + B @ A).
    return ModelSpec("original", "original", original, kind, config, size)


def _resolve_also(path: str | Path, artifact_config, manifest: Manifest, labels: set[str]) -> ModelSpec:
    label = Path(path).name or str(path)  # a hub id's name, not its snapshot's commit
    while label in labels:
        label += "'"
    labels.add(label)
    path = resolve_model(path)
    if is_artifact(path):
        describe_artifact(path)  # validates format and version
        return ModelSpec(label, "also", path, "artifact", model_config(path), artifact_bytes(path))
    checkpoint = open_checkpoint(path)
    try:
        config = checkpoint_config(checkpoint)
        if config is None:  # no config.json: only usable as the artifact's architecture
            check_same_architecture(checkpoint, artifact_config, manifest, f"{flag('--also')} {path}")
            config = artifact_config
        size = dense_tensor_bytes(checkpoint)
    finally:
        checkpoint.close()
    return ModelSpec(label, "also", path, "checkpoint", config, size)


def _check_same_tokens(spec: ModelSpec, in_use: Path, tokens: torch.Tensor, text: str, max_tokens: int | None) -> None:
    """Every model is scored on the same token ids; a model that ships its own tokenizer must split
    the text into those same ids, or its perplexity is that of another model's tokens (a GPT-2
    scored on LLaMA ids gives a number in the tens of thousands that looks like a result)."""
    folder = spec.path if spec.path.is_dir() else spec.path.parent
    if not has_tokenizer(folder) or folder.resolve() == in_use.resolve():
        return
    own = tokenize_text(text, load_tokenizer(folder), max_tokens)
    if torch.equal(own, tokens):
        return
    common = min(own.numel(), tokens.numel())
    mismatch = (own[:common] != tokens[:common]).nonzero()
    differs = int(mismatch[0, 0]) if mismatch.numel() else common
    raise UsageError(f"{spec.label} has its own tokenizer, which splits the text differently from the one in use "
                     f"({in_use}; first difference at token {differs}): perplexities on different tokens do not compare",
                     str(spec.path), "report models that share a tokenizer (compare other models in a report of their own)")


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
        raise UsageError(f"{flag('--stride')} must be at least 1", f"{flag('--stride')} {stride}", "leave it out for non-overlapping windows")
    if context is not None and context < 2:
        raise UsageError("the window must hold at least 2 tokens", f"{flag('--context')} {context}", f"e.g. {flag('--context')} 512")
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
    in_use = Path(tokenizer) if tokenizer is not None else first_tokenizer_folder(tokenizer_folders)
    for spec in specs:
        _check_same_tokens(spec, in_use, tokens, text, max_tokens)
    for spec in specs:
        check_vocabulary(tokens, getattr(spec.config, "vocab_size", None), f"{spec.label} ({spec.path})")
    check_text_length(tokens.numel(), length, max_tokens)

    rows: dict[str, ModelRow] = {}
    for spec in specs:
        if spec.kind == "artifact" and spec.role != "original":
            model = load_compressed(spec.path, device, dtype, merge=merge, init=init if spec.role == "compressed" else None)
            parameters = read_manifest(spec.path).stored_parameters()
        else:
            model = load_dense(spec.path, spec.config, device, dtype)
            parameters = _unique_parameters(model)
        callback = None if on_window is None else (lambda done, total, label=spec.label: on_window(label, done, total))
        result = perplexity(model, tokens, length, stride, device, callback)
        del model  # before the next model is loaded: peak memory is one model, not two
        free_memory(device)
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


def _unique_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied ones once
