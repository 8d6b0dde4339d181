"""Calibrate a trained checkpoint on text (``compress --calibrate TEXT``): read the text, tokenize
it with the model's own tokenizer, run the trained model once over it (dense, float32) and keep
every factorized layer's input Gram and the token counts (calibration.collect_statistics).

The model is loaded only here and dropped before any factorization starts, so compress's peak
memory is the model's once, not twice.
"""

from __future__ import annotations

import gc
import hashlib
from pathlib import Path

import torch

from .calibration import CalibrationStats, collect_statistics
from .data import load_tokenizer, read_text, tokenize_text
from .errors import UsageError, flag
from .modeling import checkpoint_config, load_dense
from .sources import Inputs


def calibrate_checkpoint(inputs: Inputs, text: str | Path, names: set[str], *, max_tokens: int,
                         tokenizer: str | Path | None = None, device: str = "cpu") -> CalibrationStats:
    """The input Grams of the layers ``names`` (weight names) of ``inputs.trained`` on ``text``
    (a file, or a folder of files), from its first ``max_tokens`` tokens."""
    if max_tokens < 1:
        raise UsageError(f"{flag('--calib-tokens')} must be at least 1", f"{flag('--calib-tokens')} {max_tokens}",
                         f"e.g. {flag('--calib-tokens')} 65536")
    where = f"{flag('--calibrate')} {text}"
    content = read_text(text)  # missing, empty or binary text fails before the model is read
    trained = inputs.trained
    config = checkpoint_config(trained)
    if config is None:
        raise UsageError("calibration runs the model, but no config.json is beside the checkpoint", str(trained.path),
                         f"compress a Hugging Face folder or run, or drop {flag('--calibrate')}")
    folders = [folder for folder in (trained.config_dir, inputs.run_folder) if folder is not None]
    tokens = tokenize_text(content, load_tokenizer(folders, tokenizer), max(2, max_tokens), where)
    model = load_dense(trained.path, config, "cpu", torch.float32)
    try:
        stats = collect_statistics(model, tokens, device=device, max_tokens=max_tokens, names=names, where=where,
                                   batch_dtype=torch.float32)
    finally:
        del model
        gc.collect()
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    stats.text_sha256 = hashlib.sha256(content.encode()).hexdigest()
    return stats
