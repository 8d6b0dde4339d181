"""model/architecture.py: the seeded init a recipe stands for (reproducible, the caller's random
stream untouched), seeds checked, models on the meta device and uninitialized, a config's context,
saved names mapped to the model's keys as transformers maps them, embedding names, module swaps."""

from __future__ import annotations

import pytest
import torch

from inrank_convert.core.errors import UsageError, cli_flags
from inrank_convert.model.architecture import (
    SEED_LIMIT,
    check_seed,
    checkpoint_keys,
    config_from_dict,
    embedding_weight_names,
    empty_model,
    meta_model,
    model_context,
    replace_module,
    seeded_model,
)
from tests.conftest import gpt2_config, llama_config


def test_a_seed_regenerates_its_init_and_leaves_the_callers_random_stream_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = seeded_model(gpt2_config(), 7).state_dict()
    assert torch.equal(torch.rand(3), expected_next), "seeded_model moved the caller's random stream"
    again = seeded_model(gpt2_config(), 7).state_dict()
    other = seeded_model(gpt2_config(), 8).state_dict()
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["transformer.h.0.mlp.c_fc.weight"], other["transformer.h.0.mlp.c_fc.weight"])
    assert all(tensor.dtype == torch.float32 for tensor in first.values() if tensor.is_floating_point())


def test_seeds_outside_32_bits_are_refused_naming_the_option():
    for seed in (0, SEED_LIMIT - 1):
        check_seed(seed, "--init-seed")
    for seed in (-1, SEED_LIMIT):
        with pytest.raises(UsageError, match=r"init_seed must be between 0 and 4294967295"):
            check_seed(seed, "--init-seed")  # from Python: the parameter's name
        with cli_flags({"--init-seed"}), pytest.raises(UsageError, match=r"--init-seed must be .*--init-seed 0"):
            check_seed(seed, "--init-seed")


def test_the_context_a_config_declares():
    assert model_context(gpt2_config()) == 64  # n_positions
    assert model_context(llama_config(max_position_embeddings=96)) == 96
    assert model_context(object()) is None


def test_a_config_from_its_json():
    config = config_from_dict(llama_config().to_dict())
    assert type(config) is type(llama_config()) and config.hidden_size == 64 and config.num_key_value_heads == 2
    assert config_from_dict({"model_type": "no-such-model"}) is None
    assert config_from_dict({"hidden_size": 64}) is None and config_from_dict(["not", "a", "dict"]) is None


def test_meta_and_empty_models_have_the_real_models_names_and_shapes():
    real = seeded_model(llama_config(), 0).state_dict()
    meta = meta_model(llama_config())
    assert all(parameter.is_meta for parameter in meta.parameters())
    assert {name: tuple(tensor.shape) for name, tensor in meta.state_dict().items()} == \
        {name: tuple(tensor.shape) for name, tensor in real.items()}
    empty = empty_model(gpt2_config(), torch.bfloat16)
    assert not any(parameter.is_meta for parameter in empty.parameters())
    assert empty.lm_head.weight.dtype == torch.bfloat16
    assert empty.lm_head.weight is empty.transformer.wte.weight  # the tie, which weight init would make


def test_saved_names_map_to_the_models_keys():
    from transformers import GPTNeoXConfig

    llama = meta_model(llama_config())
    names = ["model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.norm.weight"]
    assert checkpoint_keys(llama, names) == {name: name for name in names}
    neox = meta_model(GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                    vocab_size=320, max_position_embeddings=64))
    assert "embed_out.weight" not in neox.state_dict() and "lm_head.weight" in neox.state_dict()
    assert checkpoint_keys(neox, ["embed_out.weight"]) == {"embed_out.weight": "lm_head.weight"}


def test_embedding_names():
    assert embedding_weight_names(meta_model(gpt2_config())) == {"transformer.wte.weight", "transformer.wpe.weight",
                                                                 "lm_head.weight"}
    assert embedding_weight_names(meta_model(llama_config())) == {"model.embed_tokens.weight", "lm_head.weight"}


def test_replace_module_puts_the_module_at_its_dotted_path():
    model = seeded_model(llama_config(), 0)
    replacement = torch.nn.Identity()
    replace_module(model, "model.layers.1.mlp.down_proj", replacement)
    assert model.get_submodule("model.layers.1.mlp.down_proj") is replacement
    assert not isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), torch.nn.Identity)
    head = torch.nn.Linear(64, 320, bias=False)
    replace_module(model, "lm_head", head)
    assert model.lm_head is head
