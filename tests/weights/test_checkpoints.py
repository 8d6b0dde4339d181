"""weights/checkpoints.py: every input form of docs/design.md §3 (a Hugging Face folder, sharded or
not, pytorch_model.bin, single files, a Lightning .ckpt) reads the same tensors, one at a time."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from inrank_convert.inputs.sources import open_checkpoint
from inrank_convert.weights.checkpoints import SafetensorsCheckpoint, StateDictCheckpoint


def assert_same_tensors(checkpoint, state, skip=()):
    names = set(checkpoint.names())
    expected = {name for name in state if name not in skip}
    assert expected <= names
    for name in expected:
        assert torch.equal(checkpoint.get(name), state[name]), name
        assert checkpoint.info(name).shape == tuple(state[name].shape)


def test_hf_folder_single_file(gpt2_pair):
    with open_checkpoint(gpt2_pair.trained_dir) as checkpoint:
        assert isinstance(checkpoint, SafetensorsCheckpoint)
        assert checkpoint.config()["model_type"] == "gpt2"
        # save_pretrained drops the tied lm_head.weight; the reader must not invent it.
        assert_same_tensors(checkpoint, gpt2_pair.trained_state, skip=("lm_head.weight",))


def test_sharded_folder(tmp_path, llama_pair):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_pair.trained_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    with open_checkpoint(tmp_path / "sharded") as checkpoint:
        assert len(checkpoint.files) > 1
        assert_same_tensors(checkpoint, llama_pair.trained_state)


def test_pytorch_model_bin_folder_detects_tied_storage(tmp_path, gpt2_pair):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(gpt2_pair.trained_dir / "config.json", folder)
    torch.save(gpt2_pair.trained_state, folder / "pytorch_model.bin")
    with open_checkpoint(folder) as checkpoint:
        assert isinstance(checkpoint, StateDictCheckpoint)
        assert checkpoint.config_dir == folder
        assert_same_tensors(checkpoint, gpt2_pair.trained_state)
        assert ["transformer.wte.weight", "lm_head.weight"] in checkpoint.shared_storage_groups()


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_single_files(tmp_path, llama_pair, suffix):
    file = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(llama_pair.trained_state, file)
    else:
        torch.save(llama_pair.trained_state, file)
    with open_checkpoint(file) as checkpoint:
        assert checkpoint.files == [file]
        assert_same_tensors(checkpoint, llama_pair.trained_state)


def test_lightning_ckpt_strips_the_module_prefix(tmp_path, llama_pair):
    file = tmp_path / "epoch=3.ckpt"
    lightning = {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                 "state_dict": {f"model.{name}": t for name, t in llama_pair.trained_state.items()},
                 "optimizer_states": [], "lr_schedulers": []}
    torch.save(lightning, file)
    with open_checkpoint(file) as checkpoint:
        assert checkpoint.prefix_stripped == "model."
        assert_same_tensors(checkpoint, llama_pair.trained_state)


def test_first_row_and_single_tensor_reads(tmp_path):
    big = {f"layer{i}": torch.randn(512, 512) for i in range(8)}
    save_file(big, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as checkpoint:
        assert checkpoint.info("layer3").nbytes == 512 * 512 * 4
        assert torch.equal(checkpoint.first_row("layer3"), big["layer3"][0, :64])
        assert torch.equal(checkpoint.get("layer5"), big["layer5"])
