"""vLLM's own adapter loader reads what ``export-peft --target vllm`` wrote: its PEFT helper accepts the
config at the ``--max-lora-rank`` the command prints, and ``LoRAModel.from_local_checkpoint`` (the
function a vLLM server calls for every LoRA request) parses every tensor, the token embedding's LoRA
and the head's included, into weights whose products are the artifact's updates. vLLM (its wheel,
no GPU) is installed by ``make test-serving`` beside the package, not as one of its dependencies;
elsewhere this is skipped with the reason. Pinned memory needs a GPU driver, so it is switched off."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from inrank_convert import compress, open_artifact
from tests.helpers import rows
from tests.helpers.cli_contract import run_json

pytest.importorskip("vllm.lora.lora_model", reason="vLLM is not installed: run make test-serving")


def expected_modules(model) -> set[str]:
    """The module names vLLM's worker expects in an adapter for this model (worker_manager._load_adapter):
    its LoRA-capable layers (the linear ones, packed as vLLM packs them) and its embedding modules,
    the packed ones expanded again, from vLLM's own LlamaForCausalLM."""
    from vllm.model_executor.models.llama import LlamaForCausalLM

    packed = LlamaForCausalLM.packed_modules_mapping
    unpacked = {part: name for name, parts in packed.items() for part in parts}
    supported = set(LlamaForCausalLM.embedding_modules)
    supported |= {unpacked.get(name.rsplit(".", 1)[-1], name.rsplit(".", 1)[-1])
                  for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return {part for name in supported for part in packed.get(name, [name])}


def test_vllm_loads_the_adapter_with_its_embedding_rows(tmp_path, monkeypatch):
    import vllm.lora.lora_model as lora_model
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    monkeypatch.setattr(lora_model, "PIN_MEMORY", False)  # pin_memory() needs a GPU driver
    init_dir, trained_dir, seen = rows.seen_rows_llama(tmp_path)
    out = tmp_path / "out"
    compress(trained_dir, out, init=init_dir)
    adapter = tmp_path / "vllm"
    payload = run_json(["export-peft", out, "-o", adapter, "--target", "vllm", "--json"])
    assert {"model.embed_tokens", "lm_head"} <= set(payload["target_modules"]) and not payload["dropped"]

    helper = PEFTHelper.from_local_dir(str(adapter), 64)
    helper.validate_legal(LoRAConfig(max_lora_rank=payload["max_lora_rank"]))
    with pytest.raises(ValueError, match="max_lora_rank"):  # the check is real: one rank value too small
        helper.validate_legal(LoRAConfig(max_lora_rank=32))
    base = AutoModelForCausalLM.from_pretrained(init_dir)
    loaded = lora_model.LoRAModel.from_local_checkpoint(
        str(adapter), expected_modules(base), helper, lora_model_id=1, device="cpu", dtype=torch.float32,
        model_vocab_size=rows.VOCAB)
    assert set(loaded.loras) == set(payload["target_modules"]) and not loaded.modules_to_save

    config = json.loads((adapter / "adapter_config.json").read_text())
    with open_artifact(out) as artifact:
        for module, weights in loaded.loras.items():
            name = f"{module}.weight"
            update = artifact.reconstruct(name).float() - artifact.reference.get(name).float()
            rank, scaling = helper.get_rank_and_scaling(module)
            assert rank == config["rank_pattern"][module.replace(".", "\\.")] and scaling == 1.0
            # Linear: W += scaling * lora_b @ lora_a; the embedding: row t += scaling * lora_b @ lora_a[:, t].
            product = weights.scaling * (weights.lora_b @ weights.lora_a)
            served = product.T if module == "model.embed_tokens" else product
            torch.testing.assert_close(served, update, rtol=1e-4, atol=1e-5)
        embedding = artifact.reconstruct(rows.EMBED).float() - artifact.reference.get(rows.EMBED).float()
    # The embedding's whole update is there: the rows the fine-tune saw moved, the others did not.
    assert embedding[seen].abs().amax(dim=1).min() > 0 and loaded.loras["model.embed_tokens"].lora_a.shape == (
        64, rows.VOCAB)


def test_vllm_knows_the_architecture_of_the_folders_the_tool_writes(tmp_path):
    """vLLM picks its model class from config.json's ``architectures``: decompress writes it, and it is
    one vLLM's registry supports (a run's step folders: tests/training/test_entrypoints.py)."""
    from vllm.model_executor.models import ModelRegistry

    from inrank_convert.export.dense import decompress

    init_dir, trained_dir, _ = rows.seen_rows_llama(tmp_path)
    compress(trained_dir, tmp_path / "out", init=init_dir)
    decompress(tmp_path / "out", tmp_path / "dense")
    architectures = json.loads((tmp_path / "dense" / "config.json").read_text())["architectures"]
    assert architectures == ["LlamaForCausalLM"] and architectures[0] in ModelRegistry.get_supported_archs()
