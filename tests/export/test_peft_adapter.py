"""export/peft_adapter.py (``export-peft``): PeftModel.from_pretrained(reference, adapter) computes the
compressed model, a grown vocabulary's and a drifted embedding's rows included.

Real tiny GPT-2 (Conv1D, tied embeddings, biases, LayerNorms) and LLaMA (Linear, RMSNorm) models;
the expected logits come from ``decompress`` + ``from_pretrained``, which is tested elsewhere.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from inrank_convert import PlanOptions, RankRule, compress, load_compressed, open_artifact, read_manifest
from inrank_convert.cli import app
from inrank_convert.core.errors import ArtifactError, OutputError, UsageError
from inrank_convert.export.dense import decompress
from inrank_convert.export.peft_adapter import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, export_peft
from tests.conftest import build_model, gpt2_config, make_pair, read_json
from tests.helpers import rows
from tests.helpers.cli_contract import run_json

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
ATOL = 1e-4


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def compressed(folder, pair, threshold=0.9, **kwargs):
    out = folder / "out"
    kwargs = {"init": pair.init_dir, "options": PlanOptions(rule=RankRule("energy-rest", threshold))} | kwargs
    compress(pair.trained_dir, out, **kwargs)
    return out


def dense_logits(artifact, folder) -> torch.Tensor:
    decompress(artifact, folder / "dense", force=True)
    return logits(AutoModelForCausalLM.from_pretrained(folder / "dense").eval())


def load_adapter(base_dir, adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and tied embeddings
        return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def adapter_keys(adapter_dir) -> set[str]:
    with safe_open(adapter_dir / ADAPTER_WEIGHTS_FILE, "pt") as handle:
        return set(handle.keys())


def module_of(name: str) -> str:
    return name.rpartition(".")[0]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A GPT-2 pair compressed at energy 0.9, its adapter and the expected logits (shared: slow to build)."""
    folder = tmp_path_factory.mktemp("gpt2")
    pair = make_pair(folder, "gpt2")
    out = compressed(folder, pair)
    result = export_peft(out, folder / "adapter")
    return pair, out, result, folder / "adapter", dense_logits(out, folder)


def test_gpt2_adapter_equals_the_compressed_model(gpt2):
    pair, out, result, adapter, expected = gpt2
    model = load_adapter(pair.init_dir, adapter)
    assert torch.allclose(logits(model), expected, atol=ATOL)
    base = logits(AutoModelForCausalLM.from_pretrained(pair.init_dir).eval())
    assert (base - expected).abs().max() > 100 * ATOL  # the adapter really does something
    # The same adapter through transformers' own loader (base_model_name_or_path is the init) and after
    # a PEFT re-save: every key is one PEFT itself writes.
    assert not (adapter / "config.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = AutoModelForCausalLM.from_pretrained(adapter).eval()
        model.save_pretrained(adapter.parent / "resaved")
    assert torch.allclose(logits(native), expected, atol=ATOL)
    assert torch.allclose(logits(load_adapter(pair.init_dir, adapter.parent / "resaved")), expected, atol=ATOL)

    manifest = read_manifest(out).tensors
    lowrank = {module_of(n): e.rank for n, e in manifest.items() if e.kind == "lowrank"}
    config = read_json(adapter / ADAPTER_CONFIG_FILE)
    # Exactly the factorized modules, plus lm_head: it shares wte's weight, so it needs wte's update too.
    assert set(config["target_modules"]) == set(lowrank) | {"lm_head"}
    assert result.to_json()["ranks"] == lowrank | {"lm_head": lowrank["transformer.wte"]}
    assert config["rank_pattern"] == config["alpha_pattern"]  # scaling alpha / r = 1 for every module
    assert sorted(config["rank_pattern"].values()) == sorted(result.to_json()["ranks"].values())
    assert config["fan_in_fan_out"] is True and config["bias"] == "all"
    assert set(config["modules_to_save"]) == {module_of(n) for n in manifest if ".ln_" in n}
    assert any("merge_and_unload" in note for note in result.notes)  # the tie is explained

    # The keys PeftModel.save_pretrained writes, in its orientation for each module type.
    keys = adapter_keys(adapter)
    assert {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
            "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias",
            "base_model.model.transformer.wte.lora_embedding_A", "base_model.model.lm_head.lora_B.weight",
            "base_model.model.transformer.h.0.ln_1.weight"} <= keys
    with safe_open(adapter / ADAPTER_WEIGHTS_FILE, "pt") as handle:
        rank = lowrank["transformer.h.0.mlp.c_fc"]  # Conv1D weight [in 64, out 256]
        assert handle.get_tensor("base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight").shape == (rank, 64)
        assert handle.get_tensor("base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight").shape == (256, rank)
        assert handle.get_tensor("base_model.model.transformer.wte.lora_embedding_A").shape[1] == 320


def test_each_module_gets_exactly_its_update(gpt2):
    """Conv1D, Embedding and the tied Linear head: PEFT's delta equals B @ A in the stored orientation."""
    pair, out, _, adapter, _ = gpt2
    model = load_adapter(pair.init_dir, adapter)
    artifact = open_artifact(out)
    try:
        modules = dict(model.base_model.model.named_modules())
        for module, name in [("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_attn.weight"),
                             ("transformer.h.1.mlp.c_proj", "transformer.h.1.mlp.c_proj.weight"),
                             ("transformer.wte", "transformer.wte.weight"), ("lm_head", "transformer.wte.weight")]:
            B, A = artifact.factors(name)
            delta = modules[module].get_delta_weight("default")
            assert torch.allclose(delta, B @ A, atol=1e-6), module
    finally:
        artifact.close()


def test_biases_and_norms_are_applied(gpt2):
    """Without what bias="all" and modules_to_save load, the logits are wrong: PEFT really applies them."""
    pair, _, _, adapter, expected = gpt2
    model = load_adapter(pair.init_dir, adapter)
    init = pair.init_state
    trained = pair.trained_state
    inner = model.base_model.model
    c_attn_bias = inner.transformer.h[0].attn.c_attn.base_layer.bias  # LoRA module: bias on its base layer
    assert torch.equal(c_attn_bias, trained["transformer.h.0.attn.c_attn.bias"])
    assert torch.equal(inner.transformer.h[1].mlp.c_proj.base_layer.bias, trained["transformer.h.1.mlp.c_proj.bias"])
    ln = inner.transformer.h[0].ln_1  # ModulesToSaveWrapper: the active copy holds the trained values
    assert torch.equal(ln.modules_to_save["default"].weight, trained["transformer.h.0.ln_1.weight"])
    assert torch.equal(ln.original_module.weight, init["transformer.h.0.ln_1.weight"])

    with torch.no_grad():
        for name, param in inner.named_parameters():
            if name.endswith("base_layer.bias"):
                param.copy_(init[name.replace("base_layer.", "")])
    assert (logits(model) - expected).abs().max() > 100 * ATOL
    model = load_adapter(pair.init_dir, adapter)
    with torch.no_grad():
        for module in model.base_model.model.modules():
            if isinstance(module, peft.utils.ModulesToSaveWrapper):
                module.modules_to_save["default"].load_state_dict(module.original_module.state_dict())
    assert (logits(model) - expected).abs().max() > 100 * ATOL


def test_bias_only_change(tmp_path):
    """Every matrix unchanged: LoRA on none of them (a rank-1 zero anchor), biases and norms still applied."""
    names = tuple(n for n, t in build_model(gpt2_config(), 0).state_dict().items() if t.ndim == 2)
    pair = make_pair(tmp_path, "gpt2", unchanged=names)
    out = compressed(tmp_path, pair)
    assert {e.kind for n, e in read_manifest(out).tensors.items() if n in names} == {"zero"}
    result = export_peft(out, tmp_path / "adapter")
    [anchor] = result.targets
    assert anchor.placeholder and anchor.rank == 1 and any("zero LoRA" in note for note in result.notes)
    expected = dense_logits(out, tmp_path)
    assert torch.allclose(logits(load_adapter(pair.init_dir, tmp_path / "adapter")), expected, atol=ATOL)
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(pair.init_dir)), expected, atol=ATOL)


def test_llama_with_an_unchanged_layer(tmp_path):
    unchanged = "model.layers.0.self_attn.q_proj.weight"
    pair = make_pair(tmp_path, "llama", unchanged=(unchanged,))
    out = compressed(tmp_path, pair)
    assert read_manifest(out).tensors[unchanged].kind == "zero"
    result = export_peft(out, tmp_path / "adapter")
    config = read_json(tmp_path / "adapter" / ADAPTER_CONFIG_FILE)
    assert module_of(unchanged) not in config["target_modules"] and module_of(unchanged) in result.unchanged
    assert {"lm_head", "model.embed_tokens", "model.layers.1.self_attn.q_proj"} <= set(config["target_modules"])
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False
    assert set(config["modules_to_save"]) == {module_of(n) for n in pair.trained_state if "norm" in n}
    assert not result.notes  # LLaMA here has an untied head
    model = load_adapter(pair.init_dir, tmp_path / "adapter")
    assert torch.allclose(logits(model), dense_logits(out, tmp_path), atol=ATOL)
    merged = model.merge_and_unload()  # untied: merging is exact too
    assert torch.allclose(logits(merged), dense_logits(out, tmp_path), atol=ATOL)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_mixed_precision_artifact_exports_the_model_every_reader_sees(tmp_path, arch):
    """Bands of 8, 4, 3 and 2 bits: the adapter, the artifact and its decompressed folder agree."""
    pair = make_pair(tmp_path, arch)
    out = compressed(tmp_path, pair, options=PlanOptions(quantize="mixed", target_ratio=0.3))
    widths = {bits for entry in read_manifest(out).tensors.values() if entry.bands for bits, _ in entry.bands}
    assert len(widths) >= 2, widths
    expected = dense_logits(out, tmp_path)
    assert torch.allclose(logits(load_compressed(out)), expected, atol=ATOL)
    export_peft(out, tmp_path / "adapter")
    assert torch.allclose(logits(load_adapter(pair.init_dir, tmp_path / "adapter")), expected, atol=ATOL)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dense_stored_layers_become_exact_full_rank_lora(tmp_path, arch):
    pair = make_pair(tmp_path, arch)
    out = compressed(tmp_path, pair, threshold=1.0)
    kinds = {e.kind for e in read_manifest(out).tensors.values() if len(e.shape) == 2}
    assert kinds == {"dense"}
    result = export_peft(out, tmp_path / "adapter")
    assert result.targets and all(t.full_rank and t.rank == min(t.shape) for t in result.targets)
    model = load_adapter(pair.init_dir, tmp_path / "adapter")
    assert torch.allclose(logits(model), dense_logits(out, tmp_path), atol=ATOL)


def test_seed_reference_with_reference_only_base(tmp_path):
    """A from-scratch run: the base model comes from decompress --reference-only (regenerated from the seed)."""
    pair = make_pair(tmp_path, "llama")
    out = compressed(tmp_path, pair, init=None, init_seed=pair.init_seed)
    result = export_peft(out, tmp_path / "adapter")
    assert "--reference-only" in result.base
    assert read_json(tmp_path / "adapter" / ADAPTER_CONFIG_FILE)["base_model_name_or_path"] is None
    decompress(out, tmp_path / "base", reference_only=True)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    assert all(torch.equal(base[name], tensor) for name, tensor in pair.init_state.items())
    model = load_adapter(tmp_path / "base", tmp_path / "adapter")
    assert torch.allclose(logits(model), dense_logits(out, tmp_path), atol=ATOL)


def test_embedded_init_with_a_dense_tied_embedding(tmp_path):
    """An embedded init lacks the init of dense-stored tensors: the adapter carries those whole."""
    pair = make_pair(tmp_path, "gpt2")
    out = compressed(tmp_path, pair, embed_init=True, options=PlanOptions(
        rule=RankRule("energy-rest", 0.9), exclude=("transformer.wte.weight", "transformer.h.0.attn.c_proj.weight")))
    tensors = read_manifest(out).tensors
    assert tensors["transformer.wte.weight"].kind == "dense"
    result = export_peft(out, tmp_path / "adapter")
    # The tied head goes with the embedding, so both uses of the tensor get the trained value.
    assert {"transformer.wte", "lm_head", "transformer.h.0.attn.c_proj"} <= set(result.modules_to_save)
    decompress(out, tmp_path / "base", reference_only=True)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    assert torch.equal(base["transformer.h.0.mlp.c_fc.weight"], pair.init_state["transformer.h.0.mlp.c_fc.weight"])
    assert torch.equal(base["transformer.wte.weight"], pair.trained_state["transformer.wte.weight"])  # no init kept
    expected = dense_logits(out, tmp_path)
    for base_dir in (tmp_path / "base", pair.init_dir):  # the adapter does not depend on what base holds there
        assert torch.allclose(logits(load_adapter(base_dir, tmp_path / "adapter")), expected, atol=ATOL)


def run(*args, ok: bool = True):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def test_cli_export_peft_and_reference_only(tmp_path, gpt2):
    pair, out, _, _, expected = gpt2
    payload = json.loads(run("export-peft", out, "-o", tmp_path / "adapter", "--json").stdout)
    assert payload["output"] == str(tmp_path / "adapter") and payload["base"] == str(pair.init_dir.resolve())
    assert set(payload) >= {"target_modules", "ranks", "full_rank", "modules_to_save", "biases", "bytes", "notes"}
    assert payload["bytes"] == (tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE).stat().st_size
    base = json.loads(run("decompress", out, "--reference-only", "-o", tmp_path / "base", "--json").stdout)
    assert base["tensors"] == len(read_manifest(out).tensors)
    assert torch.allclose(logits(load_adapter(tmp_path / "base", tmp_path / "adapter")), expected, atol=ATOL)
    text = run("export-peft", out, "-o", tmp_path / "adapter2")
    assert "LoRA adapter" in text.stdout and "warning:" in text.stderr  # the tied-embedding note
    assert "Example: inrank-convert export-peft gpt2-inrank -o gpt2-adapter" in run("export-peft", "--help").stdout


def test_bad_inputs_give_one_line(tmp_path, gpt2):
    pair, out, _, adapter, _ = gpt2
    zero = compressed(tmp_path, pair, init=None, no_init=True)
    for args in (("export-peft", zero, "-o", tmp_path / "a"), ("decompress", zero, "--reference-only", "-o", tmp_path / "b")):
        result = run(*args, ok=False)
        assert result.exit_code == 2 and "zero" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(UsageError, match="decompress"):
        export_peft(zero, tmp_path / "a")

    before = sorted(p.name for p in adapter.iterdir())
    result = run("export-peft", out, "-o", adapter, ok=False)
    assert result.exit_code == 2 and "--force" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in adapter.iterdir()) == before
    with pytest.raises(OutputError, match="overwrite an input"):
        export_peft(out, out, force=True)

    missing = run("export-peft", tmp_path / "nope", "-o", tmp_path / "c", ok=False)
    assert missing.exit_code == 2 and "no such artifact" in missing.stderr
    no_config = tmp_path / "no-config"
    shutil.copytree(out, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(ArtifactError, match="config.json"):
        export_peft(no_config, tmp_path / "d")
    assert not list(tmp_path.glob(".inrank-tmp-*"))


# --------------------------------------------------------------------------- rows (helpers/rows.py)


def test_grown_vocabulary_exports_a_peft_adapter_over_the_resized_base(grown, tmp_path):
    pair, out = grown
    payload = run_json(["export-peft", out, "-o", tmp_path / "adapter", "--json"])
    carried = {item["name"]: item for item in payload["carried_in_full"]}
    assert set(carried) == set(pair.grown)
    for item in carried.values():
        assert item["how"] == "modules_to_save" and "grown vocabulary" in item["why"], item
        assert f"resize_token_embeddings({rows.VOCAB + rows.GROWN})" in item["why"]
        assert item["bytes"] == len(item["modules"]) * (rows.VOCAB + rows.GROWN) * 64 * 4
        assert any(item["why"] == note for note in payload["notes"])
    assert payload["resize_token_embeddings"] == rows.VOCAB + rows.GROWN
    saved = {"lm_head", "transformer.wte"} if pair.arch == "gpt2" else {"lm_head", "model.embed_tokens"}
    assert saved <= set(payload["modules_to_save"])
    assert not saved & set(payload["target_modules"])

    base = AutoModelForCausalLM.from_pretrained(pair.base_dir)
    base.resize_token_embeddings(rows.VOCAB + rows.GROWN)
    model = rows.load_adapter(base, tmp_path / "adapter")
    expected = rows.logits(load_compressed(out))
    assert torch.allclose(rows.logits(model), expected, atol=ATOL)
    # Without the trained modules the new tokens are wrong: the saved copies really are used.
    plain = AutoModelForCausalLM.from_pretrained(pair.base_dir)
    plain.resize_token_embeddings(rows.VOCAB + rows.GROWN)
    assert (rows.logits(plain) - expected).abs().max() > 100 * ATOL


def test_export_peft_carries_drifted_rows_as_trainable_tokens(drifted, tmp_path):
    """A tied GPT-2 embedding whose rank-1 drift moves every row: every row is a trainable token
    (exact, smaller than a full-rank LoRA on the embedding and on the head), the head follows."""
    init_dir, _, out, _ = drifted
    payload = run_json(["export-peft", out, "-o", tmp_path / "adapter", "--json"])
    assert payload["trainable_tokens"] == {"transformer.wte": {"name": rows.WTE, "rows": rows.VOCAB,
                                                               "bytes": rows.VOCAB * 64 * 4}}
    assert not [item for item in payload["carried_in_full"] if item["name"] == rows.WTE]
    assert not {"lm_head", "transformer.wte"} & set(payload["target_modules"])
    assert any("trainable tokens" in note for note in payload["notes"])
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert config["trainable_token_indices"] == {"transformer.wte": list(range(rows.VOCAB))}

    model = rows.load_adapter(AutoModelForCausalLM.from_pretrained(init_dir), tmp_path / "adapter")
    expected = rows.logits(load_compressed(out), rows.OLD_TOKENS)
    assert torch.allclose(rows.logits(model, rows.OLD_TOKENS), expected, atol=ATOL)
    # The rows are the artifact's own values (B @ A and the rows, int8 scales applied), bit for bit,
    # and merging writes them once into the tied tensor (a LoRA on both would add the update twice).
    artifact = open_artifact(out)
    try:
        weight = artifact.reconstruct(rows.WTE)
        B, A = artifact.factors(rows.WTE)
        update = weight.float() - artifact.reference.get(rows.WTE).float()
        assert (update - B @ A).abs().max() > 1e-3  # the rows matter: a LoRA of B @ A alone would miss them
    finally:
        artifact.close()
    with safe_open(tmp_path / "adapter" / ADAPTER_WEIGHTS_FILE, "pt") as saved:
        assert torch.equal(saved.get_tensor("base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"),
                           weight)
    merged = model.merge_and_unload()
    assert torch.equal(merged.get_input_embeddings().weight, weight)
    assert merged.lm_head.weight is merged.get_input_embeddings().weight
    assert torch.allclose(rows.logits(merged, rows.OLD_TOKENS), expected, atol=ATOL)


def test_export_peft_carries_seen_rows_as_trainable_tokens(tmp_path):
    """An untied LLaMA embedding moved on the rows a fine-tune saw: those rows only, the others
    exactly the base's; the vllm target carries the same change as an embedding LoRA instead."""
    init_dir, trained_dir, seen = rows.seen_rows_llama(tmp_path)
    out = tmp_path / "out"
    compress(trained_dir, out, init=init_dir)
    artifact = open_artifact(out)
    try:
        assert artifact.tensors[rows.EMBED].kind == "lowrank+rows"
        weight = artifact.reconstruct(rows.EMBED)
    finally:
        artifact.close()
    payload = run_json(["export-peft", out, "-o", tmp_path / "adapter", "--json"])
    assert payload["trainable_tokens"]["model.embed_tokens"]["rows"] == len(seen)
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert config["trainable_token_indices"] == {"model.embed_tokens": seen.tolist()}
    base = AutoModelForCausalLM.from_pretrained(init_dir)
    untouched = base.get_input_embeddings().weight.detach().clone()
    model = rows.load_adapter(base, tmp_path / "adapter")
    expected = rows.logits(load_compressed(out), rows.OLD_TOKENS)
    assert torch.allclose(rows.logits(model, rows.OLD_TOKENS), expected, atol=ATOL)
    merged = model.merge_and_unload().get_input_embeddings().weight
    assert torch.equal(merged, weight)
    others = torch.ones(rows.VOCAB, dtype=torch.bool)
    others[seen] = False
    assert torch.equal(merged[others], untouched[others]) and not torch.equal(merged[seen], untouched[seen])

    # vLLM reads no trainable tokens; its LLaMA takes an embedding LoRA, here of full rank (64 <= 512): exact.
    vllm = run_json(["export-peft", out, "-o", tmp_path / "vllm", "--target", "vllm", "--json"])
    assert "model.embed_tokens" in vllm["target_modules"] and not vllm["trainable_tokens"]
    assert vllm["ranks"]["model.embed_tokens"] == 64 and not vllm["dropped"]
    served = rows.load_adapter(AutoModelForCausalLM.from_pretrained(init_dir), tmp_path / "vllm")
    assert torch.allclose(rows.logits(served, rows.OLD_TOKENS), expected, atol=ATOL)
