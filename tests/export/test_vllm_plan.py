"""export/vllm_plan.py (``export-peft --target vllm``): LoRA on the modules vLLM adapts (projections;
the token embedding and the head for LLaMA), and what it drops. Its --data perplexities:
test_adapter_check.py; vLLM's own loader on these files: tests/serving/test_vllm_loader.py.

Real tiny LLaMA (Linear, RMSNorm, untied head) and GPT-2 (Conv1D, tied embeddings, biases) models,
loaded with real PEFT. vLLM's native GPT-2 implements no LoRA, so LLaMA is where the vLLM shape matters;
GPT-2 checks the Conv1D orientation, the biases and embeddings left out. The expected logits come from the base model with
the carried part of each update added by hand (an SVD oracle in float64 where the rank is cut).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from inrank_convert import PlanOptions, RankRule, compress, open_artifact, read_manifest
from inrank_convert.core.errors import UsageError
from inrank_convert.export.dense import decompress
from inrank_convert.export.peft_adapter import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, export_peft
from tests.conftest import make_pair, read_json
from tests.helpers.cli_contract import expect_error

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
ATOL = 1e-4
LLAMA_NORMS_AND_EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                              *(f"model.layers.{i}.{norm}.weight" for i in range(2)
                                for norm in ("input_layernorm", "post_attention_layernorm")))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def compressed(folder, pair, threshold=0.9):
    out = folder / "out"
    compress(pair.trained_dir, out, init=pair.init_dir, options=PlanOptions(rule=RankRule("energy-rest", threshold)))
    return out


def load_adapter(base_dir, adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out
        return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def adapter_keys(adapter_dir) -> set[str]:
    with safe_open(adapter_dir / ADAPTER_WEIGHTS_FILE, "pt") as handle:
        return set(handle.keys())


def carried_oracle(artifact_dir, base_dir, modules: list[str], cap: int) -> torch.Tensor:
    """Logits of the base with each module's update (W - W_ref, stored orientation) added, cut to its best
    rank-``cap`` approximation by a float64 SVD: what base + a vLLM adapter should compute."""
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    artifact = open_artifact(artifact_dir)
    try:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for module in modules:
                name = f"{module}.weight"
                delta = (artifact.reconstruct(name).double() - artifact.reference.get(name).double())
                U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
                params[name] += ((U[:, :cap] * S[:cap]) @ Vh[:cap]).float()
    finally:
        artifact.close()
    return logits(model)


def vllm_shape_checks(adapter_dir, base_dir, cap: int, layout: str) -> dict:
    """What vLLM needs of the files: LoRA A/B only, on ``layout`` modules (LLaMA: and its token
    embedding), ranks <= cap, r = alpha = max."""
    config = read_json(adapter_dir / ADAPTER_CONFIG_FILE)
    assert config["modules_to_save"] is None and config["bias"] == "none" and config["use_dora"] is False
    assert config["target_modules"] and config["trainable_token_indices"] is None
    keys = adapter_keys(adapter_dir)
    assert keys and all(key.endswith((".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B"))
                        for key in keys)
    assert not any("wte" in key or "wpe" in key for key in keys)  # GPT-2's embeddings: vLLM's GPT-2 takes no LoRA
    modules = dict(AutoModelForCausalLM.from_pretrained(base_dir).named_modules())
    assert all(type(modules[name]).__name__ in (layout, "Embedding") for name in config["target_modules"])
    with safe_open(adapter_dir / ADAPTER_WEIGHTS_FILE, "pt") as handle:
        ranks = [handle.get_tensor(key).shape[0] for key in keys if key.endswith(("lora_A.weight", "lora_embedding_A"))]
    assert max(ranks) <= cap and config["r"] == config["lora_alpha"] == max(ranks)
    assert sorted(config["rank_pattern"].values()) == sorted(ranks) and config["alpha_pattern"] == config["rank_pattern"]
    return config


def test_linear_only_changes_give_the_artifact_exactly(tmp_path):
    """Only the projections changed: the vLLM adapter drops nothing and base + adapter is the artifact."""
    pair = make_pair(tmp_path, "llama", unchanged=LLAMA_NORMS_AND_EMBEDDINGS)
    out = compressed(tmp_path, pair)
    result = export_peft(out, tmp_path / "adapter", target="vllm")
    assert result.dropped == [] and result.max_rank == 512
    config = vllm_shape_checks(tmp_path / "adapter", pair.init_dir, 512, "Linear")
    lowrank = {name.removesuffix(".weight"): e.rank for name, e in read_manifest(out).tensors.items()
               if e.kind == "lowrank"}
    assert set(config["target_modules"]) == set(lowrank)  # every projection, nothing else
    decompress(out, tmp_path / "dense")
    expected = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval())
    model = load_adapter(pair.init_dir, tmp_path / "adapter")
    assert torch.allclose(logits(model), expected, atol=ATOL)
    assert (logits(AutoModelForCausalLM.from_pretrained(pair.init_dir)) - expected).abs().max() > 100 * ATOL
    # The same LoRA tensors as the exact adapter's: only the config (r) differs.
    export_peft(out, tmp_path / "exact")
    with safe_open(tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE, "pt") as a, \
            safe_open(tmp_path / "exact" / ADAPTER_WEIGHTS_FILE, "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(key), b.get_tensor(key)) for key in a.keys())


def test_llama_drops_exactly_the_norms(llama, tmp_path):
    """vLLM's LLaMA takes LoRA on the projections, the token embedding and the head: only norms go."""
    pair, out, _ = llama
    result = export_peft(out, tmp_path / "adapter", target="vllm")
    dropped = {item.name: item for item in result.dropped}
    changed = {name for name in pair.trained_state if not torch.equal(pair.trained_state[name], pair.init_state[name])}
    matrices = {name for name in changed if pair.trained_state[name].ndim == 2}
    assert {"model.embed_tokens.weight", "lm_head.weight"} < matrices and dropped.keys() == changed - matrices
    assert {dropped[name].what for name in dropped} == {"norm"}
    for name, item in dropped.items():
        numel = pair.trained_state[name].numel()
        assert item.parameters == numel and item.bytes == 4 * numel and "vllm-project/vllm#" in item.why
    config = vllm_shape_checks(tmp_path / "adapter", pair.init_dir, 512, "Linear")
    modules = sorted(config["target_modules"])
    assert modules == sorted(name.removesuffix(".weight") for name in matrices)
    model = load_adapter(pair.init_dir, tmp_path / "adapter")
    assert torch.allclose(logits(model), carried_oracle(out, pair.init_dir, modules, 512), atol=ATOL)
    payload = result.to_json()
    assert payload["target"] == "vllm" and payload["max_lora_rank"] == 8  # ranks 3-4 serve at vLLM's 8
    assert [d["name"] for d in payload["dropped"]] == [item.name for item in result.dropped]


def test_rank_cap_truncates_with_an_svd(llama, tmp_path):
    """--max-rank 2 under the artifact's ranks 3-4: every projection becomes its best rank-2 fit, listed."""
    pair, out, _ = llama
    result = export_peft(out, tmp_path / "adapter", target="vllm", max_rank=2)
    config = vllm_shape_checks(tmp_path / "adapter", pair.init_dir, 2, "Linear")
    truncated = {item.modules[0]: item for item in result.dropped if item.what == "truncated"}
    assert set(truncated) == set(config["target_modules"]) and config["r"] == 2
    tensors = read_manifest(out).tensors
    artifact = open_artifact(out)
    try:
        for module, item in truncated.items():
            entry = tensors[f"{module}.weight"]
            assert item.rank == entry.rank > 2 and item.kept_rank == 2
            B, A = artifact.factors(f"{module}.weight")
            s = torch.linalg.svdvals((B @ A).double())
            assert item.energy_kept == pytest.approx(float((s[:2] ** 2).sum() / (s ** 2).sum()), rel=1e-5)
            assert item.parameters == (entry.rank - 2) * sum(entry.shape)
            assert "approximate" in item.why and f"{100 * item.energy_kept:.2f}%" in item.why
    finally:
        artifact.close()
    model = load_adapter(pair.init_dir, tmp_path / "adapter")
    assert torch.allclose(logits(model), carried_oracle(out, pair.init_dir, sorted(truncated), 2), atol=ATOL)


def test_dense_stored_projections_are_cut_at_the_cap(tmp_path):
    """threshold 1.0 stores every matrix dense: a full-rank update over the cap becomes its truncated SVD,
    one within the cap stays the exact full-rank LoRA."""
    pair = make_pair(tmp_path, "llama", unchanged=LLAMA_NORMS_AND_EMBEDDINGS)
    out = compressed(tmp_path, pair, threshold=1.0)
    result = export_peft(out, tmp_path / "adapter", target="vllm", max_rank=32)
    assert {e.kind for e in read_manifest(out).tensors.values() if e.kind != "zero"} == {"dense"}
    assert {item.what for item in result.dropped} == {"truncated"}
    truncated = {item.modules[0] for item in result.dropped}
    # q, o, gate, up, down have min(shape) 64 > 32; k and v ([32, 64]) fit and stay exact full-rank LoRAs.
    assert truncated == {t.module for t in result.targets if min(t.shape) > 32}
    assert truncated == {t.module for t in result.targets if t.truncated_from == 64}
    exact = {t.module for t in result.targets if t.full_rank and t.truncated_from is None}
    assert exact and all(module.endswith(("k_proj", "v_proj")) for module in exact)
    config = vllm_shape_checks(tmp_path / "adapter", pair.init_dir, 32, "Linear")
    model = load_adapter(pair.init_dir, tmp_path / "adapter")
    assert torch.allclose(logits(model), carried_oracle(out, pair.init_dir, config["target_modules"], 32), atol=ATOL)


def test_gpt2_keeps_the_conv1d_projections_and_drops_biases(tmp_path):
    pair = make_pair(tmp_path, "gpt2")
    out = compressed(tmp_path, pair)
    result = export_peft(out, tmp_path / "adapter", target="vllm")
    dropped = {item.name: item.what for item in result.dropped}
    biases = {name for name in pair.trained_state if name.endswith(".bias") and ".ln_" not in name and "ln_f" not in name}
    assert biases and all(dropped[name] == "bias" for name in biases)
    assert dropped["transformer.wte.weight"] == "embedding" and dropped["transformer.wpe.weight"] == "embedding"
    wte = next(item for item in result.dropped if item.name == "transformer.wte.weight")
    assert wte.modules == ["transformer.wte", "lm_head"]  # the tied head goes with it
    assert {name for name, what in dropped.items() if what == "norm"} == {n for n in pair.trained_state if "ln_" in n}
    assert "lm_head.weight" not in dropped  # an alias of wte, listed there
    assert any("GPT2LMHeadModel" in note for note in result.notes)
    config = vllm_shape_checks(tmp_path / "adapter", pair.init_dir, 512, "Conv1D")
    assert config["fan_in_fan_out"] is True
    modules = config["target_modules"]
    assert sorted(modules) == sorted(n.removesuffix(".weight") for n in pair.trained_state
                                     if n.startswith("transformer.h.") and n.endswith(".weight") and ".ln_" not in n)
    model = load_adapter(pair.init_dir, tmp_path / "adapter")
    assert torch.allclose(logits(model), carried_oracle(out, pair.init_dir, modules, 512), atol=ATOL)


def test_default_export_is_unchanged_by_the_option(llama, tmp_path):
    """--target peft (the default): norms saved whole, low-rank embeddings as LoRA."""
    pair, out, _ = llama
    result = export_peft(out, tmp_path / "adapter", target="peft")
    assert result.dropped == [] and result.to_json()["target"] == "peft"
    config = read_json(tmp_path / "adapter" / ADAPTER_CONFIG_FILE)
    assert {"lm_head", "model.embed_tokens"} <= set(config["target_modules"]) and config["modules_to_save"]


def test_bad_inputs(llama, tokenizer_and_text, tmp_path):
    pair, out, folder = llama
    tokenizer, text = tokenizer_and_text
    output = tmp_path / "adapter"
    inputs = (out, pair.init_dir)
    expect_error(["export-peft", out, "-o", output, "--target", "tgi"], says=("unknown export target", "tgi", "vllm"),
                 output=output, inputs=inputs)
    expect_error(["export-peft", out, "-o", output, "--data", tmp_path / "missing.txt", "--tokenizer", tokenizer],
                 says=("no such text file", "missing.txt"), output=output, inputs=inputs)
    for rank in ("0", "1000"):
        expect_error(["export-peft", out, "-o", output, "--target", "vllm", "--max-rank", rank],
                     says=("--max-rank", "512"), output=output, inputs=inputs)
    expect_error(["export-peft", out, "-o", output, "--max-rank", "8"], says=("--max-rank", "--target vllm"),
                 output=output, inputs=inputs)
    expect_error(["export-peft", out, "-o", output, "--max-tokens", "10"], says=("--max-tokens", "--data"),
                 output=output, inputs=inputs)
    expect_error(["export-peft", out, "-o", output, "--data", text, "--tokenizer", tokenizer, "--max-tokens", "10"],
                 says=("10 tokens", "64-token window"), output=output, inputs=inputs)
    expect_error(["export-peft", out, "-o", output, "--data", text], says=("tokenizer",), output=output, inputs=inputs)
    with pytest.raises(UsageError, match="target"):
        export_peft(out, output, target="VLLM")

    # Only norms changed: nothing for vLLM to carry.
    names = tuple(n for n in pair.trained_state if "norm" not in n)
    norms_only = make_pair(tmp_path, "llama", unchanged=names)
    norms_out = compressed(tmp_path, norms_only)
    expect_error(["export-peft", norms_out, "-o", output, "--target", "vllm"],
                 says=("module vLLM adapts", "--target peft"), output=output, inputs=(norms_out,))


