"""compression/updates.py: each planned tensor's update streamed in, ``W - W_ref`` in float32 with its
exact energy (a grown vocabulary's new rows are their own update), NaN, Inf and float32 overflow each
refused with one message naming where they are, and the plan's work in plan order."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from inrank_convert.compression.job import plan_compression
from inrank_convert.compression.plan import PlanOptions
from inrank_convert.compression.updates import load_update, planned_entries
from inrank_convert.core.errors import NonFiniteError
from inrank_convert.inputs.sources import open_inputs
from tests.helpers.rows import GROWN, VOCAB, grown_pair

CPU = torch.device("cpu")


def updates_of(trained, init) -> dict[str, tuple[torch.Tensor, float]]:
    inputs = open_inputs(trained, init)
    try:
        work = planned_entries(plan_compression(inputs, PlanOptions()), ("factorize",))
        return {entry.name: load_update(inputs, entry, CPU) for _, entry in work}
    finally:
        inputs.close()


def test_the_update_is_w_minus_its_reference_with_its_exact_energy(llama_pair):
    updates = updates_of(llama_pair.trained_dir, llama_pair.init_dir)
    assert set(updates) == set(llama_pair.factorized_names())
    for name, (delta, total) in updates.items():
        expected = llama_pair.trained_state[name] - llama_pair.init_state[name]
        assert delta.dtype == torch.float32 and torch.equal(delta, expected), name
        assert total == pytest.approx(float(delta.double().square().sum()), rel=1e-6), name  # float64 sums


def test_a_bfloat16_checkpoint_is_subtracted_in_float32(tmp_path, gpt2_pair):
    for which, folder in (("trained", gpt2_pair.trained_dir), ("init", gpt2_pair.init_dir)):
        state = {name: tensor.bfloat16() for name, tensor in load_file(folder / "model.safetensors").items()}
        (tmp_path / which).mkdir()
        (tmp_path / which / "config.json").write_bytes((folder / "config.json").read_bytes())
        save_file(state, tmp_path / which / "model.safetensors", metadata={"format": "pt"})
    name = "transformer.h.0.mlp.c_fc.weight"
    delta, _ = updates_of(tmp_path / "trained", tmp_path / "init")[name]
    expected = gpt2_pair.trained_state[name].bfloat16().float() - gpt2_pair.init_state[name].bfloat16().float()
    assert delta.dtype == torch.float32 and torch.equal(delta, expected)
    assert not torch.equal(delta, (gpt2_pair.trained_state[name].bfloat16() - gpt2_pair.init_state[name].bfloat16()).float())


def test_a_grown_vocabularys_new_rows_are_their_own_update(tmp_path):
    pair = grown_pair(tmp_path, "llama")
    updates = updates_of(pair.ft_dir, pair.base_dir)
    for name in pair.grown:
        delta, _ = updates[name]
        assert delta.shape[0] == VOCAB + GROWN
        assert torch.equal(delta[:VOCAB], pair.ft_state[name][:VOCAB] - pair.base_state[name])
        assert torch.equal(delta[VOCAB:], pair.ft_state[name][VOCAB:])


@pytest.mark.parametrize("where, values, says", [
    ("trained", (float("nan"), 0.0), r"tensor 'model.layers.0.mlp.up_proj.weight' holds NaN or Inf: .*trained"),
    ("init", (0.0, float("inf")), r"init tensor 'model.layers.0.mlp.up_proj.weight' holds NaN or Inf: .*init"),
    ("both", (3e38, -3e38), r"the update of 'model.layers.0.mlp.up_proj.weight' overflows float32"),
])
def test_non_finite_inputs_and_overflow_name_the_tensor_and_the_file(tmp_path, llama_pair, where, values, says):
    name = "model.layers.0.mlp.up_proj.weight"
    folders = {}
    for which, folder, value in (("trained", llama_pair.trained_dir, values[0]), ("init", llama_pair.init_dir, values[1])):
        state = load_file(folder / "model.safetensors")
        if value:
            state[name] = state[name].clone()
            state[name][1, 2] = value
        folders[which] = tmp_path / which
        folders[which].mkdir()
        (folders[which] / "config.json").write_bytes((folder / "config.json").read_bytes())
        save_file(state, folders[which] / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteError, match=says):
        updates_of(folders["trained"], folders["init"])


def test_the_work_is_the_plans_tensors_to_store_in_plan_order(tmp_path, gpt2_pair):
    torch.save(gpt2_pair.trained_state, tmp_path / "trained.bin")  # the tied head kept: an alias in the plan
    inputs = open_inputs(tmp_path / "trained.bin", gpt2_pair.init_dir)
    try:
        plan = plan_compression(inputs, PlanOptions(exclude=("*.mlp.*",)))
    finally:
        inputs.close()
    work = planned_entries(plan)
    stored = [entry for entry in plan.entries if entry.action in ("factorize", "dense")]
    assert [entry for _, entry in work] == stored and [index for index, _ in work] == list(range(len(stored)))
    factorized = planned_entries(plan, ("factorize",))
    assert factorized and all(entry.action == "factorize" for _, entry in factorized)
    assert not any(".mlp." in entry.name for _, entry in factorized)
    aliases = [entry.name for entry in plan.entries if entry.action == "alias"]
    assert aliases == ["lm_head.weight"] and "lm_head.weight" not in {entry.name for _, entry in work}
