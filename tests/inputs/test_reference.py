"""inputs/reference.py: what an update is measured against: nothing (zero), a checkpoint on disk
(recorded by path and file hashes), or tensors held with their hashes (a seed's regenerated init, an
embedded init) that are checked on every read and refuse to be anything but what was recorded."""

from __future__ import annotations

import hashlib

import pytest
import torch

from inrank_convert.artifact import ReferenceRecord
from inrank_convert.core.errors import InitReferenceError, UsageError
from inrank_convert.core.tensors import sha256_tensor
from inrank_convert.inputs.reference import (
    CheckpointReference,
    TensorsReference,
    ZeroReference,
    check_seed_matches,
    seed_reference,
)
from inrank_convert.weights.checkpoints import open_weights
from tests.conftest import build_model, gpt2_config

NAME = "transformer.h.0.mlp.c_fc.weight"


def test_zero_is_no_tensor_at_all():
    zero = ZeroReference()
    assert zero.get(NAME) is None and zero.infos() is None and zero.aliases() == set()
    assert zero.record() == ReferenceRecord("zero") and zero.record().to_json() == {"mode": "zero"}


def test_a_checkpoint_is_recorded_by_its_path_and_file_hashes(gpt2_pair):
    reference = CheckpointReference(open_weights(gpt2_pair.init_dir))
    try:
        assert torch.equal(reference.get(NAME), gpt2_pair.init_state[NAME])
        assert reference.infos()[NAME].shape == tuple(gpt2_pair.init_state[NAME].shape)
        record = reference.record()
        assert record.mode == "reference" and record.path == str(gpt2_pair.init_dir.resolve())
        [weights] = [item for item in record.files if item.file == "model.safetensors"]
        data = (gpt2_pair.init_dir / "model.safetensors").read_bytes()
        assert weights.sha256 == hashlib.sha256(data).hexdigest() and weights.bytes == len(data)
    finally:
        reference.close()


def test_a_seed_regenerates_the_init_its_recipe_records(gpt2_pair):
    config = gpt2_pair.config.to_dict()
    reference = seed_reference(config, gpt2_pair.init_seed)
    for name, tensor in gpt2_pair.init_state.items():  # make_pair's init: build_model under the same seed
        assert torch.equal(reference.get(name), tensor), name
    assert reference.aliases() == {"lm_head.weight"}  # the tie is kept: one storage, two names
    record = reference.record()
    assert record.mode == "seed" and record.recipe["seed"] == gpt2_pair.init_seed and record.recipe["dtype"] == "float32"
    assert record.recipe["config"] == config and record.recipe["torch"] == torch.__version__
    assert record.tensors == {name: sha256_tensor(t) for name, t in gpt2_pair.init_state.items()}
    # The recorded hashes are checked: another seed's init is refused, naming the tensors that differ.
    with pytest.raises(InitReferenceError, match=rf"regenerated from seed {gpt2_pair.init_seed + 1} differs"):
        seed_reference(config, gpt2_pair.init_seed + 1, expected_hashes=record.tensors)
    assert seed_reference(config, gpt2_pair.init_seed, expected_hashes=record.tensors).hashes() == record.tensors
    with pytest.raises(UsageError, match="cannot regenerate an init for model_type 'no-such-model'"):
        seed_reference({"model_type": "no-such-model"}, 0)


def test_held_tensors_are_checked_against_their_hashes_on_every_read():
    weight = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    tensors = {"w": weight.clone(), "b": torch.zeros(3)}
    hashes = {"w": sha256_tensor(weight)}  # "b" has no recorded hash: read as it is
    reference = TensorsReference(tensors, hashes, ReferenceRecord("embedded", file="init.safetensors", tensors=hashes),
                                 "init.safetensors")
    assert torch.equal(reference.get("w"), weight) and torch.equal(reference.get("b"), torch.zeros(3))
    assert reference.infos()["w"].shape == (4, 3) and reference.record().file == "init.safetensors"
    tensors["w"][2, 1] += 1e-3  # damaged after it was recorded
    with pytest.raises(InitReferenceError, match=r"init tensor 'w' does not match its recorded hash.*--embed-init"):
        reference.get("w")


def test_a_seed_given_beside_its_init_must_regenerate_it(gpt2_pair, tmp_path):
    seeded = seed_reference(gpt2_pair.config.to_dict(), gpt2_pair.init_seed)
    with open_weights(gpt2_pair.init_dir) as init:
        check_seed_matches(seeded, init, gpt2_pair.init_seed)
    other = build_model(gpt2_config(), gpt2_pair.init_seed + 1)
    other.save_pretrained(tmp_path / "other")
    with open_weights(tmp_path / "other") as init, pytest.raises(InitReferenceError, match="does not regenerate"):
        check_seed_matches(seeded, init, gpt2_pair.init_seed)
