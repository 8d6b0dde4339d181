"""Tiny GPT-2 models with GPT-2's vocabulary (50257 tokens, so the real GPT-2 tokenizer fits them),
"trained" = init + planted rank-4 updates, and two artifacts of them: what the perplexity, report,
generate and hub tests measure on WikiText-2 test text. conftest's ``eval_models`` builds them once
per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from inrank_convert import PlanOptions, RankRule, compress
from tests.conftest import SHARED_DATA, build_model, gpt2_config, planted_update, save_hf

TOKENIZER_DIR = SHARED_DATA / "gpt2-tokenizer"
WIKI_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
CONTEXT = 128
UPDATE_SCALE = 1.0  # planted update norm relative to each weight's norm: a clear perplexity shift at t = 0.5
HAS_DATA = (TOKENIZER_DIR / "vocab.json").is_file() and WIKI_TEST.is_file()
needs_data = pytest.mark.skipif(not HAS_DATA, reason=f"shared data (GPT-2 tokenizer, WikiText-2) absent under {SHARED_DATA}")


@dataclass
class EvalModels:
    root: Path
    init: Path  # HF folders with the GPT-2 tokenizer saved beside the weights
    trained: Path
    full: Path  # artifact at energy threshold 1.0 (every tensor kept exactly)
    half: Path  # artifact at energy threshold 0.5 in bfloat16 (low-rank layers, a different model)


def gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast(vocab=str(TOKENIZER_DIR / "vocab.json"), merges=str(TOKENIZER_DIR / "merges.txt"))


def build_eval_models(root: Path) -> EvalModels:
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
    compress(trained, full, init=init, options=PlanOptions(rule=RankRule("energy-rest", 1.0)))
    # bfloat16 factors: the tests that measure it were written for the float storage.
    compress(trained, half, init=init, options=PlanOptions(rule=RankRule("energy-rest", 0.5), quantize="none"))
    return EvalModels(root, init, trained, full, half)
