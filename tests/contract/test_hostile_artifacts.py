"""Hostile and odd artifacts: a manifest edited by hand or damaged, tensors that disagree with it,
NaN in stored data, a tensor file swapped for another model's, a config.json that does not describe
the tensors or is missing, an init that lacks a tensor. Each is refused by the
real CLI under the bad-input contract (``expect_error``: one stderr line, non-zero exit, no
traceback, nothing written, inputs unchanged), and the untouched artifacts still pass.

And verify's error bound for 16-bit models: a fresh bfloat16 artifact whose update is small against
its weights verifies (the rounding of the rebuilt weight to bfloat16 is measured and allowed for),
while a tampered one still fails.

Every hostile artifact is a copy of one written by compress (tiny GPT-2 and LLaMA from conftest),
its manifest or tensors rewritten in place with safetensors.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from inrank_convert.core.tensors import checksum
from tests.conftest import ModelPair, build_model, gpt2_config, make_pair
from tests.helpers.cli_contract import expect_error, expect_ok

FACTORIZED = "transformer.h.0.mlp.c_fc.weight"  # lowrank in the GPT-2 artifact
DENSE = "transformer.ln_f.bias"  # stored dense
NORM = "transformer.ln_f.weight"  # stored dense


@dataclass
class Artifacts:
    root: Path
    gpt2: ModelPair
    artifact: Path  # gpt2.trained compressed against gpt2.init (bfloat16 factors)
    llama_artifact: Path  # another architecture's artifact


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Artifacts:
    root = tmp_path_factory.mktemp("hostile")
    gpt2, llama = make_pair(root, "gpt2"), make_pair(root, "llama")
    artifact, llama_artifact = root / "gpt2-artifact", root / "llama-artifact"
    # Float factors (--quantize none): the edits below plant NaN, Inf and scaled values in them.
    expect_ok(["compress", gpt2.trained_dir, "--init", gpt2.init_dir, "-o", artifact, "--quiet", "--quantize", "none"])
    expect_ok(["compress", llama.trained_dir, "--init", llama.init_dir, "-o", llama_artifact, "--quiet",
               "--quantize", "none"])
    manifest = read_manifest_json(artifact)
    assert manifest["tensors"][FACTORIZED]["kind"] == "lowrank"
    assert manifest["tensors"][DENSE]["kind"] == manifest["tensors"][NORM]["kind"] == "dense"
    return Artifacts(root, gpt2, artifact, llama_artifact)


def read_manifest_json(artifact: Path) -> dict:
    with safe_open(str(artifact / "inrank.safetensors"), framework="pt") as handle:
        return json.loads(handle.metadata()["inrank"])


def edited(source: Path, folder: Path, manifest_change: Callable[[dict], None] | None = None,
           tensors_change: Callable[[dict, dict], None] | None = None) -> Path:
    """A copy of the artifact ``source`` with its manifest JSON and/or its tensors changed and the file
    rewritten (tensors_change(tensors, manifest) may update checksums, so only the change is wrong)."""
    artifact = Path(shutil.copytree(source, folder))
    file = artifact / "inrank.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(file)
    manifest = json.loads(metadata["inrank"])
    if manifest_change is not None:
        manifest_change(manifest)
    if tensors_change is not None:
        tensors_change(tensors, manifest)
    metadata["inrank"] = json.dumps(manifest)  # NaN stays NaN: json writes it, a reader must refuse it
    save_file(tensors, file, metadata=metadata)
    return artifact


def entry(name: str) -> Callable[[dict], dict]:
    return lambda manifest: manifest["tensors"][name]


def _rank(manifest: dict) -> int:
    return manifest["tensors"][FACTORIZED]["rank"]


def _alias(of: str) -> Callable[[dict], None]:
    def change(manifest):
        shape = manifest["tensors"].get(of, {}).get("shape", [320, 64])
        manifest["tensors"]["lm_head.weight"] = {"kind": "alias", "of": of, "shape": shape, "dtype": "float32"}
    return change


def _alias_of_alias(manifest):
    _alias("transformer.wte.weight")(manifest)
    manifest["tensors"]["extra.weight"] = {"kind": "alias", "of": "lm_head.weight", "shape": [320, 64],
                                           "dtype": "float32"}


# (label, change to the manifest JSON, words the one error line must hold)
MANIFEST_EDITS = [
    ("no-kind", lambda m: entry(FACTORIZED)(m).pop("kind"), (f"tensors['{FACTORIZED}'].kind is missing",)),
    ("tensors-a-list", lambda m: m.update(tensors=list(m["tensors"])), ("tensors is a list, not an object",)),
    ("no-reference", lambda m: m.pop("reference"), ("reference is missing",)),
    ("no-source", lambda m: m.pop("source"), ("source is missing",)),
    ("no-rule", lambda m: m.pop("rule"), ("rule is missing",)),
    ("rank-a-string", lambda m: entry(FACTORIZED)(m).update(rank="4"), (".rank is \"4\", not a whole number",)),
    ("threshold-a-string", lambda m: m["rule"].update(threshold="0.9"),
     ("rule.threshold is \"0.9\", not a finite number",)),
    ("shape-of-strings", lambda m: entry(FACTORIZED)(m).update(shape=["64", "256"]), (".shape", "not a list of sizes")),
    ("energy-nan", lambda m: entry(FACTORIZED)(m).update(energy=math.nan), (".energy is NaN, not a finite number",)),
    ("seed-without-recipe", lambda m: m.update(reference={"mode": "seed"}), ("reference.recipe is missing",)),
    ("unknown-kind", lambda m: entry(FACTORIZED)(m).update(kind="sparse"), ("unknown tensor kind 'sparse'", FACTORIZED)),
    ("dangling-alias", _alias("nope.weight"), ("'lm_head.weight' points at 'nope.weight'", "lacks")),
    ("self-alias", _alias("lm_head.weight"), ("'lm_head.weight' points at itself",)),
    ("alias-of-alias", _alias_of_alias, ("'extra.weight' points at 'lm_head.weight', itself an alias",)),
    ("rank-too-small", lambda m: entry(FACTORIZED)(m).update(rank=_rank(m) - 1), (f"{FACTORIZED}.lora_B", "needs")),
    ("rank-too-large", lambda m: entry(FACTORIZED)(m).update(rank=10**9), ("rank 1000000000", f"{FACTORIZED}.lora_B")),
    ("factor-shape", lambda m: entry(FACTORIZED)(m).update(shape=[64, 128]), (f"{FACTORIZED}.lora_A", "[64, 128]")),
    ("dense-shape", lambda m: entry(DENSE)(m).update(shape=[32]), (f"'{DENSE}' is F32 [64]", "needs F32 [32]")),
    ("dense-dtype", lambda m: entry(DENSE)(m).update(dtype="float16"), (f"'{DENSE}' is F32", "needs F16")),
    ("checksum-of-nothing", lambda m: m["checksums"].update({"ghost.weight": "00" * 32}),
     ("checksum for 'ghost.weight'", "lacks")),
]


@pytest.mark.parametrize("label, change, says", MANIFEST_EDITS, ids=[case[0] for case in MANIFEST_EDITS])
def test_a_hostile_manifest_is_refused_at_open(made, tmp_path, label, change, says):
    """Validated once, when the artifact is opened (the header alone): every command refuses it."""
    artifact = edited(made.artifact, tmp_path / label, change)
    inputs = (artifact, made.root)
    for args in (["inspect", artifact], ["verify", artifact]):
        line = expect_error(args, says=(*says, "inrank.safetensors"), inputs=inputs)
        assert "damaged" in line or "unknown" in line, line
    out = tmp_path / "dense"
    expect_error(["decompress", artifact, "-o", out], says=says, output=out, inputs=inputs)
    adapter = tmp_path / "adapter"
    expect_error(["export-peft", artifact, "-o", adapter], says=says, output=adapter, inputs=inputs)


def test_a_stored_tensor_the_manifest_does_not_list_is_refused(made, tmp_path):
    def add(tensors, manifest):
        tensors["stowaway.weight"] = torch.ones(3)

    artifact = edited(made.artifact, tmp_path / "extra", tensors_change=add)
    expect_error(["verify", artifact], says=("'stowaway.weight'", "does not list"), inputs=(artifact,))


def _poison(name: str, value: float) -> Callable[[dict, dict], None]:
    """Put NaN/Inf into stored tensor ``name`` and record its new checksum (only the value is wrong)."""
    def change(tensors, manifest):
        tensor = tensors[name].clone()
        tensor.view(-1)[0] = value
        tensors[name] = tensor
        manifest["checksums"][name] = checksum(tensor)
    return change


@pytest.mark.parametrize("stored, value", [(f"{FACTORIZED}.lora_B", math.nan), (f"{FACTORIZED}.lora_A", math.inf),
                                           (NORM, -math.inf)], ids=["nan-factor-B", "inf-factor-A", "inf-dense"])
def test_non_finite_stored_data_is_refused_where_it_is_read(made, tmp_path, stored, value):
    """NaN/Inf cannot be seen in the header; verify, decompress and export-peft find it where they
    read the tensor and write nothing."""
    artifact = edited(made.artifact, tmp_path / "poisoned", tensors_change=_poison(stored, value))
    inputs = (artifact, made.root)
    line = expect_error(["verify", artifact], says=(f"'{stored}'", "NaN or Inf"), inputs=inputs)
    assert line.startswith("error: verification failed")
    out = tmp_path / "dense"
    expect_error(["decompress", artifact, "-o", out], says=(f"'{stored}'", "NaN or Inf"), output=out, inputs=inputs)
    adapter = tmp_path / "adapter"
    expect_error(["export-peft", artifact, "-o", adapter], says=(f"'{stored}'", "NaN or Inf"), output=adapter,
                 inputs=inputs)


def test_a_tensor_file_of_another_architecture_is_refused(made, tmp_path):
    """LLaMA's inrank.safetensors put into the GPT-2 artifact folder: self-consistent (manifest and
    tensors agree), but not the model config.json describes."""
    artifact = Path(shutil.copytree(made.artifact, tmp_path / "swapped"))
    shutil.copyfile(made.llama_artifact / "inrank.safetensors", artifact / "inrank.safetensors")
    inputs = (artifact, made.root)
    says = ("has no place in the gpt2 model of config.json", "model.")
    line = expect_error(["verify", artifact], says=says, inputs=inputs)
    assert line.startswith("error: verification failed")
    out = tmp_path / "dense"
    expect_error(["decompress", artifact, "-o", out], says=says, output=out, inputs=inputs)
    adapter = tmp_path / "adapter"
    expect_error(["export-peft", artifact, "-o", adapter], says=says, output=adapter, inputs=inputs)


def test_a_config_whose_model_needs_a_tensor_the_artifact_lacks_is_refused(made, tmp_path):
    """config.json with untied embeddings: the model needs its own lm_head.weight, which the GPT-2
    artifact (tied, saved without it) does not hold; from_pretrained would initialize it at random."""
    artifact = Path(shutil.copytree(made.artifact, tmp_path / "untied"))
    config = json.loads((artifact / "config.json").read_text())
    (artifact / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    says = ("lm_head.weight", "at random")
    expect_error(["verify", artifact], says=says, inputs=(artifact,))
    out = tmp_path / "dense"
    expect_error(["decompress", artifact, "-o", out], says=says, output=out, inputs=(artifact, made.root))


def test_an_artifact_without_config_is_verified_but_not_decompressed(made, tmp_path):
    """Without config.json (an artifact compressed from a bare weights file) the folder decompress
    would write cannot be loaded: it refuses. verify still checks what it can, and says so."""
    artifact = Path(shutil.copytree(made.artifact, tmp_path / "no-config"))
    (artifact / "config.json").unlink()
    out = tmp_path / "dense"
    expect_error(["decompress", artifact, "-o", out], says=("no config.json", "config.json in the artifact folder"),
                 output=out, inputs=(artifact, made.root))
    result = json.loads(expect_ok(["verify", artifact, "--json"]).stdout)
    assert result["ok"] and not result["model_checked"] and "no config.json" in result["model"]


def test_the_untouched_artifact_passes_every_command(made, tmp_path):
    """The edited copies above fail because of their edit."""
    artifact = Path(shutil.copytree(made.artifact, tmp_path / "intact"))
    result = json.loads(expect_ok(["verify", artifact, "--json"]).stdout)
    assert result["ok"] and result["model_checked"] and result["model_ok"] and result["source_checked"]
    expect_ok(["decompress", artifact, "-o", tmp_path / "dense", "--quiet"])
    expect_ok(["export-peft", artifact, "-o", tmp_path / "adapter"])


def _init_without(made: Artifacts, folder: Path, name: str) -> Path:
    init = Path(shutil.copytree(made.gpt2.init_dir, folder))
    state = load_file(init / "model.safetensors")
    del state[name]
    save_file(state, init / "model.safetensors", metadata={"format": "pt"})
    return init


def test_an_init_that_lacks_a_tensor_is_refused(made, tmp_path):
    init = _init_without(made, tmp_path / "init", FACTORIZED)
    inputs = (made.artifact, init)
    says = (f"init lacks tensor '{FACTORIZED}'", str(init), "--init")
    expect_error(["verify", made.artifact, "--init", init], says=says, inputs=inputs)
    out = tmp_path / "dense"
    expect_error(["decompress", made.artifact, "--init", init, "-o", out], says=says, output=out, inputs=inputs)


def test_an_init_of_another_size_is_refused(made, tmp_path):
    narrow = tmp_path / "narrow-init"
    build_model(gpt2_config(n_embd=32), seed=7).save_pretrained(narrow)
    says = ("init tensor", "has shape [32, 96], the artifact needs [64, 192]", str(narrow))
    expect_error(["verify", made.artifact, "--init", narrow], says=says, inputs=(made.artifact, narrow))
    out = tmp_path / "dense"
    expect_error(["decompress", made.artifact, "--init", narrow, "-o", out], says=says, output=out,
                 inputs=(made.artifact, narrow))


def test_a_source_that_lacks_a_tensor_is_refused(made, tmp_path):
    source = _init_without(made, tmp_path / "source", FACTORIZED)
    shutil.copyfile(made.gpt2.trained_dir / "config.json", source / "config.json")
    expect_error(["verify", made.artifact, "--source", source], says=(f"source lacks tensor '{FACTORIZED}'", "--source"),
                 inputs=(made.artifact, source))


# --------------------------------------------------------------------------- verify's bound in 16-bit models


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(artifact, trained, init): a bfloat16 GPT-2 whose update is 3% of its weights' norm, compressed
    at the default threshold 0.9. Rebuilding W_ref + B @ A and rounding it to bfloat16 adds an error of
    up to 2^-8 of each weight: several percent of so small an update."""
    root = tmp_path_factory.mktemp("bf16")
    pair = make_pair(root, "gpt2")
    init, trained = {}, {}
    for name, tensor in load_file(pair.trained_dir / "model.safetensors").items():
        base = pair.init_state[name]
        init[name] = base.to(torch.bfloat16).contiguous()
        trained[name] = (base + 0.1 * (tensor - base)).to(torch.bfloat16).contiguous()
    folders = []
    for label, state in (("init", init), ("trained", trained)):
        folder = Path(shutil.copytree(pair.trained_dir, root / f"bf16-{label}"))
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    artifact = root / "artifact"
    expect_ok(["compress", folders[1], "--init", folders[0], "-o", artifact, "--quiet"])
    return artifact, folders[1], folders[0]


def test_a_fresh_bfloat16_artifact_verifies(bf16):
    artifact, _, _ = bf16
    result = json.loads(expect_ok(["verify", artifact, "--json"]).stdout)
    assert result["ok"] and result["source_checked"], result
    factorized = [layer for layer in result["layers"] if layer["kind"] == "lowrank"]
    assert factorized
    for layer in factorized:
        assert layer["rounding_error"] > 0
        assert layer["measured_error"] <= layer["expected_error"] + layer["rounding_error"] + 1e-6, layer
    # The rounding is why it passes: the recorded error alone is exceeded by more than verify's
    # tolerance (1% + 1e-3) in at least one layer: without the rounding term it would fail.
    assert any(layer["measured_error"] > layer["expected_error"] * 1.01 + 1e-3 for layer in factorized), factorized
    dense = [layer for layer in result["layers"] if layer["kind"] == "dense"]
    assert dense and all(layer["rounding_error"] == 0.0 == layer["measured_error"] for layer in dense)


def _scale_factor(name: str, factor: float) -> Callable[[dict, dict], None]:
    def change(tensors, manifest):
        key = name + ".lora_B"
        tensors[key] = (tensors[key].float() * factor).to(tensors[key].dtype)
        manifest["checksums"][key] = checksum(tensors[key])
    return change


def test_a_tampered_bfloat16_artifact_still_fails(bf16, tmp_path):
    """Factors changed by 30% with their checksum updated: the reconstruction error exceeds the
    recorded one plus the measured rounding. Against its recorded source the fix is to compress
    again; against another --source, to check that checkpoint (compress cannot help)."""
    artifact, trained, init = bf16
    tampered = edited(artifact, tmp_path / "tampered", tensors_change=_scale_factor(FACTORIZED, 1.3))
    inputs = (tampered, trained, init)
    line = expect_error(["verify", tampered], says=("reconstruction error above", FACTORIZED, "re-run compress"),
                        inputs=inputs)
    assert line.startswith("error: verification failed")
    other = trained.parent / "bf16-init"  # the right shapes, not the checkpoint it was compressed from
    line = expect_error(["verify", artifact, "--source", other], says=("reconstruction error above", "--source"),
                        inputs=(artifact, other))
    assert "re-run compress" not in line


def test_a_budget_artifact_with_dropped_layers_verifies(made, tmp_path):
    """A size budget near its minimum gives some layers rank 0 (kind zero, energy 0: the whole update
    dropped). Their recorded bound is sqrt(1 - energy) = 1, as for any truncation; it used to be 0,
    so such a fresh artifact failed verify."""
    artifact = tmp_path / "budget"
    expect_ok(["compress", made.gpt2.trained_dir, "--init", made.gpt2.init_dir, "-o", artifact,
               "--target-ratio", "0.056", "--quantize", "none", "--quiet"])
    dropped = [name for name, values in read_manifest_json(artifact)["tensors"].items()
               if values["kind"] == "zero" and values["energy"] == 0.0]
    assert dropped
    result = json.loads(expect_ok(["verify", artifact, "--json"]).stdout)
    layers = {layer["name"]: layer for layer in result["layers"]}
    assert result["ok"] and result["source_checked"]
    for name in dropped:
        assert layers[name]["expected_error"] == 1.0 and layers[name]["measured_error"] == pytest.approx(1.0)
