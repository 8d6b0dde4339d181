"""An artifact in the format the first writer produced (version 1, manifest as a plain dict), for the
tests that it keeps working (conftest's ``old``: artifact/, measure/, runtime/, training/).

The artifact is written by hand, from the format description (docs/artifact-format.md, "Version
1") and the old writer (``build_manifest`` / ``LayerResult.manifest_entry`` in compress.py,
``new_manifest`` in artifact.py, ``model_artifact`` / ``save_checkpoint`` in train_state.py, before
the typed Manifest): ``safetensors.torch.save_file`` with ``metadata={"format": "pt", "inrank": json}``.
None of inrank_convert's writing code is used, so a change in what the reader accepts shows here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

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


def key_paths(value, prefix: str = "") -> set[str]:
    """Every key of a nested JSON dict, as dotted paths."""
    if not isinstance(value, dict):
        return set()
    paths = set()
    for key, item in value.items():
        paths.add(prefix + key)
        paths |= key_paths(item, prefix + key + ".")
    return paths


