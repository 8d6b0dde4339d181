"""export-gguf: a llama.cpp LoRA adapter read back with the gguf package (the reader llama.cpp's own
tools use): its keys, llama.cpp's tensor names and shapes, and the update it adds under llama.cpp's
rules (``alpha / r`` per tensor, q/k rows in llama.cpp's rotary order) equal to the artifact's.
What llama.cpp cannot hold is listed; unsupported architectures and bad outputs are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from inrank_convert.export.gguf_adapter import permute_rows
from inrank_convert.inputs.sources import open_artifact
from tests.conftest import build_model, llama_config, make_pair, save_hf, train_state
from tests.helpers.cli_contract import expect_error, expect_ok, run_json

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    pair = make_pair(root, "llama")
    artifact = root / "artifact"
    expect_ok(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", artifact, "--quiet"])
    return root, pair, artifact


def _llama_cpp_rows(rows: int, heads: int) -> list[int]:
    """Which original row each row of llama.cpp's q/k weight holds, written out by hand: per head,
    the rotary halves [0, half) and [half, 2 half) interleaved (0, half, 1, half + 1, ...)."""
    per_head = rows // heads
    half = per_head // 2
    order = []
    for head in range(heads):
        for i in range(half):
            order += [head * per_head + i, head * per_head + half + i]
    return order


def test_permute_rows_is_llama_cpps_rotary_order():
    weight = torch.arange(16 * 3, dtype=torch.float32).reshape(16, 3)
    assert torch.equal(permute_rows(weight, 2), weight[_llama_cpp_rows(16, 2)])


def test_the_adapter_adds_the_artifacts_update_under_llama_cpps_rules(llama, tmp_path):
    root, pair, artifact = llama
    out = tmp_path / "adapter.gguf"
    result = run_json(["export-gguf", artifact, "-o", out, "--json"])
    reader = gguf.GGUFReader(str(out))

    def value(key):
        field = reader.fields[key]
        return field.contents()

    assert value("general.type") == "adapter" and value("adapter.type") == "lora"
    assert value("general.architecture") == "llama" and value("adapter.lora.alpha") == pytest.approx(1.0)
    tensors = {tensor.name: np.array(tensor.data) for tensor in reader.tensors}
    assert tensors and all(name.endswith((".lora_a", ".lora_b")) for name in tensors)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, pair.config.num_hidden_layers)
    heads, kv_heads = pair.config.num_attention_heads, pair.config.num_key_value_heads
    checked = 0
    with open_artifact(artifact) as opened:
        for name, entry in opened.tensors.items():
            if entry.kind != "lowrank":
                continue
            base = names.get_name(name, try_suffixes=(".weight",))
            lora_a, lora_b = torch.from_numpy(tensors[f"{base}.lora_a"]), torch.from_numpy(tensors[f"{base}.lora_b"])
            rank = lora_b.shape[1]  # llama.cpp's rank: lora_b's ne[0]
            if base == "token_embd.weight":
                # looked up by token in lora_a [vocab, r], then times lora_b [dim, r] (llm_build_inp_embd)
                assert lora_a.shape == (entry.shape[0], rank) and lora_b.shape == (entry.shape[1], rank)
                added = (1.0 / rank) * lora_a @ lora_b.T
            else:
                assert lora_a.shape == (rank, entry.shape[1]) and lora_b.shape == (entry.shape[0], rank)
                added = (1.0 / rank) * lora_b @ lora_a  # llama.cpp: alpha / r
            B, A = opened.factors(name)
            expected = B @ A
            if name.endswith("q_proj.weight"):
                expected = expected[_llama_cpp_rows(entry.shape[0], heads)]
            elif name.endswith("k_proj.weight"):
                expected = expected[_llama_cpp_rows(entry.shape[0], kv_heads)]
            torch.testing.assert_close(added, expected, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == len(result["ranks"]) >= 2 * 7 + 2  # every block projection, the head and the embedding
    assert "token_embd.weight" in result["ranks"] and "output.weight" in result["ranks"]
    dropped = {item["name"]: item["what"] for item in result["dropped"]}
    assert set(dropped.values()) == {"norm"} and dropped["model.norm.weight"] == "norm"


def test_unsupported_architectures_and_bad_outputs_are_one_line(llama, tmp_path):
    root, pair, artifact = llama
    gpt2 = make_pair(tmp_path, "gpt2")
    gpt2_artifact = tmp_path / "gpt2-artifact"
    expect_ok(["compress", gpt2.trained_dir, "--init", gpt2.init_dir, "-o", gpt2_artifact, "--quiet"])
    out = tmp_path / "adapter.gguf"
    expect_error(["export-gguf", gpt2_artifact, "-o", out], says=("supports llama, mistral, qwen2, not 'gpt2'",),
                 output=out, inputs=(gpt2_artifact,))
    out.write_bytes(b"mine")
    expect_error(["export-gguf", artifact, "-o", out], says=("exists already", "--force"), output=out,
                 inputs=(artifact,))
    expect_ok(["export-gguf", artifact, "-o", out, "--force", "--dtype", "float16"])
    assert out.read_bytes()[:4] == b"GGUF"
    folder = tmp_path / "a-folder"
    folder.mkdir()
    expect_error(["export-gguf", artifact, "-o", folder, "--force"], says=("not a file",), inputs=(artifact, folder))
    expect_error(["export-gguf", artifact, "-o", artifact / "adapter.gguf"], says=("inside the input folder",),
                 inputs=(artifact,))
    assert json.loads((artifact / "config.json").read_text())["model_type"] == "llama"


def test_a_head_tied_to_the_embedding_leaves_the_embedding_out(tmp_path):
    """llama.cpp's output is token_embd itself when tied: no LoRA is written on it, and that is listed."""
    model = build_model(llama_config(tie_word_embeddings=True), seed=3)
    init = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    init["lm_head.weight"] = init["model.embed_tokens.weight"]
    save_hf(model, init, tmp_path / "init")
    save_hf(model, train_state(init, seed=4), tmp_path / "trained")
    artifact = tmp_path / "artifact"
    expect_ok(["compress", tmp_path / "trained", "--init", tmp_path / "init", "-o", artifact, "--quiet"])
    result = run_json(["export-gguf", artifact, "-o", tmp_path / "adapter.gguf", "--json"])
    assert "token_embd.weight" not in result["ranks"] and "output.weight" not in result["ranks"]
    assert len(result["ranks"]) == 2 * 7  # every block projection
    [embedding] = [item for item in result["dropped"] if item["what"] == "embedding"]
    assert embedding["name"] == "model.embed_tokens.weight" and "tied" in embedding["why"]
