"""inputs/sources.py: every input form as a Checkpoint, an artifact's recorded reference, run folders,
compress's inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from inrank_convert import PlanOptions, RankRule, compress
from inrank_convert.artifact import Artifact, read_manifest
from inrank_convert.core.errors import InitReferenceError, UsageError
from inrank_convert.inputs.reference import CheckpointReference, ZeroReference
from inrank_convert.inputs.sources import (
    ArtifactCheckpoint,
    is_run,
    open_artifact,
    open_checkpoint,
    open_inputs,
)
from inrank_convert.weights.checkpoints import SafetensorsCheckpoint, StateDictCheckpoint, open_weights
from inrank_convert.weights.run_folder import INIT_RECIPE_FILE

TIE = ["transformer.wte.weight", "lm_head.weight"]


def assert_holds(checkpoint, state: dict[str, torch.Tensor], names) -> None:
    names = list(names)
    assert names
    for name in names:
        assert torch.equal(checkpoint.get(name), state[name]), name
        assert checkpoint.info(name).shape == tuple(state[name].shape), name


def test_open_checkpoint_hf_folder(llama_pair):
    with open_checkpoint(llama_pair.trained_dir) as checkpoint:
        assert isinstance(checkpoint, SafetensorsCheckpoint)
        assert set(checkpoint.names()) == set(llama_pair.trained_state)
        assert checkpoint.config_dir == llama_pair.trained_dir and checkpoint.config()["model_type"] == "llama"
        assert_holds(checkpoint, llama_pair.trained_state, llama_pair.trained_state)


def test_open_checkpoint_single_safetensors_file(tmp_path, llama_pair):
    file = tmp_path / "weights.safetensors"
    save_file(llama_pair.trained_state, str(file))
    with open_checkpoint(file) as checkpoint:
        assert isinstance(checkpoint, SafetensorsCheckpoint) and checkpoint.files == [file]
        assert checkpoint.names() == list(load_file(str(file)))
        assert_holds(checkpoint, llama_pair.trained_state, llama_pair.trained_state)


def test_open_checkpoint_bin_file_keeps_the_tie(tmp_path, gpt2_pair):
    file = tmp_path / "weights.bin"
    torch.save(gpt2_pair.trained_state, file)
    with open_checkpoint(file) as checkpoint:
        assert isinstance(checkpoint, StateDictCheckpoint)
        assert checkpoint.names() == list(gpt2_pair.trained_state)
        assert checkpoint.shared_storage_groups() == [TIE]
        assert_holds(checkpoint, gpt2_pair.trained_state, gpt2_pair.trained_state)


def compress_bin(tmp_path, pair, threshold=0.9, **kwargs):
    """An artifact of the pair's trained model, from a .bin so that the tie becomes an alias."""
    torch.save(pair.trained_state, tmp_path / "trained.bin")
    out = tmp_path / "artifact"
    compress(tmp_path / "trained.bin", out, options=PlanOptions(rule=RankRule("energy-rest", threshold)), **kwargs)
    return out


def test_open_checkpoint_of_an_artifact_is_its_dense_model(tmp_path, gpt2_pair):
    out = compress_bin(tmp_path, gpt2_pair, init=gpt2_pair.init_dir)
    manifest = read_manifest(out)
    assert {entry.kind for entry in manifest.tensors.values()} >= {"lowrank", "dense", "alias"}
    with open_checkpoint(out) as checkpoint, \
            Artifact(out, reference=CheckpointReference(open_weights(gpt2_pair.init_dir))) as artifact:
        assert isinstance(checkpoint, ArtifactCheckpoint) and checkpoint.kind == "artifact"
        assert checkpoint.names() == list(manifest.tensors)
        assert checkpoint.shared_storage_groups() == [TIE]
        for name in checkpoint.names():
            assert torch.equal(checkpoint.get(name), artifact.reconstruct(name)), name
            assert checkpoint.info(name).shape == manifest.tensors[name].shape
        # The dense model it stands for is the trained one, up to the 0.9 truncation.
        dense = [name for name, entry in manifest.tensors.items() if entry.kind == "dense"]
        assert dense
        for name in dense:
            assert torch.equal(checkpoint.get(name), gpt2_pair.trained_state[name]), name
        assert gpt2_pair.init_dir.resolve() in {p.resolve() for p in checkpoint.artifact.input_paths()}


def test_open_checkpoint_of_an_artifact_with_an_init_override(tmp_path, gpt2_pair):
    init_copy = tmp_path / "init-copy"
    shutil.copytree(gpt2_pair.init_dir, init_copy)
    out = compress_bin(tmp_path, gpt2_pair, init=init_copy)
    shutil.rmtree(init_copy)
    lowrank = [name for name, entry in read_manifest(out).tensors.items() if entry.kind == "lowrank"]
    assert lowrank
    with pytest.raises(InitReferenceError, match="missing"):
        open_checkpoint(out).get(lowrank[0])
    with open_checkpoint(out, init=gpt2_pair.init_dir) as checkpoint, \
            Artifact(out, reference=CheckpointReference(open_weights(gpt2_pair.init_dir))) as artifact:
        for name in lowrank:
            assert torch.equal(checkpoint.get(name), artifact.reconstruct(name)), name


def _change_init(init_dir, name: str) -> None:
    file = init_dir / "model.safetensors"
    state = load_file(str(file))
    assert name in state
    state[name] = state[name] + 1.0
    save_file(state, str(file), metadata={"format": "pt"})


def test_open_artifact_refuses_a_changed_init(tmp_path, gpt2_pair):
    init_copy = tmp_path / "init-copy"
    shutil.copytree(gpt2_pair.init_dir, init_copy)
    out = tmp_path / "out"
    compress(gpt2_pair.trained_dir, out, init=init_copy, options=PlanOptions(rule=RankRule("energy-rest", 0.9)))
    name = "transformer.h.0.mlp.c_fc.weight"
    with open_artifact(out) as artifact:
        before = artifact.reconstruct(name)
    _change_init(init_copy, name)

    artifact = open_artifact(out)
    assert artifact.manifest.reference.mode == "reference"  # the header alone still reads
    with pytest.raises(InitReferenceError, match="sha256 mismatch in model.safetensors") as caught:
        artifact.reconstruct(name)
    assert "changed since compression" in str(caught.value) and str(init_copy.resolve()) in str(caught.value)
    artifact.close()
    # Unverified, the changed init is used as it is; the original passed as an override restores the model.
    with open_artifact(out, verify=False) as artifact:
        assert torch.allclose(artifact.reconstruct(name), before + 1.0, atol=1e-5)
    with open_artifact(out, init=gpt2_pair.init_dir) as artifact:
        assert torch.equal(artifact.reconstruct(name), before)


def make_run(tmp_path, pair):
    """step-0 = init, step-2 = an intermediate (here: the init again), step-10 = trained."""
    run = tmp_path / "run"
    shutil.copytree(pair.init_dir, run / "step-0")
    shutil.copytree(pair.init_dir, run / "step-2")
    shutil.copytree(pair.trained_dir, run / "step-10")
    return run


def test_is_run(tmp_path, gpt2_pair):
    run = make_run(tmp_path, gpt2_pair)
    assert is_run(run)
    assert not is_run(gpt2_pair.trained_dir)
    assert not is_run(run / "step-10")
    out = tmp_path / "out"
    compress(gpt2_pair.trained_dir, out, init=gpt2_pair.init_dir)
    assert not is_run(out)
    shutil.copytree(gpt2_pair.init_dir, out / "step-0")  # an artifact is a model even with step folders inside
    shutil.copytree(gpt2_pair.trained_dir, out / "step-1")
    assert not is_run(out)
    assert not is_run(tmp_path / "does-not-exist")


def test_open_inputs_on_a_run_takes_the_latest_step_and_step_zero(tmp_path, gpt2_pair):
    run = make_run(tmp_path, gpt2_pair)
    names = ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.weight", "transformer.ln_f.bias"]
    inputs = open_inputs(run)
    try:
        assert inputs.run_folder == run
        assert inputs.trained.path == run / "step-10"  # numeric order, not string order
        assert isinstance(inputs.reference, CheckpointReference)
        assert inputs.reference.checkpoint.path == run / "step-0"
        assert run in inputs.paths and not inputs.embed_init
        for name in names:
            assert torch.equal(inputs.trained.get(name), gpt2_pair.trained_state[name]), name
            assert torch.equal(inputs.reference.get(name), gpt2_pair.init_state[name]), name
    finally:
        inputs.close()
    # An explicit reference option replaces step-0.
    inputs = open_inputs(run, no_init=True)
    try:
        assert isinstance(inputs.reference, ZeroReference) and inputs.trained.path == run / "step-10"
    finally:
        inputs.close()


def test_open_inputs_on_a_run_with_a_seed_recipe(tmp_path, gpt2_pair):
    run = make_run(tmp_path, gpt2_pair)
    (run / "step-0" / INIT_RECIPE_FILE).write_text(json.dumps({"seed": gpt2_pair.init_seed}))
    inputs = open_inputs(run)
    try:
        assert inputs.reference.mode == "seed"
        assert inputs.reference.record().recipe["seed"] == gpt2_pair.init_seed
        name = "transformer.h.0.mlp.c_fc.weight"
        assert torch.equal(inputs.reference.get(name), gpt2_pair.init_state[name])
    finally:
        inputs.close()


def test_open_inputs_on_an_artifact_uses_its_own_reference(tmp_path, gpt2_pair):
    out = tmp_path / "out"
    compress(gpt2_pair.trained_dir, out, init=gpt2_pair.init_dir)
    inputs = open_inputs(out)
    try:
        assert isinstance(inputs.trained, ArtifactCheckpoint) and inputs.run_folder is None
        assert inputs.reference.mode == "reference"
        resolved = {p.resolve() for p in inputs.paths}
        assert out.resolve() in resolved and gpt2_pair.init_dir.resolve() in resolved
    finally:
        inputs.close()


@pytest.mark.parametrize("kwargs,says", [
    ({"no_init": True, "init": "INIT"}, "no.init conflicts with"),
    ({"no_init": True, "init_seed": 3}, "no.init conflicts with"),
    ({"no_init": True, "embed_init": True}, "nothing to embed"),
    ({}, "no reference given"),
])
def test_open_inputs_conflicts(gpt2_pair, kwargs, says):
    kwargs = {key: gpt2_pair.init_dir if value == "INIT" else value for key, value in kwargs.items()}
    with pytest.raises(UsageError, match=says):
        open_inputs(gpt2_pair.trained_dir, **kwargs)
