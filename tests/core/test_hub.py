"""core/hub.py: Hugging Face hub ids as inputs, read offline from a hub cache laid out in a fixture.

The cache is the layout huggingface_hub writes (``models--owner--name/blobs/<hash>``,
``snapshots/<commit>/<file>`` as relative symlinks to the blobs, ``refs/<branch>`` holding the
commit), with tiny real GPT-2 models saved by ``save_pretrained``. HF_HUB_CACHE points at it
(read at call time); the current folder is an empty one, so no hub id is also a local path
unless a test makes it one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from inrank_convert.artifact import read_manifest
from inrank_convert.core.errors import CheckpointError
from inrank_convert.core.hub import cache_dir, is_hub_id, resolve_model
from inrank_convert.inputs.sources import open_checkpoint
from tests.conftest import make_pair, save_hf
from tests.helpers.cli_contract import expect_error, expect_ok

COMMIT = "a" * 40
OLD_COMMIT = "b" * 40


def cache_repo(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put ``folder``'s files into ``cache`` as the snapshot ``commit`` of ``repo_id``; returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert files
    for file in files:
        data = file.read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache with ``owner/trained`` (main = COMMIT, tag v1 = OLD_COMMIT, another trained model)
    and ``owner/init``; the current folder is an empty ``work`` folder."""
    pair = make_pair(tmp_path / "models", "gpt2")
    from transformers import AutoModelForCausalLM

    other = save_hf(AutoModelForCausalLM.from_config(pair.config),
                    {name: tensor * 1.5 for name, tensor in pair.trained_state.items()}, tmp_path / "models" / "other")
    cache = tmp_path / "hf-cache"
    snapshots = {
        "trained": cache_repo(cache, "owner/trained", pair.trained_dir, COMMIT),
        "old": cache_repo(cache, "owner/trained", other, OLD_COMMIT, refs=("v1",)),
        "init": cache_repo(cache, "owner/init", pair.init_dir, COMMIT),
    }
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return {"pair": pair, "cache": cache, "snapshots": snapshots, "work": work, "other": other}


def artifact_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "inrank.safetensors"))


def assert_same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left and set(left) == set(right)
    for name in left:
        assert torch.equal(left[name], right[name]), name


# --------------------------------------------------------------------------- the resolver


def test_cache_dir_is_read_when_called(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"


@pytest.mark.parametrize("name, hub_id", [
    ("meta-llama/Llama-3.2-1B", True), ("gpt2", True), ("a/b/c", False), ("/abs/path", False),
    ("model.safetensors", False), ("runs/step-1/pytorch_model.bin", False), ("config.json", False),
    ("owner/na--me", False),
])
def test_is_hub_id(name, hub_id):
    assert is_hub_id(name) is hub_id


def test_resolve_model_reads_refs_and_snapshots(hub):
    snapshots = hub["snapshots"]
    assert resolve_model("owner/trained") == snapshots["trained"]
    assert resolve_model("owner/trained", "main") == snapshots["trained"]
    assert resolve_model("owner/trained", "v1") == snapshots["old"]
    assert resolve_model("owner/trained", OLD_COMMIT) == snapshots["old"]
    # Not hub ids, or local: returned as they are, for the caller's own message.
    assert resolve_model("missing.safetensors") == Path("missing.safetensors")
    assert resolve_model(hub["pair"].trained_dir) == hub["pair"].trained_dir
    with pytest.raises(CheckpointError, match="hf download owner/absent"):
        resolve_model("owner/absent")


def test_open_checkpoint_of_a_hub_id(hub):
    pair = hub["pair"]
    with open_checkpoint("owner/trained") as checkpoint:
        assert checkpoint.path == hub["snapshots"]["trained"]
        assert checkpoint.config()["model_type"] == "gpt2"
        names = checkpoint.names()
        assert "transformer.h.0.mlp.c_fc.weight" in names
        for name in names:
            assert torch.equal(checkpoint.get(name), pair.trained_state[name]), name


# --------------------------------------------------------------------------- compress through the CLI


def test_compress_hub_ids_equals_compressing_the_local_folders(hub, tmp_path):
    pair, snapshots = hub["pair"], hub["snapshots"]
    out = tmp_path / "from-hub"
    payload = json.loads(expect_ok(["compress", "owner/trained", "--init", "owner/init", "-o", out, "--json",
                                    "--quiet"]).stdout)
    assert payload["output"] == str(out)
    local = tmp_path / "from-folders"
    expect_ok(["compress", pair.trained_dir, "--init", pair.init_dir, "-o", local, "--quiet"])
    assert_same_tensors(artifact_tensors(out), artifact_tensors(local))
    manifest = read_manifest(out)
    # The resolved snapshot folder is recorded: it names the repo and the commit.
    assert manifest.source.path == str(snapshots["trained"].resolve())
    assert manifest.source.path.endswith(f"models--owner--trained/snapshots/{COMMIT}")
    assert manifest.reference.mode == "reference"
    assert manifest.reference.path == str(snapshots["init"].resolve())
    assert (out / "config.json").is_file()
    # The artifact stands on its recorded reference: verify reads the init from the cache again.
    expect_ok(["verify", out, "--source", "owner/trained"])
    # An artifact's --init override as a hub id.
    expect_ok(["decompress", out, "-o", tmp_path / "dense", "--init", "owner/init", "--quiet"])
    assert (tmp_path / "dense" / "model.safetensors").is_file()


def test_compress_a_hub_id_by_default_writes_name_inrank_here(hub):
    expect_ok(["compress", "owner/trained", "--init", "owner/init", "--quiet"])
    assert (hub["work"] / "trained-inrank" / "inrank.safetensors").is_file()
    assert not (hub["work"] / "owner").exists()


def test_compress_at_a_revision(hub, tmp_path):
    out, main = tmp_path / "v1", tmp_path / "main"
    expect_ok(["compress", "owner/trained", "--revision", "v1", "--init", "owner/init", "--init-revision", COMMIT,
               "-o", out, "--quiet"])
    manifest = read_manifest(out)
    assert manifest.source.path.endswith(f"snapshots/{OLD_COMMIT}")
    assert manifest.reference.path.endswith(f"models--owner--init/snapshots/{COMMIT}")
    expect_ok(["compress", "owner/trained", "--init", "owner/init", "-o", main, "--quiet"])
    # Another commit, other weights: the revision was read, not main.
    assert not torch.equal(artifact_tensors(out)["transformer.h.0.attn.c_attn.weight.lora_B"],
                           artifact_tensors(main)["transformer.h.0.attn.c_attn.weight.lora_B"])


def test_spectrum_at_a_revision_reads_that_commit(hub):
    at_v1 = json.loads(expect_ok(["spectrum", "owner/trained", "--revision", "v1", "--init", "owner/init",
                                  "--json", "--quiet"]).stdout)
    local = json.loads(expect_ok(["spectrum", hub["other"], "--init", hub["pair"].init_dir, "--json",
                                  "--quiet"]).stdout)
    main = json.loads(expect_ok(["spectrum", "owner/trained", "--init", "owner/init", "--json", "--quiet"]).stdout)
    assert at_v1.pop("source").endswith(f"models--owner--trained/snapshots/{OLD_COMMIT}")
    assert local.pop("source") == str(hub["other"]) and main.pop("source").endswith(f"snapshots/{COMMIT}")
    assert at_v1 == local and at_v1 != main


def test_a_local_folder_named_like_a_hub_id_wins(hub, tmp_path):
    local = hub["work"] / "owner" / "trained"
    shutil.copytree(hub["other"], local)  # not the cached owner/trained (main)
    out = tmp_path / "out"
    expect_ok(["compress", "owner/trained", "--init", "owner/init", "-o", out, "--quiet"])
    assert read_manifest(out).source.path == str(local.resolve())
    expect_ok(["compress", "./owner/trained", "--init", "owner/init", "-o", tmp_path / "dot", "--quiet"])
    assert_same_tensors(artifact_tensors(out), artifact_tensors(tmp_path / "dot"))


# --------------------------------------------------------------------------- misses: one line, nothing written


def test_a_hub_id_not_in_the_cache(hub, tmp_path):
    out = tmp_path / "out"
    line = expect_error(["compress", "owner/absent", "--init", "owner/init", "-o", out],
                        says=("owner/absent is not a local path", "not in the Hugging Face cache", str(hub["cache"]),
                              "download it with `hf download owner/absent`", "or pass a local folder"),
                        output=out, inputs=(hub["cache"],))
    assert "--revision" not in line


def test_an_init_hub_id_not_in_the_cache(hub, tmp_path):
    out = tmp_path / "out"
    expect_error(["compress", "owner/trained", "--init", "someone/base", "-o", out],
                 says=("someone/base", "hf download someone/base"), output=out, inputs=(hub["cache"],))


def test_a_revision_not_in_the_cache(hub, tmp_path):
    out = tmp_path / "out"
    expect_error(["compress", "owner/trained", "--revision", "v2", "--init", "owner/init", "-o", out],
                 says=("owner/trained at revision v2 is not in the Hugging Face cache",
                       "hf download owner/trained --revision v2"), output=out, inputs=(hub["cache"],))


@pytest.mark.parametrize("args, says", [
    (["--revision", "main", "--init", "owner/init"], ("--revision", "local path")),
    (["--init-revision", "main", "--no-init"], ("--init-revision", "no --init")),
])
def test_revision_misuse(hub, tmp_path, args, says):
    out = tmp_path / "out"
    expect_error(["compress", hub["pair"].trained_dir, *args, "-o", out], says=says, output=out,
                 inputs=(hub["pair"].trained_dir,))


def test_a_missing_weights_file_is_not_taken_for_a_hub_id(hub, tmp_path):
    out = tmp_path / "out"
    line = expect_error(["compress", "model.safetensors", "--no-init", "-o", out], says=("no such file",),
                        output=out)
    assert "hf download" not in line


def test_report_also_a_hub_id_not_in_the_cache(hub, tmp_path):
    artifact = tmp_path / "artifact"
    expect_ok(["compress", "owner/trained", "--init", "owner/init", "-o", artifact, "--quiet"])
    text = tmp_path / "text.txt"
    text.write_text("some text " * 50)
    for option in ("--also", "--original"):
        expect_error(["report", artifact, "--data", text, option, "owner/absent"],
                     says=("hf download owner/absent",), inputs=(artifact, hub["cache"]))


# --------------------------------------------------------------------------- report and train on hub ids


@pytest.fixture
def gpt2_hub(eval_models, tmp_path, monkeypatch):
    """conftest's GPT-2-vocabulary models (with a tokenizer) as ``owner/gpt2-trained`` and
    ``owner/gpt2-init`` in a hub cache; a short real text."""
    models = eval_models
    cache = tmp_path / "hf-cache"
    cache_repo(cache, "owner/gpt2-trained", models.trained, COMMIT)
    cache_repo(cache, "owner/gpt2-init", models.init, COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    text = tmp_path / "text.txt"
    text.write_text("The tower is 324 metres tall, about the same height as an 81-storey building. " * 12)
    return models, cache, text


def test_report_original_and_also_as_hub_ids(gpt2_hub):
    models, cache, text = gpt2_hub
    common = ["--data", text, "--context", 64, "--json", "--quiet"]
    hub = json.loads(expect_ok(["report", models.half, "--original", "owner/gpt2-trained",
                                "--also", "owner/gpt2-init", *common]).stdout)
    local = json.loads(expect_ok(["report", models.half, "--original", models.trained,
                                  "--also", models.init, *common]).stdout)
    assert hub["perplexity"]["original"] == local["perplexity"]["original"]
    assert hub["perplexity"]["gpt2-init"] == local["perplexity"]["init"]  # labelled by the hub id's name
    original = hub["models"][0]
    assert original["role"] == "original" and original["path"].endswith(f"models--owner--gpt2-trained/snapshots/{COMMIT}")


def test_train_from_a_hub_id(gpt2_hub, tmp_path):
    models, cache, text = gpt2_hub
    run = tmp_path / "run"
    expect_ok(["train", "owner/gpt2-init", "-o", run, "--data", text, "--steps", 1, "--batch-size", 2,
               "--block-size", 16, "--quiet"])
    # The init is the cached model's weights (not a seeded one), and its tokenizer came along.
    assert_same_tensors(load_file(str(run / "step-0" / "model.safetensors")),
                        load_file(str(models.init / "model.safetensors")))
    assert (run / "step-1").is_dir()
