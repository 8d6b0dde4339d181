"""The fine-tune benchmark's peer plumbing (benchmarks/peer_mergekit.py) on a real PEFT adapter: its
bytes split into low-rank and whole tensors, the bfloat16 cast halves them, the merged checkpoint
is the base plus the adapter's product, and a missing mergekit skips the peer rather than failing."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from benchmarks import peer_mergekit
from tests.conftest import build_model, llama_config


def adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    base_folder = tmp_path / "base"
    build_model(llama_config(), seed=0).save_pretrained(base_folder)
    model = get_peft_model(build_model(llama_config(), seed=0), LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"], modules_to_save=["norm"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # PEFT starts B at zero: give the adapter an effect
    model.save_pretrained(tmp_path / "adapter")
    return base_folder, tmp_path / "adapter", model


def test_adapter_bytes_cast_and_merge(tmp_path):
    base, folder, peft_model = adapter(tmp_path)
    low_rank, whole = peer_mergekit.adapter_bytes(folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert low_rank == sum(t.numel() * 4 for name, t in tensors.items() if "lora_" in name) > 0
    assert whole == sum(t.numel() * 4 for name, t in tensors.items() if "lora_" not in name) > 0  # the norm
    peer_mergekit.cast_adapter(folder, tmp_path / "bf16", torch.bfloat16)
    assert peer_mergekit.adapter_bytes(tmp_path / "bf16") == (low_rank // 2, whole // 2)

    peer_mergekit.merged_checkpoint(base, folder, tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    expected = original["model.layers.0.self_attn.q_proj.weight"] + (
        layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           original["model.layers.0.self_attn.q_proj.weight"])


def test_without_mergekit_the_peer_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("INRANK_MERGEKIT", str(tmp_path / "absent" / "mergekit-extract-lora"))
    assert peer_mergekit.executable() is None
    assert peer_mergekit.prepare(tmp_path, tmp_path, tmp_path, 1000) == {}
