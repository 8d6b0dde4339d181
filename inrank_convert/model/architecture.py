"""Transformers module trees built from a config, never from weights: the seeded init a recipe
stands for, an uninitialized model to fill, a meta-device model to read names and module types
from, the facts of a config every command needs (context length, GPT-2's Conv1D class), and
where a saved tensor name goes in the model (transformers' own checkpoint key mapping).

``transformers`` is imported inside the functions: commands that never build a model (inspect,
compress without --no-embeddings) do not pay for importing it; verify builds one on the meta device
to check the tensors against config.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from inrank_convert.core.errors import ArtifactError, UsageError, flag

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# Config attributes that give a model's context length, in the order they are tried.
CONTEXT_ATTRIBUTES = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length", "max_sequence_length")


def conv1d_class() -> type[torch.nn.Module]:
    """GPT-2's ``Conv1D``: a linear layer that stores its weight [in, out]."""
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def with_architectures(config: dict) -> dict:
    """``config`` with its ``architectures`` filled in when it has none (a config a run was started
    from by hand): the causal-LM class transformers builds for its ``model_type``. transformers'
    Auto classes cope without it, but vLLM, llama.cpp's HF-to-GGUF converter and mergekit choose
    the model class from that field. Returned unchanged when it is there or the type is unknown."""
    if config.get("architectures"):
        return config
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    return {**config, "architectures": [name]} if isinstance(name, str) else config


def model_context(config: PretrainedConfig) -> int | None:
    """The context length a config declares (GPT-2 ``n_positions``, LLaMA ``max_position_embeddings``)."""
    for attribute in CONTEXT_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def config_from_dict(config: dict) -> PretrainedConfig | None:
    """A transformers config from the JSON of a config.json (as a seed recipe stores it); None when
    transformers does not know its ``model_type``."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in CONFIG_MAPPING:
        return None
    return CONFIG_MAPPING[model_type].from_dict(config)


# Seeds feed torch.manual_seed (64 bits) and derived streams (seed * 1_000_003 + step): 32 bits
# leave room for both.
SEED_LIMIT = 2 ** 32


def check_seed(seed: int, option: str) -> None:
    """A seed torch accepts, checked before anything is read or written."""
    if not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"{flag(option)} must be between 0 and {SEED_LIMIT - 1}", f"{flag(option)} {seed}",
                         f"pass a seed in that range, e.g. {flag(option)} 0")


def seeded_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_config`` in float32 under ``manual_seed(seed)``: the init a seed
    recipe stands for (``train`` builds its init with this too, so the recipe regenerates it)."""
    from transformers import AutoModelForCausalLM

    # Restore the caller's RNG afterwards: building an init must not shift anyone's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The causal LM of ``config`` on the meta device: names, module types and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def empty_model(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The model's module tree on the CPU with uninitialized weights.

    Built for real rather than on the meta device so that non-persistent buffers (rotary
    frequencies, masks) are computed by the modules themselves; ``torch.empty`` pages that are
    never written cost no memory, and the weights of swapped-out layers never are.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as err:
        raise ArtifactError(f"cannot build a causal LM from this config ({str(err).splitlines()[0]})",
                            config.model_type, "only causal language models can run from an artifact") from err
    model.tie_weights()  # part of weight init, which no_init_weights skipped
    return model


def checkpoint_keys(model: torch.nn.Module, names: Iterable[str]) -> dict[str, str | None]:
    """Saved tensor name -> the model's state-dict key it loads into, as ``from_pretrained`` maps it.

    A checkpoint's names need not be the model's module paths: transformers 5 builds GPT-NeoX with
    ``lm_head`` but saves (and loads) it as ``embed_out.weight``, a checkpoint of the base model
    lacks the ``model.`` prefix, and old ones say ``LayerNorm.gamma``. This uses transformers' own
    checkpoint conversion mapping and its renaming function, in the order its loader applies them,
    so every architecture it knows maps as it does. A name that is already a key maps to itself. A
    name transformers converts with tensor operations on load (fused or split: Mixtral's experts)
    has no one-to-one key: None.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [item for item in transforms if isinstance(item, WeightRenaming)]
    converters = [item for item in transforms if isinstance(item, WeightConverter)]
    state = model.state_dict()  # only its keys are read (on the meta device it holds no memory)
    prefix = getattr(model, "base_model_prefix", None)
    keys: dict[str, str | None] = {}
    for name in names:
        key, converted = rename_source_key(name, renamings, converters, prefix, state)
        if key not in state and name in state:  # transformers' loader undoes a renaming that misses, too
            key, converted = rename_source_key(name, [], [], prefix, state)
        keys[name] = None if converted is not None else key
    return keys


def embedding_weight_names(model: torch.nn.Module) -> set[str]:
    """Weights of the model's input embeddings and its output embedding (LM head)."""
    found = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Embedding)}
    output = model.get_output_embeddings()
    if output is not None:
        found.update(f"{name}.weight" for name, module in model.named_modules() if module is output)
    return found


def replace_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Put ``module`` where the submodule ``name`` (dotted path) is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
