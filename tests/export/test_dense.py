"""export/dense.py: ``decompress --reference-only`` of a grown-vocabulary artifact writes the base
model with the base's config.json, which from_pretrained loads and a PEFT adapter of the artifact
(after the resize) turns into the compressed model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from inrank_convert import compress, load_compressed
from inrank_convert.export.dense import decompress
from inrank_convert.export.peft_adapter import export_peft
from tests.helpers.rows import ATOL, GROWN, VOCAB, load_adapter, logits

pytest.importorskip("peft")


def test_reference_only_base_of_a_grown_vocabulary_loads(grown, tmp_path):
    """decompress --reference-only of a grown-vocabulary artifact writes the base: its config.json
    says the base's vocabulary, so from_pretrained loads it, and base + adapter (after the resize)
    is the compressed model."""
    pair, _ = grown
    out = tmp_path / "embedded"
    compress(pair.ft_dir, out, init=pair.base_dir, embed_init=True)
    decompress(out, tmp_path / "base", reference_only=True)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert base.config.vocab_size == VOCAB == base.get_input_embeddings().num_embeddings
    export_peft(out, tmp_path / "adapter")
    base.resize_token_embeddings(VOCAB + GROWN)
    assert torch.allclose(logits(load_adapter(base, tmp_path / "adapter")), logits(load_compressed(out)), atol=ATOL)
