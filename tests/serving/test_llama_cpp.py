"""llama.cpp itself loads a base model and the adapter export-gguf wrote, and gives the artifact's
logits: the base converted with llama.cpp's own convert_hf_to_gguf.py (float32), llama.cpp run
through llama-cpp-python built from source. ``make test-serving`` installs both (outside the
package's dependencies) and runs this; elsewhere it is skipped with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inrank_convert.runtime.modeling import load_compressed
from tests.conftest import GPT2_TOKENIZER_DIR
from tests.helpers.cli_contract import expect_ok

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run make test-serving")
CONVERTER = Path(os.environ.get("INRANK_LLAMA_CPP", "")) / "convert_hf_to_gguf.py"
pytestmark = [
    pytest.mark.skipif(not CONVERTER.is_file(), reason="INRANK_LLAMA_CPP names no llama.cpp source folder "
                                                       "(make test-serving sets it)"),
    pytest.mark.skipif(not (GPT2_TOKENIZER_DIR / "vocab.json").is_file(), reason="needs ../shared/data/gpt2-tokenizer"),
]
TOKENS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13, 383, 1110, 286, 1204, 11, 290]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 2-layer LLaMA (4 heads, 2 KV heads: q and k are permuted differently) with GPT-2's tokenizer
    (one llama.cpp's converter knows), a trained copy with low-rank updates on the projections and the
    head and, on the token embedding, updates of the rows the tokens below use (a fine-tune's: the
    default artifact stores them lowrank+rows), its lossless and its default artifact, their GGUF
    adapters, and the base converted to float32 GGUF."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from inrank_convert.inputs.text import load_tokenizer

    root = tmp_path_factory.mktemp("llama-cpp")
    tokenizer = load_tokenizer(GPT2_TOKENIZER_DIR)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "init")
    tokenizer.save_pretrained(root / "init")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            rows, cols = weight.shape if weight.ndim == 2 else (0, 0)
            if "embed_tokens" in name:
                seen = torch.tensor(sorted(set(TOKENS)))
                weight[seen] += torch.randn(len(seen), cols, generator=generator) / 8
            elif weight.ndim == 2:
                weight += (torch.randn(rows, 4, generator=generator) @ torch.randn(4, cols, generator=generator)) / (
                    8 * cols ** 0.5)
    model.save_pretrained(root / "trained")
    tokenizer.save_pretrained(root / "trained")
    made = {"root": root}
    for label, extra in (("exact", ["--threshold", "1.0"]), ("default", [])):
        expect_ok(["compress", root / "trained", "--init", root / "init", "-o", root / label, "--quiet", *extra])
        expect_ok(["export-gguf", root / label, "-o", root / f"{label}.gguf"])
        made[label] = root / label
    subprocess.run([sys.executable, str(CONVERTER), str(root / "init"), "--outfile", str(root / "base.gguf"),
                    "--outtype", "f32"], check=True, capture_output=True)
    return made


def llama_cpp_logits(base: Path, lora: Path | None) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(base), lora_path=None if lora is None else str(lora), logits_all=True,
                          n_ctx=64, n_threads=2, verbose=False, type_k=0, type_v=0)  # a float32 KV cache (GGML_TYPE_F32)
    llm.eval(TOKENS)
    return np.array(llm.scores[:len(TOKENS)], dtype=np.float64)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].double().numpy()


@pytest.mark.parametrize("label", ["exact", "default"])
def test_llama_cpp_with_the_adapter_gives_the_artifacts_logits(models, label):
    root = models["root"]
    ours = torch_logits(load_compressed(models[label]))
    served = llama_cpp_logits(root / "base.gguf", root / f"{label}.gguf")
    base = llama_cpp_logits(root / "base.gguf", None)
    scale = np.abs(ours).max()
    # float32 rounding only (1e-6 measured, against a change of 1.6 that the adapter makes).
    assert np.abs(served - ours).max() <= 1e-5 * scale + 1e-6, np.abs(served - ours).max()
    assert np.abs(base - ours).max() > 100 * np.abs(served - ours).max()
