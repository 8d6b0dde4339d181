"""Calibrate a trained checkpoint on text (``compress --calibrate TEXT``): read the text, tokenize
it with the model's own tokenizer, run the trained model once over it (dense, float32) and keep
every factorized layer's input Gram and the token counts (calibration.collect_statistics); and,
with ``--distill-scales N``, train the stored scales against the trained model on the same text
once every tensor is encoded (distill.distill_scales).

The model is loaded only here, and dropped before any factorization starts and after the
distillation, so compress's peak memory is the model's once, not twice.
"""

from __future__ import annotations

import gc
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from inrank_convert.artifact.writer import StoredTensor
from inrank_convert.compression.calibration import CalibrationStats, calibration_window, collect_statistics
from inrank_convert.compression.distill import DistillRecord, distill_scales
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.inputs.sources import Inputs
from inrank_convert.inputs.text import load_tokenizer, read_text, tokenize_text
from inrank_convert.runtime.modeling import checkpoint_config, load_dense

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def trained_config(inputs: Inputs, what: str, fix: str) -> PretrainedConfig:
    """The config of the trained model, for ``what`` runs it (calibration, a perplexity target,
    sweep); one line saying ``fix`` when no config.json is beside the checkpoint."""
    config = checkpoint_config(inputs.trained)
    if config is None:
        raise UsageError(f"{what} runs the model, but no config.json is beside the checkpoint",
                         str(inputs.trained.path), f"use a Hugging Face folder or run, or {fix}")
    return config


def trained_tokens(inputs: Inputs, text: str, tokenizer: str | Path | None, max_tokens: int | None,
                   where: str) -> torch.Tensor:
    """Token ids of ``text`` under the trained model's tokenizer (beside the checkpoint or in its
    run folder) or ``tokenizer``."""
    folders = [folder for folder in (inputs.trained.config_dir, inputs.run_folder) if folder is not None]
    return tokenize_text(text, load_tokenizer(folders, tokenizer), max_tokens, where)


def calibrate_checkpoint(inputs: Inputs, text: str | Path, names: set[str], *, max_tokens: int,
                         tokenizer: str | Path | None = None, device: str = "cpu") -> CalibrationStats:
    """The input Grams of the layers ``names`` (weight names) of ``inputs.trained`` on ``text``
    (a file, or a folder of files), from its first ``max_tokens`` tokens."""
    if max_tokens < 1:
        raise UsageError(f"{flag('--calib-tokens')} must be at least 1", f"{flag('--calib-tokens')} {max_tokens}",
                         f"e.g. {flag('--calib-tokens')} 65536")
    where = f"{flag('--calibrate')} {text}"
    content = read_text(text)  # missing, empty or binary text fails before the model is read
    config = trained_config(inputs, "calibration", f"drop {flag('--calibrate')}")
    tokens = trained_tokens(inputs, content, tokenizer, max(2, max_tokens), where)
    model = load_dense(inputs.trained.path, config, "cpu", torch.float32)
    try:
        stats = collect_statistics(model, tokens, device=device, max_tokens=max_tokens, names=names, where=where,
                                   batch_dtype=torch.float32)
    finally:
        del model
        _release(device)
    stats.text_sha256 = hashlib.sha256(content.encode()).hexdigest()
    return stats


def distill_checkpoint(inputs: Inputs, text: str | Path, stored: list[StoredTensor], *, steps: int, max_tokens: int,
                       tokenizer: str | Path | None = None, device: str = "cpu",
                       stats: CalibrationStats | None = None) -> DistillRecord:
    """``distill_scales`` of the tensors ``stored`` (as compress encoded them; changed in place
    where the distillation is kept) against ``inputs.trained`` on the first ``max_tokens`` tokens
    of ``text`` (the calibration text), in windows of the model's context; ``stats``: the
    calibration whose Grams measure a kept tensor's output error again."""
    where = f"{flag('--calibrate')} {text}"
    config = trained_config(inputs, "scale distillation", f"drop {flag('--distill-scales')}")
    tokens = trained_tokens(inputs, read_text(text), tokenizer, max(2, max_tokens), where)[:max_tokens]
    model = load_dense(inputs.trained.path, config, "cpu", torch.float32)
    try:
        window = min(calibration_window(model, None), tokens.numel())
        return distill_scales(model, stored, tokens, steps=steps, window=window, reference=inputs.reference.get,
                              trained=inputs.trained.get, device=device,
                              grams=None if stats is None else stats.input_gram)
    finally:
        del model
        _release(device)


def _release(device: str) -> None:
    """Give back the memory of the model just dropped (the caller's last reference to it)."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
