"""Artifacts in the format the first writer produced (version 1, manifest as a plain dict) keep working.

The artifact here is written by hand, from the format description (README "The artifact (format
version 1)") and the old writer (``build_manifest`` / ``LayerResult.manifest_entry`` in compress.py,
``new_manifest`` in artifact.py, ``model_artifact`` / ``save_checkpoint`` in train_state.py, before
the typed Manifest): ``safetensors.torch.save_file`` with ``metadata={"format": "pt", "inrank": json}``.
None of inrank_convert's writing code is used, so a change in what the reader accepts shows here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from inrank_convert import LowRankLinear, load_compressed
from inrank_convert.artifact import Manifest, read_manifest
from inrank_convert.cli import app

LOWRANK = {"transformer.h.0.mlp.c_fc.weight": 2, "transformer.h.0.attn.c_attn.weight": 3}  # name -> rank
ZERO = "transformer.h.0.attn.c_proj.weight"
ALIAS = ("lm_head.weight", "transformer.wte.weight")


def tiny_gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0)


def raw_sha256(tensor: torch.Tensor) -> str:
    """What the old writer recorded in ``checksums``: sha256 of the tensor's bytes as stored."""
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def file_record(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


@dataclass
class OldArtifact:
    path: Path
    trained_dir: Path
    config: object
    dense_state: dict[str, torch.Tensor]  # what the artifact stands for (lm_head tied to wte)
    manifest: dict  # the literal dict stored in the header


def write_old_artifact(tmp_path: Path, reference_mode: str) -> OldArtifact:
    from transformers import AutoModelForCausalLM

    config = tiny_gpt2_config()
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_config(config)
    init_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    names = list(init_state)
    generator = torch.Generator().manual_seed(5)

    init_dir = tmp_path / "init"
    if reference_mode == "reference":
        init_dir.mkdir()
        config.save_pretrained(init_dir)
        save_file({n: t for n, t in init_state.items() if n != ALIAS[0]}, str(init_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        reference = {"mode": "reference", "path": str(init_dir.resolve()),
                     "files": [file_record(init_dir / "model.safetensors")]}
        base = init_state
    else:
        reference = {"mode": "zero"}
        base = {name: torch.zeros_like(tensor) for name, tensor in init_state.items()}

    stored: dict[str, torch.Tensor] = {}
    dense_state: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name in names:
        tensor = init_state[name]
        shape, nbytes = list(tensor.shape), tensor.numel() * 4
        if name == ALIAS[0]:
            entries[name] = {"kind": "alias", "of": ALIAS[1], "shape": shape, "dtype": "float32"}
            dense_state[name] = dense_state[ALIAS[1]]
        elif name in LOWRANK:
            rank = LOWRANK[name]
            B = torch.randn(shape[0], rank, generator=generator) * 0.3
            A = torch.randn(rank, shape[1], generator=generator) * 0.3
            stored[name + ".lora_B"], stored[name + ".lora_A"] = B, A
            dense_state[name] = base[name].float() + B @ A
            entries[name] = {"kind": "lowrank", "shape": shape, "dtype": "float32", "rank": rank, "energy": 1.0,
                             "bytes": B.nbytes + A.nbytes, "original_bytes": nbytes, "svd": "exact"}
        elif name == ZERO:
            dense_state[name] = base[name].clone()
            entries[name] = {"kind": "zero", "shape": shape, "dtype": "float32", "rank": 0, "energy": 1.0,
                             "bytes": 0, "original_bytes": nbytes, "svd": "exact"}
        else:
            trained = tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
            stored[name] = dense_state[name] = trained
            entries[name] = {"kind": "dense", "shape": shape, "dtype": "float32", "rank": None, "energy": 1.0,
                             "bytes": nbytes, "original_bytes": nbytes, "svd": None}

    trained_dir = tmp_path / "trained"
    trained_dir.mkdir()
    config.save_pretrained(trained_dir)
    save_file({n: t for n, t in dense_state.items() if n != ALIAS[0]}, str(trained_dir / "model.safetensors"),
              metadata={"format": "pt"})

    manifest = {
        "format": "inrank-convert", "version": 1, "tool_version": "0.1.0", "created": "2025-01-02T03:04:05+00:00",
        "source": {"path": str(trained_dir.resolve()), "kind": "safetensors", "run": None,
                   "files": [file_record(trained_dir / "model.safetensors")]},
        "reference": reference,
        "rule": {"criterion": "energy", "threshold": 0.9, "rank": None},
        "svd": {"engine": "auto", "device": "cpu", "float64": False, "seed": 0},
        "factor_dtype": None, "embeddings": True, "include": [], "exclude": [],
        "original_bytes": sum(t.numel() * 4 for n, t in init_state.items() if n != ALIAS[0]),
        "tensors": entries,
        "checksums": {name: raw_sha256(tensor) for name, tensor in stored.items()},
    }
    path = tmp_path / "artifact"
    path.mkdir()
    config.save_pretrained(path)
    save_file(stored, str(path / "inrank.safetensors"), metadata={"format": "pt", "inrank": json.dumps(manifest)})
    return OldArtifact(path, trained_dir, config, dense_state, manifest)


@pytest.fixture(params=["zero", "reference"])
def old(request, tmp_path) -> OldArtifact:
    return write_old_artifact(tmp_path, request.param)


def key_paths(value, prefix: str = "") -> set[str]:
    """Every key of a nested JSON dict, as dotted paths."""
    if not isinstance(value, dict):
        return set()
    paths = set()
    for key, item in value.items():
        paths.add(prefix + key)
        paths |= key_paths(item, prefix + key + ".")
    return paths


def test_old_manifest_is_read(old):
    manifest = read_manifest(old.path)
    assert list(manifest.tensors) == list(old.manifest["tensors"])
    kinds = {name: entry.kind for name, entry in manifest.tensors.items()}
    assert {kinds[name] for name in LOWRANK} == {"lowrank"} and kinds[ZERO] == "zero"
    assert {"lowrank", "dense", "zero", "alias"} == set(kinds.values())
    assert manifest.aliases() == {ALIAS[0]: ALIAS[1]}
    assert {name: manifest.tensors[name].rank for name in LOWRANK} == LOWRANK
    assert manifest.checksums == old.manifest["checksums"] and len(manifest.checksums) == 2 * len(LOWRANK) + 13
    assert manifest.reference.mode == old.manifest["reference"]["mode"]
    assert manifest.original_bytes == old.manifest["original_bytes"]


def test_old_manifest_keeps_every_key(old):
    raw = old.manifest
    again = Manifest.from_json(json.loads(json.dumps(raw))).to_json()
    lost = key_paths(raw) - key_paths(again)
    assert not lost, f"keys of the old manifest dropped: {sorted(lost)}"
    assert again["checksums"] == raw["checksums"]
    assert again == raw


def run_cli(*args) -> dict:
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def test_old_artifact_inspects_and_verifies(old):
    inspected = run_cli("inspect", old.path, "--json")
    assert inspected["version"] == 1 and inspected["reference"] == old.manifest["reference"]["mode"]
    assert inspected["tied"] == {ALIAS[0]: ALIAS[1]}
    assert inspected["original_bytes"] == old.manifest["original_bytes"]
    assert [layer["name"] for layer in inspected["layers"]] == [n for n in old.manifest["tensors"] if n != ALIAS[0]]

    verified = run_cli("verify", old.path, "--json")
    assert verified["ok"] and verified["checksums_ok"] and verified["reference_ok"], verified
    assert verified["source_checked"], verified["source"]  # the recorded source is found, hashes unchanged
    layers = verified["layers"]
    assert {layer["name"] for layer in layers} == {n for n in old.manifest["tensors"] if n != ALIAS[0]}
    for layer in layers:
        assert layer["measured_error"] <= 1e-6, layer


def test_old_artifact_verify_catches_a_changed_factor(old):
    """The old checksums are really checked: change one stored factor and verify fails."""
    from safetensors import safe_open

    file = old.path / "inrank.safetensors"
    with safe_open(str(file), "pt") as handle:
        stored = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata()
    name = "transformer.h.0.mlp.c_fc.weight.lora_A"
    stored[name] = stored[name].clone()
    stored[name][0, 0] += 1.0
    save_file(stored, str(file), metadata=metadata)
    result = CliRunner().invoke(app, ["verify", str(old.path), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["bad_checksums"] == [name]


def test_old_artifact_loads_and_runs_like_the_dense_model(old):
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_config(old.config)
    dense.load_state_dict(old.dense_state, strict=True)
    dense.eval()
    compressed = load_compressed(old.path)
    layers = {name for name, module in compressed.named_modules() if isinstance(module, LowRankLinear)}
    assert layers == {name.removesuffix(".weight") for name in LOWRANK}
    ids = torch.randint(0, old.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense(ids).logits
        got = compressed(ids).logits
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reference", [
    {"mode": "zero"},
    {"mode": "reference", "path": "/models/init", "files": [{"file": "model.safetensors", "bytes": 10, "sha256": "aa" * 32}]},
    {"mode": "seed", "recipe": {"library": "transformers", "auto_class": "AutoModelForCausalLM", "seed": 3,
                                "dtype": "float32", "config": {"model_type": "gpt2"}, "torch": "2.5.0",
                                "transformers": "4.46.0"}, "tensors": {"w": "bb" * 32}},
    {"mode": "embedded", "file": "init.safetensors", "tensors": {"w": "cc" * 32},
     "source": {"mode": "reference", "path": "/models/init", "files": []}},
], ids=["zero", "reference", "seed", "embedded"])
def test_old_training_checkpoint_manifest_round_trips(reference):
    """The old train_state.save_checkpoint layout: source kind "training", a training record, no svd keys."""
    raw = {
        "format": "inrank-convert", "version": 1, "tool_version": "0.1.0", "created": "2025-01-02T03:04:05+00:00",
        "source": {"path": "/runs/r", "kind": "training", "run": "/runs/r", "files": []},
        "reference": reference, "rule": {"criterion": "inrank", "threshold": 0.9, "rank": None},
        "training": {"step": 12, "mode": "inrank"}, "original_bytes": 96,
        "tensors": {"w": {"kind": "lowrank", "shape": [4, 6], "dtype": "float32", "rank": 2, "energy": 1.0,
                          "bytes": 80, "original_bytes": 96, "svd": None},
                    "b": {"kind": "dense", "shape": [4], "dtype": "float32", "rank": None, "energy": 1.0,
                          "bytes": 16, "original_bytes": 16, "svd": None}},
        "checksums": {"w.lora_B": "01" * 32, "w.lora_A": "02" * 32, "b": "03" * 32},
    }
    manifest = Manifest.from_json(json.loads(json.dumps(raw)))
    assert manifest.source.is_training and manifest.training.step == 12
    assert manifest.reference.mode == reference["mode"]
    again = manifest.to_json()
    assert not key_paths(raw) - key_paths(again)
    assert again == raw


def test_old_artifact_resumes_training(old, tmp_path):
    """resume starts InRank training from a version-1 artifact's factors: step 0 is its model."""
    import random

    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models

    from inrank_convert.training.entrypoints import resume
    from inrank_convert.weights.run_folder import read_metrics

    words = [f"w{i}" for i in range(old.config.vocab_size - 1)]  # every id inside the tiny vocabulary
    tokenizer = Tokenizer(tokenizer_models.WordLevel({word: i for i, word in enumerate(["[UNK]", *words])},
                                                     unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tokenizer").mkdir()
    tokenizer.save(str(tmp_path / "tokenizer" / "tokenizer.json"))
    text = tmp_path / "text.txt"
    generator = random.Random(0)
    text.write_text(" ".join(generator.choice(words) for _ in range(600)) + "\n")

    result = resume(old.path, tmp_path / "run", {"data": str(text), "steps": 3, "batch_size": 2, "block_size": 8,
                                                 "tokenizer": str(tmp_path / "tokenizer"), "buffer": 1,
                                                 "rank_warmup": 1, "rank_every": 1, "log_every": 1, "lr": 1e-3})
    assert result.step == 3 and not result.interrupted
    assert set(result.ranks) == {name.removesuffix(".weight") for name in LOWRANK} | {ZERO.removesuffix(".weight")}
    assert all(result.ranks[name.removesuffix(".weight")] >= rank for name, rank in LOWRANK.items())
    records = read_metrics(tmp_path / "run")
    assert [record["step"] for record in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(record["loss"])) for record in records)
    assert read_manifest(tmp_path / "run" / "step-3").version == 2  # its checkpoints are written in version 2
