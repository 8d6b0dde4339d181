"""compression/plan.py: per-tensor decisions, tie detection, reference checks and embedding names,
on real checkpoint files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from inrank_convert.compression.plan import (
    PlanOptions,
    check_reference_matches,
    embedding_parameter_names,
    find_ties,
    make_plan,
)
from inrank_convert.core.errors import MismatchError
from inrank_convert.inputs.reference import CheckpointReference, ZeroReference
from inrank_convert.weights.checkpoints import open_weights

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"


def sample_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    embed = rand(32, 8)
    near_tie = embed.clone()
    near_tie[-1] += 1.0  # same shape, dtype and first row as the embedding, other values
    return {
        EMBED: embed,
        UP: rand(16, 12),
        DOWN: rand(12, 16),
        "model.layers.0.mlp.up_proj.bias": rand(16),
        "model.conv.weight": rand(4, 3, 3),
        "model.tiny.weight": rand(1, 8),  # no rank r >= 1 makes r * (1 + 8) < 8
        "model.counts": torch.arange(64, dtype=torch.int64).reshape(8, 8),
        "model.near_tie.weight": near_tie,
        HEAD: embed.clone(),  # a tie by value: separate storage, equal contents
    }


def write(tmp_path, state, name="model.safetensors"):
    folder = tmp_path / name.split(".")[0]
    folder.mkdir(exist_ok=True)
    save_file(state, str(folder / name))
    return open_weights(folder / name)


def plan_of(checkpoint, **options):
    plan = make_plan(checkpoint, ZeroReference(), PlanOptions(**options))
    assert plan.entries
    return {entry.name: entry for entry in plan.entries}, plan


def tie_of(checkpoint) -> tuple[str, str]:
    """(canonical, alias) of the value tie between EMBED and HEAD: the first in the file's order is canonical."""
    canonical, alias = [name for name in checkpoint.names() if name in (EMBED, HEAD)]
    return canonical, alias


def test_plan_decisions(tmp_path):
    state = sample_state()
    checkpoint = write(tmp_path, state)
    canonical, alias = tie_of(checkpoint)
    entries, plan = plan_of(checkpoint)
    assert list(entries) == checkpoint.names()  # source order
    expected = {
        canonical: ("factorize", ""), UP: ("factorize", ""), DOWN: ("factorize", ""),
        "model.layers.0.mlp.up_proj.bias": ("dense", "1-D tensor"),
        "model.conv.weight": ("dense", "3-D tensor"),
        "model.tiny.weight": ("dense", "too small"),
        "model.counts": ("dense", "not a float tensor"),
        "model.near_tie.weight": ("factorize", ""),
        alias: ("alias", f"tied to {canonical}"),
    }
    assert set(entries) == set(expected)
    for name, (action, reason) in expected.items():
        assert entries[name].action == action, name
        assert reason in entries[name].reason, (name, entries[name].reason)
    assert entries[alias].alias_of == canonical and plan.tied == {alias: canonical}
    assert plan.original_bytes == sum(t.numel() * t.element_size() for n, t in state.items() if n != alias)


def test_breakeven_rank_is_where_factors_stop_paying(tmp_path):
    entries, _ = plan_of(write(tmp_path, sample_state()))
    assert entries
    for entry in entries.values():
        if len(entry.shape) != 2:
            assert entry.breakeven_rank is None
            continue
        rows, cols = entry.shape
        paying = [r for r in range(1, min(rows, cols) + 1) if r * (rows + cols) < rows * cols]
        assert entry.breakeven_rank == (max(paying) if paying else 0), entry.name
    assert entries[UP].breakeven_rank == 6 and entries["model.tiny.weight"].breakeven_rank == 0


def test_include_and_exclude_patterns(tmp_path):
    checkpoint = write(tmp_path, sample_state())
    canonical, alias = tie_of(checkpoint)
    entries, _ = plan_of(checkpoint, include=("model.layers.*",))
    assert (entries[UP].action, entries[DOWN].action) == ("factorize", "factorize")
    assert entries[canonical].action == "dense" and entries[canonical].reason.startswith("not matched by")
    assert entries["model.near_tie.weight"].action == "dense"
    assert entries[alias].action == "alias"  # a tie stays a tie whatever the patterns say
    entries, _ = plan_of(checkpoint, exclude=("*.down_proj.*", canonical))
    for name in (DOWN, canonical):
        assert entries[name].action == "dense" and entries[name].reason.startswith("matched by"), name
    assert (entries[UP].action, entries["model.near_tie.weight"].action) == ("factorize", "factorize")
    # exclude wins over include
    entries, _ = plan_of(checkpoint, include=("model.layers.*",), exclude=("*.up_proj.*",))
    assert (entries[UP].action, entries[DOWN].action) == ("dense", "factorize")


def test_no_embeddings_by_name_without_a_config(tmp_path):
    checkpoint = write(tmp_path, sample_state())
    canonical, _ = tie_of(checkpoint)
    entries, _ = plan_of(checkpoint, embeddings=False)
    assert entries[canonical].action == "dense" and entries[canonical].reason.startswith("embedding"), canonical
    assert (entries[UP].action, entries["model.near_tie.weight"].action) == ("factorize", "factorize")


def test_no_embeddings_from_the_config(llama_pair):
    checkpoint = open_weights(llama_pair.trained_dir)
    reference = CheckpointReference(open_weights(llama_pair.init_dir))
    plan = make_plan(checkpoint, reference, PlanOptions(embeddings=False))
    dense = {entry.name for entry in plan.entries if entry.action == "dense" and entry.reason.startswith("embedding")}
    assert dense == {EMBED, HEAD}
    assert {entry.action for entry in plan.entries if entry.name == UP} == {"factorize"}


def test_find_ties_by_equality_without_shared_storage(tmp_path):
    state = sample_state()
    checkpoint = write(tmp_path, state)
    assert checkpoint.shared_storage_groups() == []
    canonical, alias = tie_of(checkpoint)
    assert find_ties(checkpoint, checkpoint.infos()) == {alias: canonical}
    # Equal values in another dtype are another tensor.
    other = {EMBED: state[EMBED], HEAD: state[EMBED].to(torch.float64)}
    checkpoint = write(tmp_path, other, "other.safetensors")
    assert find_ties(checkpoint, checkpoint.infos()) == {}


def test_find_ties_from_shared_storage(tmp_path):
    state = sample_state()
    state[HEAD] = state[EMBED]  # one storage, as a pickled tied model holds it
    torch.save(state, tmp_path / "tied.bin")
    checkpoint = open_weights(tmp_path / "tied.bin")
    assert checkpoint.shared_storage_groups() == [[EMBED, HEAD]]
    assert find_ties(checkpoint, checkpoint.infos()) == {HEAD: EMBED}


def _reference(tmp_path, state, name):
    return CheckpointReference(write(tmp_path, state, f"{name}.safetensors"))


def test_check_reference_matches(tmp_path):
    state = sample_state()
    trained = write(tmp_path, state).infos()
    ties = {HEAD: EMBED}  # the reference need not hold an alias
    init = {name: tensor for name, tensor in state.items() if name != HEAD}
    check_reference_matches(trained, ties, _reference(tmp_path, init, "same"), set())
    check_reference_matches(trained, ties, ZeroReference(), set())  # zero: any names

    missing = {name: tensor for name, tensor in init.items() if name != UP}
    with pytest.raises(MismatchError, match=f"init lacks 1 tensor.*{UP}"):
        check_reference_matches(trained, ties, _reference(tmp_path, missing, "missing"), set())

    extra = {**init, "model.extra.weight": torch.zeros(2, 2)}
    with pytest.raises(MismatchError, match="init has 1 tensor.*model.extra.weight"):
        check_reference_matches(trained, ties, _reference(tmp_path, extra, "extra"), set())
    # ... unless the extra name is one of the reference's aliases
    check_reference_matches(trained, ties, _reference(tmp_path, extra, "extra2"), {"model.extra.weight"})

    reshaped = {**init, UP: torch.zeros(12, 16)}
    with pytest.raises(MismatchError, match=r"shapes differ.*\[16, 12\] vs \[12, 16\]"):
        check_reference_matches(trained, ties, _reference(tmp_path, reshaped, "reshaped"), set())


def test_make_plan_checks_the_reference_first(tmp_path):
    state = sample_state()
    trained = write(tmp_path, state)
    init = {name: tensor for name, tensor in state.items() if name not in (HEAD, DOWN)}
    with pytest.raises(MismatchError, match=DOWN):
        make_plan(trained, _reference(tmp_path, init, "init"), PlanOptions())


def test_embedding_parameter_names(gpt2_pair, llama_pair):
    gpt2_names = list(gpt2_pair.trained_state)
    llama_names = list(llama_pair.trained_state)
    gpt2_config, llama_config = gpt2_pair.config.to_dict(), llama_pair.config.to_dict()
    assert embedding_parameter_names(gpt2_config, gpt2_names) == {
        "transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"}
    assert embedding_parameter_names(llama_config, llama_names) == {EMBED, HEAD}
    # Without a config (or with one transformers cannot build) the names decide.
    assert embedding_parameter_names(None, gpt2_names) == {"transformer.wte.weight", "transformer.wpe.weight",
                                                           "lm_head.weight"}
    assert embedding_parameter_names({"model_type": "no-such-model"}, llama_names) == {EMBED, HEAD}
    assert embedding_parameter_names(None, ["tok_embeddings.weight", "output.weight", "layers.0.attention.wq.weight",
                                            "norm.weight"]) == {"tok_embeddings.weight", "output.weight"}
    # The module tree, not the names, decides when there is a config.
    assert embedding_parameter_names(llama_config, ["model.embed_tokens.bias", "other.weight"]) == {EMBED, HEAD}
