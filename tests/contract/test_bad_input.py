"""Bad inputs through the real CLI: each one exits non-zero with exactly one clear line on stderr,
writes nothing (no output folder, no leftover ``.inrank-tmp-*``) and leaves every input as it was.

Every case goes through ``expect_error``, which checks that whole contract; the models are tiny
real GPT-2 / LLaMA checkpoints from conftest, made once per module and copied where a test
changes them.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from inrank_convert.artifact import FORMAT_VERSION, read_manifest
from inrank_convert.linalg.criteria import DEFAULT_THRESHOLD
from tests.conftest import ModelPair, build_model, gpt2_config, make_pair, snapshot
from tests.helpers.cli_contract import expect_error, expect_ok, signalled_cli, temps_beside
from tests.helpers.rows import plant_rows


class Gadget:
    """A custom class: a pickle holding one of these needs more than ``weights_only`` to load."""

    def __init__(self):
        self.payload = "anything"


# --------------------------------------------------------------------------- inputs


@dataclass
class Models:
    root: Path
    gpt2: ModelPair
    llama: ModelPair
    narrow_init: Path  # a GPT-2 with n_embd 32 (the pair's is 64)
    artifact: Path  # gpt2.trained compressed against gpt2.init (--init)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("bad-input-models")
    gpt2 = make_pair(root, "gpt2")
    llama = make_pair(root, "llama")
    narrow_init = root / "gpt2-narrow"
    build_model(gpt2_config(n_embd=32), seed=7).save_pretrained(narrow_init)
    artifact = root / "gpt2-artifact"
    expect_ok(["compress", gpt2.trained_dir, "--init", gpt2.init_dir, "-o", artifact, "--quiet"])
    return Models(root, gpt2, llama, narrow_init, artifact)


def copy_pair(models: Models, tmp_path: Path) -> tuple[Path, Path]:
    """Private copies of the GPT-2 (trained, init) folders, for tests that change or name them as -o."""
    trained = shutil.copytree(models.gpt2.trained_dir, tmp_path / "trained")
    init = shutil.copytree(models.gpt2.init_dir, tmp_path / "init")
    return Path(trained), Path(init)


def compressed_copy(models: Models, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(artifact, trained, init): a fresh artifact made against a private copy of the init."""
    trained, init = copy_pair(models, tmp_path)
    artifact = tmp_path / "artifact"
    expect_ok(["compress", trained, "--init", init, "-o", artifact, "--quiet"])
    return artifact, trained, init


def model_with(models: Models, folder: Path, name: str, value: float, source: Path | None = None) -> Path:
    """A copy of a model folder whose tensor ``name`` holds ``value`` in one element."""
    source = source or models.gpt2.trained_dir
    shutil.copytree(source, folder)
    state = load_file(folder / "model.safetensors")
    tensor = state[name].clone()
    tensor.view(-1)[1] = value
    state[name] = tensor
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def break_file(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        file.write_bytes(random.Random(0).randbytes(len(data)))
    elif how == "bad-header":  # a plausible header length, then no JSON
        file.write_bytes(struct.pack("<Q", 64) + b"{this is not json" + b"\x00" * 200)
    else:
        raise ValueError(how)


def tensor_names_in(line: str, names) -> list[str]:
    return [name for name in names if name in line]


# --------------------------------------------------------------------------- 1. missing paths


@pytest.mark.parametrize("command", ["compress", "compress-init", "spectrum", "spectrum-init", "inspect",
                                     "decompress", "verify", "verify-init", "decompress-init"])
def test_missing_path(models, tmp_path, command):
    missing = tmp_path / "no-such-thing"
    out = tmp_path / "out"
    trained, init, artifact = models.gpt2.trained_dir, models.gpt2.init_dir, models.artifact
    args, output = {
        "compress": (["compress", missing, "--init", init, "-o", out], out),
        "compress-init": (["compress", trained, "--init", missing, "-o", out], out),
        "spectrum": (["spectrum", missing, "--no-init"], None),
        "spectrum-init": (["spectrum", trained, "--init", missing], None),
        "inspect": (["inspect", missing], None),
        "decompress": (["decompress", missing, "-o", out], out),
        "decompress-init": (["decompress", artifact, "--init", missing, "-o", out], out),
        "verify": (["verify", missing], None),
        "verify-init": (["verify", artifact, "--init", missing], None),
    }[command]
    expect_error(args, says=(str(missing), "check"), output=output, inputs=(models.root,))


# --------------------------------------------------------------------------- 2. no checkpoint in a folder


@pytest.mark.parametrize("contents", ["empty", "config-only"])
@pytest.mark.parametrize("role", ["compress", "compress-init", "spectrum"])
def test_folder_without_checkpoint(models, tmp_path, contents, role):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    if contents == "config-only":
        shutil.copyfile(models.gpt2.trained_dir / "config.json", folder / "config.json")
    out = tmp_path / "out"
    args, output = {
        "compress": (["compress", folder, "--no-init", "-o", out], out),
        "compress-init": (["compress", models.gpt2.trained_dir, "--init", folder, "-o", out], out),
        "spectrum": (["spectrum", folder, "--no-init"], None),
    }[role]
    expect_error(args, says=(str(folder), "no checkpoint", "model.safetensors"), output=output,
                 inputs=(models.root, folder))


@pytest.mark.parametrize("command", ["inspect", "verify", "decompress"])
def test_model_folder_is_not_an_artifact(models, tmp_path, command):
    out = tmp_path / "out"
    args = [command, models.gpt2.trained_dir] + (["-o", out] if command == "decompress" else [])
    expect_error(args, says=(str(models.gpt2.trained_dir), "artifact", "compress"),
                 output=out if command == "decompress" else None, inputs=(models.root,))


# --------------------------------------------------------------------------- 3. broken safetensors


@pytest.mark.parametrize("how", ["truncated", "garbage", "bad-header"])
@pytest.mark.parametrize("role", ["trained", "init"])
def test_broken_safetensors(models, tmp_path, how, role):
    trained, init = copy_pair(models, tmp_path)
    broken = (trained if role == "trained" else init) / "model.safetensors"
    break_file(broken, how)
    out = tmp_path / "out"
    expect_error(["compress", trained, "--init", init, "-o", out], says=(str(broken), "corrupt", "re-"),
                 output=out, inputs=(trained, init))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_broken_single_safetensors_file(tmp_path, models, how):
    single = tmp_path / "weights.safetensors"
    shutil.copyfile(models.gpt2.trained_dir / "model.safetensors", single)
    break_file(single, how)
    expect_error(["spectrum", single, "--no-init"], says=(str(single), "corrupt"), inputs=(single,))
    out = tmp_path / "out"
    expect_error(["compress", single, "--no-init", "-o", out], says=(str(single), "corrupt"), output=out,
                 inputs=(single,))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_broken_artifact_file(models, tmp_path, how):
    artifact = Path(shutil.copytree(models.artifact, tmp_path / "artifact"))
    break_file(artifact / "inrank.safetensors", how)
    out = tmp_path / "dense"
    for args, output in ((["inspect", artifact], None), (["verify", artifact], None),
                         (["decompress", artifact, "-o", out], out)):
        expect_error(args, says=(str(artifact), "corrupt"), output=output, inputs=(artifact,))


@pytest.mark.parametrize("weight_map", ['"oops"', '{"a": 5}', '{}', '["model.safetensors"]',
                                        '{"h.0.attn.c_attn.weight": "../elsewhere.safetensors"}',
                                        '{"h.0.attn.c_attn.weight": "/etc/passwd"}'])
def test_malformed_shard_index(models, tmp_path, weight_map):
    folder = tmp_path / "sharded"
    shutil.copytree(models.gpt2.trained_dir, folder)
    (folder / "model.safetensors.index.json").write_text(f'{{"metadata": {{}}, "weight_map": {weight_map}}}')
    out = tmp_path / "out"
    expect_error(["compress", folder, "--init", models.gpt2.init_dir, "-o", out],
                 says=("model.safetensors.index.json", ("weight_map", "shard")), output=out,
                 inputs=(folder, models.root))


# --------------------------------------------------------------------------- 4. init does not match


def test_init_of_another_architecture(models, tmp_path):
    """A GPT-2 init for a LLaMA model (and the other way round): the message names the first tensors."""
    out = tmp_path / "out"
    llama_names = list(models.llama.trained_state)
    line = expect_error(["compress", models.llama.trained_dir, "--init", models.gpt2.init_dir, "-o", out],
                        says=("init",), output=out, inputs=(models.root,))
    assert len(tensor_names_in(line, llama_names)) >= 3, line

    gpt2_names = list(models.gpt2.trained_state)
    line = expect_error(["compress", models.gpt2.trained_dir, "--init", models.llama.init_dir, "-o", out],
                        says=("init",), output=out, inputs=(models.root,))
    assert len(tensor_names_in(line, gpt2_names)) >= 3, line

    line = expect_error(["spectrum", models.llama.trained_dir, "--init", models.gpt2.init_dir],
                        says=("init",), inputs=(models.root,))
    assert len(tensor_names_in(line, llama_names)) >= 3, line


def test_init_of_another_size(models, tmp_path):
    """GPT-2 n_embd 64 trained vs n_embd 32 init: the message names the first tensors and both shapes."""
    out = tmp_path / "out"
    narrow = load_file(models.narrow_init / "model.safetensors")
    differing = [n for n, t in models.gpt2.trained_state.items()
                 if n in narrow and tuple(narrow[n].shape) != tuple(t.shape)]
    assert len(differing) >= 3
    line = expect_error(["compress", models.gpt2.trained_dir, "--init", models.narrow_init, "-o", out],
                        says=("init", "shape", "64", "32"), output=out, inputs=(models.root,))
    assert len(tensor_names_in(line, differing)) >= 3, line


# --------------------------------------------------------------------------- 5. NaN and Inf


@pytest.mark.parametrize("name, value", [
    ("transformer.h.0.attn.c_attn.weight", float("nan")),  # 2-D: factorized
    ("transformer.h.1.ln_2.bias", float("inf")),  # 1-D: stored dense
    ("transformer.wpe.weight", float("-inf")),
])
def test_non_finite_trained_weight(models, tmp_path, name, value):
    trained = model_with(models, tmp_path / "trained-broken", name, value)
    out = tmp_path / "out"
    expect_error(["compress", trained, "--init", models.gpt2.init_dir, "-o", out],
                 says=(name, ("nan", "inf")), output=out, inputs=(models.root, trained))


def test_non_finite_init_weight(models, tmp_path):
    name = "transformer.h.1.mlp.c_fc.weight"
    init = model_with(models, tmp_path / "init-broken", name, float("nan"), source=models.gpt2.init_dir)
    out = tmp_path / "out"
    expect_error(["compress", models.gpt2.trained_dir, "--init", init, "-o", out],
                 says=(name, ("nan", "inf"), "init"), output=out, inputs=(models.root, init))


def test_non_finite_weight_in_spectrum(models, tmp_path):
    name = "transformer.h.1.attn.c_proj.weight"
    trained = model_with(models, tmp_path / "trained-broken", name, float("nan"))
    expect_error(["spectrum", trained, "--init", models.gpt2.init_dir], says=(name, ("nan", "inf")),
                 inputs=(models.root, trained))


# --------------------------------------------------------------------------- 6, 7. threshold and rank


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5", "nan"])
def test_threshold_outside_unit_interval(models, tmp_path, value):
    out = tmp_path / "out"
    expect_error(["compress", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "-o", out,
                  "--threshold", value], says=("--threshold",), output=out, inputs=(models.root,))


def test_threshold_one_is_accepted(models, tmp_path):
    out = tmp_path / "out"
    expect_ok(["compress", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "-o", out,
               "--threshold", "1.0", "--quiet"])
    assert (out / "inrank.safetensors").is_file()
    assert temps_beside(out) == []


@pytest.mark.parametrize("extra, says", [
    (["--rank", "-1"], ("--rank",)),
    (["--rank", "0"], ("--rank", "1 or more")),  # rank 0 would label changed tensors unchanged
    (["--seed", "99999999999999999999"], ("--seed", "4294967295")),
], ids=["rank -1", "rank 0", "seed too large"])
def test_bad_rank_or_seed(models, tmp_path, extra, says):
    out = tmp_path / "out"
    expect_error(["compress", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "-o", out, *extra],
                 says=says, output=out, inputs=(models.root,))


def test_output_inside_an_input_folder_is_refused_and_the_folder_gains_nothing(models, tmp_path):
    trained = models.gpt2.trained_dir
    before = sorted(p.name for p in trained.iterdir())
    for output in (trained / "sub", models.gpt2.init_dir / "artifact"):  # inside CKPT, inside --init
        expect_error(["compress", trained, "--init", models.gpt2.init_dir, "-o", output],
                     says=("inside the input folder",), output=output, inputs=(models.root,))
    assert sorted(p.name for p in trained.iterdir()) == before


def test_init_seed_too_large(models, tmp_path):
    out = tmp_path / "out"
    expect_error(["compress", models.gpt2.trained_dir, "--init-seed", "99999999999999999999", "-o", out],
                 says=("--init-seed", "4294967295"), output=out, inputs=(models.root,))


# --------------------------------------------------------------------------- 8. existing output, --force


def _manifest(artifact: Path) -> dict:
    with safe_open(str(artifact / "inrank.safetensors"), framework="pt") as handle:
        return json.loads(handle.metadata()["inrank"])


def test_existing_output_needs_force(models, tmp_path):
    out = tmp_path / "out"
    base = ["compress", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "-o", out]
    expect_ok(base + ["--quiet"])
    # The existing output is watched as an input: it must stay exactly as it was.
    expect_error(base + ["--threshold", "0.5"], says=(str(out), "--force"), output=out, inputs=(models.root,))
    assert _manifest(out)["rule"]["threshold"] == DEFAULT_THRESHOLD

    expect_ok(base + ["--threshold", "0.5", "--force", "--quiet"])
    assert _manifest(out)["rule"]["threshold"] == 0.5
    assert temps_beside(out) == []


def test_existing_decompress_output_needs_force(models, tmp_path):
    out = tmp_path / "dense"
    expect_ok(["decompress", models.artifact, "-o", out, "--quiet"])
    expect_error(["decompress", models.artifact, "-o", out], says=(str(out), "--force"), output=out,
                 inputs=(models.root,))
    expect_ok(["decompress", models.artifact, "-o", out, "--force", "--quiet"])
    assert (out / "model.safetensors").is_file()
    assert temps_beside(out) == []


@pytest.mark.parametrize("target", ["trained", "init", "parent"])
def test_force_never_overwrites_an_input(models, tmp_path, target):
    trained, init = copy_pair(models, tmp_path / "inputs")
    output = {"trained": trained, "init": init, "parent": tmp_path / "inputs"}[target]
    expect_error(["compress", trained, "--init", init, "-o", output, "--force"], says=("input", str(output)),
                 output=output, inputs=(trained, init))


@pytest.mark.parametrize("target", ["artifact", "init"])
def test_decompress_force_never_overwrites_an_input(models, tmp_path, target):
    artifact, trained, init = compressed_copy(models, tmp_path)
    output = artifact if target == "artifact" else init
    expect_error(["decompress", artifact, "-o", output, "--force"], says=("input", str(output)),
                 output=output, inputs=(artifact, init, trained))


# --------------------------------------------------------------------------- 9. unwritable output


def _unwritable_outputs(tmp_path: Path) -> list[tuple[Path, Path]]:
    """(output, blocker) pairs that cannot be written: under a regular file (fails even for root)
    and, when not root, under a read-only folder."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    cases = [(blocker / "out", blocker)]
    if os.geteuid() != 0:
        locked = tmp_path / "read-only"
        locked.mkdir()
        locked.chmod(0o500)
        cases.append((locked / "out", locked))
    return cases


def test_unwritable_compress_output(models, tmp_path):
    for output, blocker in _unwritable_outputs(tmp_path):
        try:
            expect_error(["compress", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "-o", output],
                         says=(str(blocker), "writable"), output=output, inputs=(models.root, blocker))
        finally:
            blocker.chmod(0o700)


def test_unwritable_decompress_output(models, tmp_path):
    for output, blocker in _unwritable_outputs(tmp_path):
        try:
            expect_error(["decompress", models.artifact, "-o", output], says=(str(blocker), "writable"),
                         output=output, inputs=(models.root, blocker))
        finally:
            blocker.chmod(0o700)


# --------------------------------------------------------------------------- 10. init changed or gone


def test_changed_init_is_refused(models, tmp_path):
    artifact, _, init = compressed_copy(models, tmp_path)
    state = load_file(init / "model.safetensors")
    state["transformer.h.0.mlp.c_proj.weight"] = state["transformer.h.0.mlp.c_proj.weight"] + 1e-3
    save_file(state, init / "model.safetensors", metadata={"format": "pt"})

    expect_ok(["inspect", artifact])  # the header alone does not need the init
    expect_error(["verify", artifact], says=("init", ("hash", "sha256")), inputs=(artifact, init))
    out = tmp_path / "dense"
    expect_error(["decompress", artifact, "-o", out], says=("init", ("hash", "sha256")), output=out,
                 inputs=(artifact, init))


def test_deleted_init_is_refused(models, tmp_path):
    artifact, _, init = compressed_copy(models, tmp_path)
    shutil.rmtree(init)
    expect_error(["verify", artifact], says=("init", "missing", str(init)), inputs=(artifact,))
    out = tmp_path / "dense"
    expect_error(["decompress", artifact, "-o", out], says=("init", "missing", str(init), "--init"), output=out,
                 inputs=(artifact,))


# --------------------------------------------------------------------------- 11. newer format version


def test_newer_format_version_is_refused(models, tmp_path):
    artifact = Path(shutil.copytree(models.artifact, tmp_path / "artifact"))
    file = artifact / "inrank.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata())
    manifest = json.loads(metadata["inrank"])
    newer = manifest["version"] + 1  # one past what this reader knows
    assert newer > FORMAT_VERSION
    manifest["version"] = newer
    metadata["inrank"] = json.dumps(manifest)
    tensors = load_file(file)
    save_file(tensors, file, metadata=metadata)

    out = tmp_path / "out"
    for args, output in ((["inspect", artifact], None), (["verify", artifact], None),
                         (["decompress", artifact, "-o", out], out),
                         (["compress", artifact, "-o", out, "--threshold", "0.5"], out)):
        expect_error(args, says=("newer", "upgrade", str(newer)), output=output, inputs=(artifact, models.root))


# --------------------------------------------------------------------------- 12. pickles


def _evil_pickle(path: Path, models: Models) -> Path:
    state = dict(models.gpt2.trained_state)
    state["gadget"] = Gadget()
    torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_needing_more_than_weights_only(models, tmp_path, suffix):
    evil = _evil_pickle(tmp_path / f"evil{suffix}", models)
    out = tmp_path / "out"
    expect_error(["compress", evil, "--no-init", "-o", out], says=(str(evil), "weights_only"), output=out,
                 inputs=(evil, models.root))
    expect_error(["compress", models.gpt2.trained_dir, "--init", evil, "-o", out], says=(str(evil), "weights_only"),
                 output=out, inputs=(evil, models.root))
    expect_error(["spectrum", evil, "--no-init"], says=(str(evil), "weights_only"), inputs=(evil,))


def test_pickle_in_model_folder_needing_more_than_weights_only(models, tmp_path):
    folder = tmp_path / "pickled-model"
    folder.mkdir()
    shutil.copyfile(models.gpt2.trained_dir / "config.json", folder / "config.json")
    evil = _evil_pickle(folder / "pytorch_model.bin", models)
    out = tmp_path / "out"
    expect_error(["compress", folder, "--init", models.gpt2.init_dir, "-o", out], says=(str(evil), "weights_only"),
                 output=out, inputs=(folder, models.root))


@pytest.mark.parametrize("role", ["trained", "init"])
def test_truncated_pickle(models, tmp_path, role):
    saved = tmp_path / "state.bin"
    torch.save(dict(models.gpt2.trained_state if role == "trained" else models.gpt2.init_state), saved)
    break_file(saved, "truncated")
    out = tmp_path / "out"
    args = (["compress", saved, "--init", models.gpt2.init_dir, "-o", out] if role == "trained"
            else ["compress", models.gpt2.trained_dir, "--init", saved, "-o", out])
    expect_error(args, says=(str(saved), ("truncated", "corrupt")), output=out, inputs=(saved, models.root))


def test_pickle_without_a_state_dict(models, tmp_path):
    saved = tmp_path / "tensor.pt"
    torch.save(torch.zeros(4, 4), saved)
    out = tmp_path / "out"
    expect_error(["compress", saved, "--no-init", "-o", out], says=(str(saved), "state"), output=out,
                 inputs=(saved,))


def test_random_bytes_are_not_called_a_pickle(models, tmp_path):
    folder = tmp_path / "noise-model"
    folder.mkdir()
    shutil.copyfile(models.gpt2.trained_dir / "config.json", folder / "config.json")
    noise = folder / "pytorch_model.bin"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    out = tmp_path / "out"
    line = expect_error(["compress", folder, "--init", models.gpt2.init_dir, "-o", out],
                        says=(str(noise), "not a readable checkpoint"), output=out, inputs=(folder, models.root))
    assert "arbitrary" not in line


@pytest.mark.parametrize("protocol", [2, 4])
def test_raw_pickle_is_refused_in_one_line_without_torch_warnings(models, tmp_path, protocol):
    """``pickle.dump`` of a state dict: torch warns about the protocol before refusing it; the
    user sees one line, whatever the file holds (tensors only, or a Python object too)."""
    for name, state in (("tensors.bin", dict(models.gpt2.trained_state)),
                        ("gadget.bin", {**models.gpt2.trained_state, "gadget": Gadget()})):
        raw = tmp_path / f"p{protocol}-{name}"
        raw.write_bytes(pickle.dumps(state, protocol=protocol))
        out = tmp_path / "out"
        expect_error(["compress", raw, "--init", models.gpt2.init_dir, "-o", out],
                     says=(str(raw), ("pickle", "arbitrary")), output=out, inputs=(raw, models.root))


# --------------------------------------------------------------------------- 13. killed midway


def _big_pair(tmp_path: Path, count: int = 6, size: int = 1024) -> tuple[Path, Path]:
    """Several square float32 tensors: exact SVDs that take a few seconds in all."""
    generator = torch.Generator().manual_seed(0)
    init_state = {f"layers.{i}.weight": torch.randn(size, size, generator=generator) for i in range(count)}
    trained_state = {name: t + 0.1 * torch.randn(size, size, generator=generator) for name, t in init_state.items()}
    folders = []
    for label, state in (("big-init", init_state), ("big-trained", trained_state)):
        folder = tmp_path / label
        folder.mkdir()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    return folders[0], folders[1]


def test_killed_compress_leaves_no_artifact(tmp_path):
    init, trained = _big_pair(tmp_path)
    out = tmp_path / "out"
    before = {init: snapshot(init), trained: snapshot(trained)}
    args = ["compress", trained, "--init", init, "-o", out, "--svd", "exact", "--quiet"]
    code, _ = signalled_cli(args, lambda: bool(temps_beside(out)), signal.SIGKILL, settle=0.3)  # let it write a little
    assert code == -signal.SIGKILL, "compress finished before it could be killed: use bigger tensors"
    assert not os.path.lexists(out), "a killed compress left an output folder"
    assert temps_beside(out), "the killed run's temporary folder should still be there (hidden)"
    assert {init: snapshot(init), trained: snapshot(trained)} == before

    # The next run succeeds and clears the dead run's temporary folder.
    expect_ok(["compress", trained, "--init", init, "-o", out, "--rank", "4", "--svd", "randomized", "--quiet"])
    assert (out / "inrank.safetensors").is_file()
    assert temps_beside(out) == []
    expect_ok(["inspect", out])


# --------------------------------------------------------------------------- 14. option values


def test_randomized_svd_with_inrank_criterion(models, tmp_path):
    out = tmp_path / "out"
    expect_error(["compress", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "-o", out,
                  "--svd", "randomized", "--criterion", "inrank"], says=("randomized", "inrank", "--svd"),
                 output=out, inputs=(models.root,))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: --device cuda is valid")
@pytest.mark.parametrize("command", ["compress", "spectrum"])
def test_cuda_device_without_cuda(models, tmp_path, command):
    out = tmp_path / "out"
    args = [command, models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "--device", "cuda"]
    expect_error(args + (["-o", out] if command == "compress" else []), says=("cuda", "--device", "cpu"),
                 output=out if command == "compress" else None, inputs=(models.root,))


@pytest.mark.parametrize("option, value", [
    ("--dtype", "int8"), ("--dtype", "float99"), ("--svd", "fastest"), ("--criterion", "vibes"), ("--device", "tpu"),
])
def test_unknown_option_value(models, tmp_path, option, value):
    out = tmp_path / "out"
    expect_error(["compress", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "-o", out, option, value],
                 says=(option, value), output=out, inputs=(models.root,))


@pytest.mark.parametrize("thresholds", ["abc", "0,2", "0.5,,x", ""])
def test_spectrum_bad_thresholds(models, thresholds):
    expect_error(["spectrum", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "--thresholds", thresholds],
                 says=("--thresholds",), inputs=(models.root,))


def test_spectrum_unknown_criterion(models):
    expect_error(["spectrum", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "--criterion", "vibes"],
                 says=("--criterion", "vibes"), inputs=(models.root,))


# --------------------------------------------------------------------------- 15. reference options


@pytest.mark.parametrize("extra", [["--init", "INIT"], ["--init-seed", "7"], ["--init", "INIT", "--init-seed", "7"]])
def test_no_init_conflicts_with_init(models, tmp_path, extra):
    out = tmp_path / "out"
    extra = [models.gpt2.init_dir if part == "INIT" else part for part in extra]
    expect_error(["compress", models.gpt2.trained_dir, "--no-init", *extra, "-o", out], says=("--no-init", "--init"),
                 output=out, inputs=(models.root,))
    expect_error(["spectrum", models.gpt2.trained_dir, "--no-init", *extra], says=("--no-init", "--init"),
                 inputs=(models.root,))


def test_no_init_with_embed_init(models, tmp_path):
    out = tmp_path / "out"
    expect_error(["compress", models.gpt2.trained_dir, "--no-init", "--embed-init", "-o", out],
                 says=("--embed-init", "--no-init"), output=out, inputs=(models.root,))


def test_no_reference_option(models, tmp_path):
    trained, _ = copy_pair(models, tmp_path)
    default_output = trained.with_name(trained.name + "-inrank")
    says = ("--init", "--init-seed", "--no-init")
    expect_error(["compress", trained], says=says, output=default_output, inputs=(trained,))
    out = tmp_path / "out"
    expect_error(["compress", trained, "-o", out], says=says, output=out, inputs=(trained,))
    expect_error(["spectrum", trained], says=says, inputs=(trained,))


# --------------------------------------------------------------------------- 16. rows and quantized artifacts
# (--quantize, and artifacts whose lowrank+rows / int8 tensors are damaged; the damaged
# files keep their manifest and matching checksums, so only the reader's own checks can catch them)


def test_unknown_quantize_scheme(models, tmp_path):
    out = tmp_path / "out"
    expect_error(["compress", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "-o", out, "--quantize", "int3"],
                 says=("--quantize", "int3", "int4", "int8", "none"), output=out, inputs=(models.root,))


@pytest.mark.parametrize("scheme", ["int8", "int4", "mixed"])
def test_quantize_with_a_lossless_threshold(models, tmp_path, scheme):
    out = tmp_path / "out"
    expect_error(["compress", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "-o", out, "--quantize", scheme,
                  "--threshold", "1.0"], says=("--quantize", "--threshold", "drop"), output=out, inputs=(models.root,))


def test_quantize_mixed_without_a_target(models, tmp_path):
    """mixed lets a size budget choose each component's bits: with no budget there is nothing to choose by."""
    out = tmp_path / "out"
    expect_error(["compress", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "-o", out, "--quantize", "mixed"],
                 says=("--quantize mixed", "--target-ratio", "int4"), output=out, inputs=(models.root,))


@pytest.mark.parametrize("scheme", ["int8", "int4", "mixed"])
def test_quantize_with_dtype(models, tmp_path, scheme):
    out = tmp_path / "out"
    expect_error(["compress", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "-o", out, "--quantize", scheme,
                  "--dtype", "bfloat16"], says=("--quantize", "--dtype"), output=out, inputs=(models.root,))


def test_quantize_none_takes_a_dtype_and_a_lossless_threshold(models, tmp_path):
    """--quantize none names float storage: it goes with --dtype, and with threshold 1 (exact floats)."""
    base = ["compress", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "--quantize", "none", "--quiet"]
    expect_ok([*base, "-o", tmp_path / "half", "--dtype", "float16"])
    stored = {entry.storage for entry in read_manifest(tmp_path / "half").tensors.values() if entry.has_factors}
    assert stored == {"float16"}
    expect_ok([*base, "-o", tmp_path / "exact", "--threshold", "1.0"])
    assert read_manifest(tmp_path / "exact").rule.threshold == 1.0
    assert "int8" not in {entry.storage for entry in read_manifest(tmp_path / "exact").tensors.values()}


ROWS_TENSOR = "transformer.wte.weight"


@dataclass
class RowsArtifacts:
    root: Path
    pair: ModelPair
    bf16: Path  # the embedding stored as lowrank+rows, bfloat16
    int8: Path  # the same with --quantize int8
    tokenizer: Path  # a word-level tokenizer.json for the 320-token vocabulary
    text: Path


@pytest.fixture(scope="module")
def rows_artifacts(tmp_path_factory) -> RowsArtifacts:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tokenizer_models

    root = tmp_path_factory.mktemp("bad-rows")
    pair = make_pair(root, "gpt2")
    plant_rows(pair, ROWS_TENSOR)
    artifacts = []
    for label, extra in (("rows-bf16", []), ("rows-int8", ["--quantize", "int8"])):
        out = root / label
        expect_ok(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", out, "--quiet", *extra])
        with safe_open(str(out / "inrank.safetensors"), framework="pt") as handle:
            manifest = json.loads(handle.metadata()["inrank"])
        assert manifest["tensors"][ROWS_TENSOR]["kind"] == "lowrank+rows", manifest["tensors"][ROWS_TENSOR]
        artifacts.append(out)
    words = [f"w{i}" for i in range(200)]
    tokenizer = Tokenizer(tokenizer_models.WordLevel({word: i for i, word in enumerate(["[UNK]", *words])},
                                                     unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir()
    tokenizer.save(str(tokenizer_dir / "tokenizer.json"))
    text = root / "text.txt"
    generator = random.Random(0)
    text.write_text(" ".join(generator.choice(words) for _ in range(400)) + "\n")
    return RowsArtifacts(root, pair, artifacts[0], artifacts[1], tokenizer_dir, text)


def damaged_artifact(source: Path, folder: Path, how: str, source_gone: bool = False) -> tuple[Path, str]:
    """A copy of ``source`` whose rows tensor is damaged ``how``, rewritten with its metadata, the
    manifest's checksums updated to the new bytes. Returns (artifact, the damaged tensor's name).
    ``source_gone``: the manifest names a source checkpoint that does not exist (verify cannot
    measure the reconstruction, so only its structure checks can catch the damage)."""
    from inrank_convert.core.tensors import checksum

    artifact = Path(shutil.copytree(source, folder))
    file = artifact / "inrank.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata())
    manifest = json.loads(metadata["inrank"])
    entry = manifest["tensors"][ROWS_TENSOR]
    tensors = load_file(file)
    index_name = ROWS_TENSOR + ".row_index"
    index = tensors[index_name].clone()
    assert index.numel() >= 2
    damaged = index_name
    if how == "out-of-range":
        index[-1] = entry["shape"][0]  # one past the last row
    elif how == "negative":
        index[0] = -1
    elif how == "repeated":
        index[1] = index[0]
    elif how == "int32":
        index = index.to(torch.int32)
    elif how in ("no-lora-scale", "no-rows-scale"):
        damaged = ROWS_TENSOR + (".lora_scale" if how == "no-lora-scale" else ".rows_scale")
        assert damaged in tensors
        del tensors[damaged]
        del manifest["checksums"][damaged]
    else:
        raise ValueError(how)
    if damaged == index_name:
        tensors[index_name] = index.contiguous()
        manifest["checksums"][index_name] = checksum(tensors[index_name])
    if source_gone:
        manifest["source"]["path"] = str(folder.parent / "no-such-source")
    metadata["inrank"] = json.dumps(manifest)
    save_file(tensors, file, metadata=metadata)
    return artifact, damaged


DAMAGES = ["out-of-range", "negative", "repeated", "int32", "no-lora-scale", "no-rows-scale"]
HEADER_DAMAGES = {"int32", "no-lora-scale", "no-rows-scale"}  # visible in the safetensors header alone


def _damaged(rows_artifacts: RowsArtifacts, tmp_path: Path, how: str) -> tuple[Path, str]:
    source = rows_artifacts.int8 if how.endswith("-scale") else rows_artifacts.bf16
    return damaged_artifact(source, tmp_path / f"damaged-{how}", how)


@pytest.mark.parametrize("source_gone", [False, True], ids=["source-present", "source-gone"])
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_rows_artifact_is_refused_by_verify(rows_artifacts, tmp_path, how, source_gone):
    source = rows_artifacts.int8 if how.endswith("-scale") else rows_artifacts.bf16
    artifact, name = damaged_artifact(source, tmp_path / f"damaged-{how}", how, source_gone)
    expect_error(["verify", artifact], says=(name, "re-run compress"), inputs=(artifact, rows_artifacts.root))


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_rows_artifact_is_refused_by_decompress(rows_artifacts, tmp_path, how):
    artifact, name = _damaged(rows_artifacts, tmp_path, how)
    out = tmp_path / "dense"
    expect_error(["decompress", artifact, "-o", out], says=(name, "re-run compress"), output=out,
                 inputs=(artifact, rows_artifacts.root))


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_rows_artifact_is_refused_by_report(rows_artifacts, tmp_path, how):
    artifact, name = _damaged(rows_artifacts, tmp_path, how)
    expect_error(["report", artifact, "--data", rows_artifacts.text, "--tokenizer", rows_artifacts.tokenizer,
                  "--context", "16", "--max-tokens", "128", "--quiet"], says=(name, "re-run compress"),
                 inputs=(artifact, rows_artifacts.root))


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_rows_artifact_is_refused_by_load_and_compress(rows_artifacts, tmp_path, how):
    from inrank_convert.core.errors import ArtifactError
    from inrank_convert.runtime.modeling import load_compressed

    artifact, name = _damaged(rows_artifacts, tmp_path, how)
    with pytest.raises(ArtifactError) as raised:
        load_compressed(artifact)
    assert name in raised.value.message
    out = tmp_path / "recompressed"
    expect_error(["compress", artifact, "-o", out, "--threshold", "0.5"], says=(name,), output=out,
                 inputs=(artifact, rows_artifacts.root))
    if how in HEADER_DAMAGES:
        expect_error(["inspect", artifact], says=(name,), inputs=(artifact,))


def test_undamaged_rows_artifacts_pass_the_same_commands(rows_artifacts, tmp_path):
    """The damaged copies above fail because of the damage: the originals pass every command."""
    for artifact in (rows_artifacts.bf16, rows_artifacts.int8):
        copy = Path(shutil.copytree(artifact, tmp_path / artifact.name))
        expect_ok(["verify", copy])
        expect_ok(["decompress", copy, "-o", tmp_path / f"{artifact.name}-dense", "--quiet"])
        expect_ok(["report", copy, "--data", rows_artifacts.text, "--tokenizer", rows_artifacts.tokenizer,
                   "--context", "16", "--max-tokens", "128", "--quiet"])


@pytest.mark.parametrize("command", ["compress", "train"])
def test_a_malformed_source_date_epoch_is_refused_before_any_work(models, tmp_path, monkeypatch, command):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "last tuesday")
    out = tmp_path / "out"
    if command == "compress":
        args = ["compress", models.gpt2.trained_dir, "--init", models.gpt2.init_dir, "-o", out]
    else:
        text = tmp_path / "text.txt"
        text.write_text("the river runs to the sea\n" * 50)
        args = ["train", models.gpt2.init_dir / "config.json", "-o", out, "--data", text, "--steps", "2"]
    expect_error(args, says=("SOURCE_DATE_EPOCH", "whole number of seconds"), output=out,
                 inputs=(models.gpt2.trained_dir, models.gpt2.init_dir))
