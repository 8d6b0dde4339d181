"""Every common decoder architecture end to end through the real CLI: compress -> report -> generate ->
decompress -> export-peft, on tiny models built from their configs.

"Trained" = init + an exactly rank-4 update on every matrix (no noise) + small shifts on every vector,
so ``compress --rank 4 --dtype float32`` is lossless: every model the commands give back must compute
the trained model's logits, to float32 rounding.

- GPT-NeoX: transformers 5 builds the head as ``lm_head`` but saves it as ``embed_out.weight``; every
  command maps saved names with transformers' own checkpoint conversion mapping.
- OPT: the learned position embedding (offset 2, called with the attention mask) cannot take PEFT's
  LoRA embedding: export-peft saves it whole (modules_to_save).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from inrank_convert import read_manifest
from inrank_convert.inputs.text import load_tokenizer, read_text_tokens
from inrank_convert.runtime.evaluate import generate_text, perplexity
from inrank_convert.runtime.modeling import load_compressed
from tests.conftest import RIVER_TEXT, build_model, gpt2_config, llama_config, save_hf, train_state
from tests.helpers.cli_contract import expect_error, expect_ok

peft = pytest.importorskip("peft")

VOCAB = 320
CONTEXT = 32
PROMPT = "the river"
NEW_TOKENS = 8
TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
# float32 throughout: W_ref + B @ A (merged, or as a LoRA beside the base) against the trained W.
CLOSE = {"rtol": 1e-4, "atol": 1e-5}


def mistral_config():
    from transformers import MistralConfig

    return MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, sliding_window=16,
                         bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)


def qwen2_config():
    from transformers import Qwen2Config

    # q/k/v projections carry biases; the head is tied to the token embedding.
    return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
                       eos_token_id=0, tie_word_embeddings=True)


def phi3_config():
    from transformers import Phi3Config

    # Fused qkv_proj [3 * 64, 64] and gate_up_proj [2 * 128, 64].
    return Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                      original_max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def gpt_neox_config():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)


def mixtral_config():
    from transformers import MixtralConfig

    # transformers 5 stacks the experts into one tensor per layer on load (experts.gate_up_proj
    # [2, 2 * 64, 32]) from the per-expert w1/w2/w3 weights it saves.
    return MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, num_local_experts=2,
                         num_experts_per_tok=1, bos_token_id=0, eos_token_id=0)


def opt_config():
    from transformers import OPTConfig

    # embed_positions: OPTLearnedPositionalEmbedding, [64 + 2, 64] (positions are offset by 2).
    return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                     max_position_embeddings=64, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0,
                     pad_token_id=1)


ARCHITECTURES = {
    "gpt2": gpt2_config, "llama": llama_config, "mistral": mistral_config, "qwen2": qwen2_config,
    "phi3": phi3_config, "gpt_neox": gpt_neox_config, "opt": opt_config,
}
UNSUPPORTED = {"mixtral": mixtral_config}  # fused on load: decompress only


def tied_clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of a state dict in which tensors that share storage (a tied head) still share it."""
    copies: dict[int, torch.Tensor] = {}
    return {name: copies.setdefault(tensor.untyped_storage().data_ptr(), tensor.detach().clone())
            for name, tensor in state.items()}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def pretrained(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def make_models(arch: str, folder: Path) -> tuple[Path, Path]:
    """The init and the trained model of ``arch`` as Hugging Face folders (saved by transformers itself)."""
    model = build_model((ARCHITECTURES | UNSUPPORTED)[arch](), seed=7)
    init_state = tied_clone(model.state_dict())
    trained_state = train_state(init_state, noise=0.0)
    return save_hf(model, init_state, folder / "init"), save_hf(model, trained_state, folder / "trained")


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_end_to_end(arch, tmp_path, tokenizer_file):
    init, trained = make_models(arch, tmp_path)
    (trained / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    expected = logits(pretrained(trained))
    base = logits(pretrained(init))
    assert (expected - base).abs().max() > 1e-2  # the planted updates change the output

    # compress: the planted rank, in float32: lossless.
    artifact = tmp_path / "artifact"
    expect_ok(["compress", trained, "--init", init, "-o", artifact, "--rank", "4", "--dtype", "float32", "--quiet"])
    entries = read_manifest(artifact).tensors
    ranks = {entry.rank for entry in entries.values() if entry.kind == "lowrank"}
    assert ranks == {4}, {name: (entry.kind, entry.rank) for name, entry in entries.items()}
    torch.testing.assert_close(logits(load_compressed(artifact)), expected, **CLOSE)

    # report: the recorded original (loaded dense) and the artifact score as the trained model does.
    text = tmp_path / "text.txt"
    text.write_text(RIVER_TEXT)
    report = json.loads(expect_ok(["report", artifact, "--data", text, "--context", CONTEXT, "--max-tokens", 8 * CONTEXT,
                                   "--json", "--quiet"]).stdout)
    tokens = read_text_tokens(text, load_tokenizer(artifact), max_tokens=8 * CONTEXT)
    reference = perplexity(pretrained(trained), tokens, CONTEXT).perplexity
    assert math.isclose(report["perplexity"]["original"], reference, rel_tol=1e-5)
    assert math.isclose(report["perplexity"]["compressed"], reference, rel_tol=1e-4)

    # generate: greedy, the trained model's own continuation.
    generated = json.loads(expect_ok(["generate", artifact, "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS,
                                      "--temperature", "0", "--json"]).stdout)
    own = generate_text(pretrained(trained), load_tokenizer(trained), PROMPT, NEW_TOKENS, temperature=0.0)
    assert own.new_tokens >= 1
    assert generated["new_tokens"] == own.new_tokens and generated["completion"] == own.completion

    # decompress: from_pretrained loads the folder and computes the artifact's logits.
    dense = tmp_path / "dense"
    expect_ok(["decompress", artifact, "-o", dense, "--quiet"])
    torch.testing.assert_close(logits(pretrained(dense)), expected, **CLOSE)

    # export-peft: PeftModel over the init computes them too.
    adapter = tmp_path / "adapter"
    result = json.loads(expect_ok(["export-peft", artifact, "-o", adapter, "--json"]).stdout)
    assert result["target_modules"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and tied embeddings
        peft_model = peft.PeftModel.from_pretrained(pretrained(init), adapter).eval()
        torch.testing.assert_close(logits(peft_model), expected, **CLOSE)
    if arch == "qwen2":  # q/k/v biases travel in the adapter; the tied head is saved once, LoRA on both modules
        assert "model.layers.0.self_attn.q_proj.bias" in entries and "lm_head.weight" not in entries
        assert any(key.endswith("q_proj.base_layer.bias") for key in result["biases"])
        assert {"model.embed_tokens", "lm_head"} <= set(result["target_modules"])
    if arch == "phi3":  # the fused projections are ordinary Linear targets
        assert {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"} <= set(result["target_modules"])
    if arch == "gpt_neox":  # the head, saved as embed_out.weight, is the module lm_head
        assert "embed_out.weight" in entries and "lm_head" in result["target_modules"]
    if arch == "opt":  # the learned positions go whole, and the result says why
        positions = "model.decoder.embed_positions"
        assert positions in result["modules_to_save"] and positions not in result["target_modules"]
        carried = {item["name"]: item for item in result["carried_in_full"]}
        assert carried[f"{positions}.weight"]["modules"] == [positions]

    # export-peft --target vllm: LoRA only (no modules_to_save, no biases; embeddings and the head only
    # where vLLM's model class takes them: LLaMA, not the others); it loads and runs, and what it leaves
    # out (every vector changed here, and the other architectures' embeddings) is listed.
    served = tmp_path / "vllm"
    vllm = json.loads(expect_ok(["export-peft", artifact, "-o", served, "--target", "vllm", "--json"]).stdout)
    config = json.loads((served / "adapter_config.json").read_text())
    assert not config.get("modules_to_save") and config["bias"] == "none" and config["target_modules"]
    embeddings = [module for module in config["target_modules"] if "embed" in module or module.endswith("lm_head")]
    assert bool(embeddings) == (arch == "llama"), embeddings
    assert vllm["dropped"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        served_model = peft.PeftModel.from_pretrained(pretrained(init), served).eval()
        served_logits = logits(served_model)
    assert torch.isfinite(served_logits).all() and (served_logits - base).abs().max() > 1e-3


def test_gpt_neox_head_saved_as_embed_out_is_an_embedding(tmp_path):
    """--no-embeddings keeps GPT-NeoX's head dense: it is the module lm_head, saved as embed_out.weight."""
    init, trained = make_models("gpt_neox", tmp_path)
    plan = json.loads(expect_ok(["compress", trained, "--init", init, "--no-embeddings", "--dry-run", "--json"]).stdout)
    actions = {item["name"]: item["action"] for item in plan["layers"]}
    assert actions["embed_out.weight"] == actions["gpt_neox.embed_in.weight"] == "dense"
    assert actions["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"] != "dense"


def test_fused_on_load_mixtral_is_refused_but_decompresses(tmp_path, tokenizer_file):
    """Mixtral's experts are saved one by one and stacked by transformers when it loads them: no module
    holds a saved expert weight alone, so running from the artifact and a PEFT adapter are refused in
    one line that says so (not blaming config.json); decompress still gives what from_pretrained loads."""
    init, trained = make_models("mixtral", tmp_path)
    (trained / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    artifact = tmp_path / "artifact"
    # The stacked experts got a dense (3-D) shift, so their saved slices are full rank: threshold 1 (lossless).
    expect_ok(["compress", trained, "--init", init, "-o", artifact, "--threshold", "1.0", "--quiet"])
    assert any(".experts.0.w1.weight" in name for name in read_manifest(artifact).tensors)
    line = expect_error(["generate", artifact, "--prompt", PROMPT, "--max-new-tokens", "4"],
                        ("fuses or splits", "decompress"), inputs=(artifact,))
    assert "config.json" not in line
    expect_error(["export-peft", artifact, "-o", tmp_path / "adapter"], ("fuses or splits", "decompress"),
                 output=tmp_path / "adapter", inputs=(artifact,))
    expect_ok(["decompress", artifact, "-o", tmp_path / "dense", "--quiet"])
    torch.testing.assert_close(logits(pretrained(tmp_path / "dense")), logits(pretrained(trained)), **CLOSE)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "mixtral"])
def test_init_seed_regenerates_the_saved_names(arch, tmp_path):
    """``--init-seed`` regenerates the init under the names transformers saves (GPT-NeoX's head as
    embed_out.weight, Mixtral's experts one by one), so a transformers-saved model compresses against
    its seed alone (both were refused before: the regenerated init had the modules' names), and what
    is read back is the trained model."""
    init, trained = make_models(arch, tmp_path)
    artifact = tmp_path / "artifact"
    # Mixtral's experts are one 3-D tensor per layer in the state dict train_state changes: not rank 4.
    rule = ["--threshold", "1.0"] if arch == "mixtral" else ["--rank", "4", "--dtype", "float32"]
    expect_ok(["compress", trained, "--init-seed", "7", "-o", artifact, *rule, "--quiet"])
    manifest = read_manifest(artifact)
    assert manifest.reference.mode == "seed" and not (artifact / "init.safetensors").exists()
    if arch == "mixtral":  # runs only through decompress (fused on load)
        dense = tmp_path / "dense"
        expect_ok(["decompress", artifact, "-o", dense, "--quiet"])
        torch.testing.assert_close(logits(pretrained(dense)), logits(pretrained(trained)), **CLOSE)
    else:
        torch.testing.assert_close(logits(load_compressed(artifact)), logits(pretrained(trained)), **CLOSE)
    expect_ok(["compress", trained, "--init-seed", "7", "--init", init, "-o", tmp_path / "checked", "--quiet"])
