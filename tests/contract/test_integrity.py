"""The reference is what the artifact says it is, and nothing non-finite passes: an ``--init`` of the
right shapes but other values (another seed), given in place of a recorded path or seed reference;
a manifest whose checksums were removed; finite factors whose product overflows the tensor's dtype.
Each through the real CLI under the bad-input contract (``expect_error``), the library's loader too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from inrank_convert.core.errors import InrankError
from inrank_convert.core.tensors import checksum
from inrank_convert.runtime.modeling import load_compressed
from tests.conftest import build_model, make_pair
from tests.contract.test_hostile_artifacts import FACTORIZED, edited
from tests.helpers.cli_contract import expect_error, expect_ok, run_json


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(root, pair, artifact, other_init): the GPT-2 pair compressed against its init by path, and an
    init of the same architecture and shapes from another seed."""
    root = tmp_path_factory.mktemp("integrity")
    pair = make_pair(root, "gpt2")
    artifact = root / "artifact"
    expect_ok(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", artifact, "--quiet"])
    other = root / "other-init"
    build_model(pair.config, seed=pair.init_seed + 1).save_pretrained(other)
    return root, pair, artifact, other


def _every_reader_refuses(artifact: Path, init: Path, tmp_path: Path, says: tuple, inputs: tuple) -> None:
    line = expect_error(["verify", artifact, "--init", init], says=says, inputs=inputs)
    assert line.startswith("error: verification failed")
    out = tmp_path / "dense"
    expect_error(["decompress", artifact, "--init", init, "-o", out], says=says, output=out, inputs=inputs)
    adapter = tmp_path / "adapter"
    expect_error(["export-peft", artifact, "--init", init, "-o", adapter], says=says, output=adapter, inputs=inputs)
    with pytest.raises(InrankError, match="not the one this artifact was compressed against|recorded hash"):
        load_compressed(artifact, init=init)  # what generate, report and evaluate load through


def test_another_init_of_the_same_shapes_is_refused(made, tmp_path):
    root, pair, artifact, other = made
    says = ("not the one this artifact was compressed against", str(other), str(pair.init_dir), "--init")
    _every_reader_refuses(artifact, other, tmp_path, says, (artifact, other, root))


def test_another_init_is_refused_when_the_recorded_one_has_moved(made, tmp_path):
    """The recorded init gone: --init is the only reference, and it must still be the recorded one."""
    root, pair, artifact, other = made
    moved = Path(shutil.copytree(artifact, tmp_path / "artifact"))
    init = Path(shutil.move(shutil.copytree(pair.init_dir, tmp_path / "init"), tmp_path / "init-moved"))
    # The true init, renamed and moved: accepted (the same files by sha256).
    assert run_json(["verify", moved, "--init", init, "--json"])["reference_ok"]
    _every_reader_refuses(moved, other, tmp_path, ("not the one", str(other)), (moved, other, init))


def test_another_init_for_a_seed_reference_is_refused(made, tmp_path):
    """A seed reference (--init-seed) given --init: the recorded per-tensor hashes decide."""
    root, pair, artifact, other = made
    seeded = tmp_path / "seeded"
    expect_ok(["compress", pair.trained_dir, "--init-seed", pair.init_seed, "-o", seeded, "--quiet"])
    assert json.loads(expect_ok(["verify", seeded, "--init", pair.init_dir, "--json"]).stdout)["ok"]
    says = ("does not match its recorded hash", str(other), "--init")
    line = expect_error(["verify", seeded, "--init", other], says=says, inputs=(seeded, other, root))
    assert line.startswith("error: verification failed")
    out = tmp_path / "dense"
    expect_error(["decompress", seeded, "--init", other, "-o", out], says=says, output=out, inputs=(seeded, other))


@pytest.mark.parametrize("how", ["deleted", "null", "one-missing"])
def test_an_artifact_without_its_checksums_is_refused(made, tmp_path, how):
    """Checksums removed, then a factor changed: without the check, verify said "checksums: ok"."""
    _, _, artifact, _ = made

    def drop(manifest):
        if how == "deleted":
            del manifest["checksums"]
        elif how == "null":
            manifest["checksums"] = None
        else:
            del manifest["checksums"][f"{FACTORIZED}.lora_B"]

    def change(tensors, manifest):
        key = f"{FACTORIZED}.lora_B"
        tensors[key] = -tensors[key]  # int8 (the default storage) stays int8

    damaged = edited(artifact, tmp_path / "damaged", manifest_change=drop, tensors_change=change)
    says = ("lacks the checksum of stored tensor", "inrank.safetensors")
    expect_error(["verify", damaged], says=says, inputs=(damaged,))
    out = tmp_path / "dense"
    expect_error(["decompress", damaged, "-o", out], says=says, output=out, inputs=(damaged,))


@pytest.fixture(scope="module")
def bf16_artifact(made, tmp_path_factory):
    """The GPT-2 pair in bfloat16, compressed (factors stored in bfloat16)."""
    root, pair, _, _ = made
    folder = tmp_path_factory.mktemp("bf16")
    folders = {}
    for label, source in (("init", pair.init_dir), ("trained", pair.trained_dir)):
        target = Path(shutil.copytree(source, folder / label))
        state = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in
                 load_file(target / "model.safetensors").items()}
        save_file(state, target / "model.safetensors", metadata={"format": "pt"})
        folders[label] = target
    artifact = folder / "artifact"
    expect_ok(["compress", folders["trained"], "--init", folders["init"], "-o", artifact, "--quiet",
               "--quantize", "none"])
    return artifact, folders


def test_finite_factors_whose_product_overflows_are_refused(bf16_artifact, tmp_path):
    """B[:, 0] = 3e38 and A[0] = 2 are finite bfloat16s, and so is every stored number; W_ref + B @ A
    is not (it overflows bfloat16 and float32 alike). verify
    fails (its errors are not finite), decompress and export-peft write nothing."""
    artifact, folders = bf16_artifact

    def overflow(tensors, manifest):
        for suffix, value in (("lora_B", 3e38), ("lora_A", 2.0)):  # W[0, j] = 3e38 * 2 * rank + ...
            key = f"{FACTORIZED}.{suffix}"
            tensor = tensors[key].clone()
            tensor[:, 0] = value if suffix == "lora_B" else tensor[:, 0]
            tensor[0] = value if suffix == "lora_A" else tensor[0]
            assert torch.isfinite(tensor).all()
            tensors[key] = tensor
            manifest["checksums"][key] = checksum(tensor)

    poisoned = edited(artifact, tmp_path / "overflow", tensors_change=overflow)
    inputs = (poisoned, *folders.values())
    says = (FACTORIZED, "overflows", "Inf")
    line = expect_error(["verify", poisoned], says=says, inputs=inputs)
    assert line.startswith("error: verification failed")
    out = tmp_path / "dense"
    expect_error(["decompress", poisoned, "-o", out], says=says, output=out, inputs=inputs)
    adapter = tmp_path / "adapter"
    expect_error(["export-peft", poisoned, "-o", adapter], says=says, output=adapter, inputs=inputs)
    with pytest.raises(InrankError, match="overflows"):
        load_compressed(poisoned)  # its LowRankLinear never forms the weight: the bound is checked


@pytest.mark.parametrize("suffix", [".lora_scale", ".lora_A_scale"])
def test_a_non_finite_quantization_scale_is_refused(made, tmp_path, suffix):
    """The default artifact stores int8 factors with float32 scales, ``--quantize int4`` group-wise
    bfloat16 ones: a NaN scale (checksum updated, so only the value is wrong) is found, by its own
    name, where verify and decompress read it."""
    root, pair, artifact, _ = made
    if suffix == ".lora_A_scale":
        artifact = root / "int4"
        if not artifact.exists():
            expect_ok(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", artifact, "--quantize", "int4",
                       "--quiet"])
    names = [name for name in load_file(artifact / "inrank.safetensors") if name.endswith(suffix)]
    assert names, f"the artifact has no {suffix} (is int8 still the default storage?)"

    def poison(tensors, manifest):
        tensor = tensors[names[0]].clone()
        tensor.view(-1)[0] = float("nan")
        tensors[names[0]] = tensor
        manifest["checksums"][names[0]] = checksum(tensor)

    poisoned = edited(artifact, tmp_path / "poisoned", tensors_change=poison)
    expect_error(["verify", poisoned], says=(f"'{names[0]}'", "NaN or Inf"), inputs=(poisoned,))
    out = tmp_path / "dense"
    expect_error(["decompress", poisoned, "-o", out], says=(f"'{names[0]}'", "NaN or Inf"), output=out,
                 inputs=(poisoned,))
