"""export-peft --data: write the adapter, then measure what it costs.

Three perplexities on the same tokens and windows (``evaluate.perplexity``): the reference (base)
model, the base with the written adapter applied by real PEFT (``PeftModel.from_pretrained``: what
a PEFT loader, or a server that applies the same LoRA, computes), and the artifact itself. For the
exact adapter the last two agree; for ``--target vllm`` their gap is what serving the adapter costs.
Every cheap check (the text, the tokenizer, the window) runs before anything is written.
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from pathlib import Path

import torch

from inrank_convert.artifact import read_manifest
from inrank_convert.core.distributed import check_device
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.export.dense import decompress
from inrank_convert.export.peft_adapter import PeftExportResult, export_peft
from inrank_convert.export.vllm_plan import check_target
from inrank_convert.inputs.text import check_max_tokens, load_tokenizer, read_text, tokenize_text
from inrank_convert.runtime.evaluate import (
    check_text_length,
    check_vocabulary,
    checkpoint_perplexity,
    finite_or_none,
    free_memory,
    perplexity,
    window_length,
)
from inrank_convert.runtime.modeling import load_dense, model_config


def export_and_score(artifact: str | Path, output: str | Path, data: str | Path, *, force: bool = False,
                     init: str | Path | None = None, target: str = "peft", max_rank: int | None = None,
                     max_tokens: int | None = None, context: int | None = None, tokenizer: str | Path | None = None,
                     device: str = "cpu") -> PeftExportResult:
    """``export_peft``, then the perplexity of the base, of base + adapter and of the artifact on ``data``
    (in ``result.perplexity``)."""
    check_target(target, max_rank)
    check_device(device)
    check_max_tokens(max_tokens)
    if importlib.util.find_spec("peft") is None:
        raise UsageError(f"measuring the adapter ({flag('--data')}) needs the peft package", None,
                         "pip install 'inrank-convert[peft]'")
    text = read_text(data)  # a missing, empty or binary file fails before anything is written
    artifact = Path(artifact)
    read_manifest(artifact)  # a missing or broken artifact is named as such
    config = model_config(artifact)
    length = window_length(config, context)
    tokens = tokenize_text(text, load_tokenizer([artifact], tokenizer), max_tokens, str(data))
    check_vocabulary(tokens, getattr(config, "vocab_size", None), f"the artifact ({artifact})")
    check_text_length(tokens.numel(), length, max_tokens)

    result = export_peft(artifact, output, force=force, init=init, target=target, max_rank=max_rank)
    reference, adapted = _base_and_adapter(artifact, Path(output), init, tokens, length, device,
                                           result.resize_token_embeddings)
    compressed = checkpoint_perplexity(artifact, tokens, length, device, init=init)
    result.perplexity = {
        "data": str(data), "tokens": int(tokens.numel()), "context": length,
        "reference": finite_or_none(reference), "adapter": finite_or_none(adapted),
        "artifact": finite_or_none(compressed),
        "adapter_change_percent": finite_or_none(100.0 * (adapted / compressed - 1.0)),
    }
    return result


def _base_and_adapter(artifact: Path, adapter: Path, init: str | Path | None, tokens: torch.Tensor, length: int,
                      device: str, resize: int | None) -> tuple[float, float]:
    """Perplexities of the reference model and of the reference + ``adapter`` (PEFT), as a user loads them:
    the base from the folder ``decompress --reference-only`` writes, a temporary copy here."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="inrank-base-") as folder:
        base_dir = Path(folder) / "base"
        decompress(artifact, base_dir, init=init, device="cpu", reference_only=True)
        base = load_dense(base_dir, model_config(base_dir), device)  # its own config: a grown vocabulary shrinks
    if resize is not None:
        base.resize_token_embeddings(resize)  # a grown vocabulary: the adapter saves the larger modules whole
    reference = perplexity(base, tokens, length, device=device).perplexity
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and tied embeddings
        model = PeftModel.from_pretrained(base, adapter).to(device).eval()
    adapted = perplexity(model, tokens, length, device=device).perplexity
    del model, base
    free_memory(device)
    return reference, adapted
