"""training/entrypoints.py: train and resume on real text with tiny GPT-2 models: a run compress reads,
exact resume (InRank, dense with accumulation), resume from an artifact, a dense checkpoint and a
version-1 artifact, rank growth on real text, frozen dense weights, bfloat16 autocast, torchrun."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inrank_convert.artifact import FORMAT_VERSION, read_manifest
from inrank_convert.compression.job import compress
from inrank_convert.inputs.text import TokenBatches, cached_tokens, load_tokenizer
from inrank_convert.runtime.modeling import load_compressed
from inrank_convert.training.entrypoints import resume, train
from inrank_convert.training.loop import batch_loss
from inrank_convert.training.options import learning_rate
from inrank_convert.training.rank_control import low_rank_layers
from inrank_convert.weights.run_folder import METRICS_FILE, read_metrics
from tests.conftest import REPO
from tests.helpers.old_artifact import LOWRANK, ZERO
from tests.helpers.training import HAS_DATA, TEXT, TOKENIZER, losses, options

needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data (GPT-2 tokenizer and Tiny Shakespeare)")


@needs_data
def test_train_writes_a_run_that_compress_reads(inrank_run):
    run, opts = inrank_run
    assert (run / "step-0" / "inrank_init.json").is_file() and (run / "step-0" / "model.safetensors").is_file()
    for step in (6, 12):
        assert (run / f"step-{step}" / "inrank.safetensors").is_file()
        assert (run / f"step-{step}" / "train_state" / "state.safetensors").is_file()
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, 13))
    for record in records:
        assert {"step", "loss", "lr", "tokens_per_second", "ranks", "total_rank"} <= set(record)
        assert record["total_rank"] == sum(record["ranks"].values())
        assert math.isfinite(record["loss"]) and record["tokens_per_second"] > 0
    if opts.val_data:
        assert {r["step"] for r in records if "val_loss" in r} == {6, 12}
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    assert [r["lr"] for r in records] == [learning_rate(opts, s) for s in range(1, 13)]


@needs_data
def test_compress_of_a_train_run_stores_the_seed_recipe_and_no_init(tmp_path, config_path):
    run = tmp_path / "dense-run"
    train(config_path, run, options(mode="dense", steps=8, lr=1e-2))
    result = compress(run, tmp_path / "artifact")
    manifest = json.loads(json.dumps(result.to_json()))
    assert manifest["reference"] == "seed"
    assert not (tmp_path / "artifact" / "init.safetensors").exists()
    dense_bytes = (run / "step-8" / "model.safetensors").stat().st_size
    # The init is regenerated from the seed; the 8-step update is low-rank: a fraction of the dense size.
    assert result.compressed_bytes < 0.5 * dense_bytes, (result.compressed_bytes, dense_bytes)


@needs_data
def test_interrupted_and_resumed_inrank_run_reproduces_the_losses_exactly(inrank_run, tmp_path):
    run, _ = inrank_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "step-12")  # as if killed after the step-6 checkpoint
    result = resume(copy, None, {})
    assert result.start_step == 6 and result.step == 12
    assert losses(copy) == losses(run)  # bit for bit: float32 on the CPU, dropout on
    assert [r.get("ranks") for r in read_metrics(copy)] == [r.get("ranks") for r in read_metrics(run)]


@needs_data
def test_interrupted_and_resumed_dense_run_with_accumulation_reproduces_the_losses(tmp_path, dropout_config):
    opts = options(mode="dense", steps=6, save_every=3, grad_accum=2)
    train(dropout_config, tmp_path / "full", opts)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "step-6")
    resume(tmp_path / "cut", tmp_path / "elsewhere", {})  # continue into another folder: the source is kept
    assert losses(tmp_path / "elsewhere") == losses(tmp_path / "full")
    assert not (tmp_path / "cut" / "step-6").exists()


@pytest.fixture(scope="module")
def dropout_free_artifact(tmp_path_factory, config_path) -> Path:
    base = tmp_path_factory.mktemp("artifact-base")
    run = base / "run"
    train(config_path, run, options(mode="dense", steps=6, lr=1e-2))
    compress(run, base / "artifact")
    return base / "artifact"


@needs_data
@pytest.mark.parametrize("efficient", [False, True])
def test_first_step_loss_equals_the_artifact_loss(dropout_free_artifact, tmp_path, efficient):
    artifact = dropout_free_artifact
    if efficient:  # InRank-Efficient needs factors of the weights themselves: a zero reference
        compress(artifact, tmp_path / "zero", no_init=True, options=None)
        artifact = tmp_path / "zero"
    resume(artifact, tmp_path / "resumed", dict(data=str(TEXT), steps=1, batch_size=4, block_size=16, seed=5,
                                                 efficient=efficient, buffer=3))
    model = load_compressed(artifact).train()
    batch = TokenBatches(cached_tokens(TEXT, load_tokenizer(artifact), None), 16, 4, 5).next_batch()
    with torch.no_grad():
        expected = float(batch_loss(model, batch))
    assert read_metrics(tmp_path / "resumed")[0]["loss"] == pytest.approx(expected, rel=1e-6, abs=1e-6)


@needs_data
def test_ranks_grow_on_real_text_under_the_inrank_criterion_and_never_pass_max_rank(tmp_path, config_path):
    run = tmp_path / "run"
    # The reference's scan: at most buffer - 1 = 1 per decision, and rank + buffer within max_rank.
    train(config_path, run, options(steps=40, lr=1e-2, buffer=2, max_rank=5, rank_warmup=4, rank_every=4, log_every=4,
                                    initial_rank=0))
    records = read_metrics(run)
    totals = [r["total_rank"] for r in records]
    assert records[0]["step"] == 1 and totals[0] == 0  # from scratch: the update starts at rank 0
    assert totals == sorted(totals), "ranks never shrink"
    first_decision = next(r["total_rank"] for r in records if r["step"] == 4)
    assert totals[-1] > first_decision > 0, totals  # grown again later, not only at the first decision
    assert all(rank <= 5 - 2 for r in records for rank in r["ranks"].values())
    model = load_compressed(run / "step-40")
    widths = [layer.rank for _, layer in low_rank_layers(model)]
    assert widths and all(width <= 5 for width in widths)  # the reference's width cap


@needs_data
def test_freeze_dense_trains_only_the_factors(tmp_path, config_path):
    run = tmp_path / "run"
    train(config_path, run, options(steps=3, freeze_dense=True))
    from safetensors.torch import load_file

    from inrank_convert.inputs.sources import open_artifact

    start = load_file(str(run / "step-0" / "model.safetensors"))
    artifact = open_artifact(run / "step-3")
    try:
        for name in ("transformer.wte.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.bias"):
            assert torch.equal(artifact.stored(name), start[name]), name
        B, _ = artifact.factors("transformer.h.0.attn.c_attn.weight")
        assert B.abs().sum() > 0  # the factors did train
    finally:
        artifact.close()


@needs_data
def test_bfloat16_autocast_and_the_token_cache(tmp_path, config_path):
    run = tmp_path / "run"
    result = train(config_path, run, options(steps=2, dtype="bfloat16"))
    assert math.isfinite(result.loss)
    tokenizer = load_tokenizer(TOKENIZER)
    cache = tmp_path / "cache"
    fresh = cached_tokens(TEXT, tokenizer, cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".uint16" and files[0].stat().st_size == 2 * fresh.numel()
    assert torch.equal(cached_tokens(TEXT, tokenizer, cache), fresh)  # read back from the cache
    assert torch.equal(fresh, cached_tokens(TEXT, tokenizer, None))


@needs_data
@pytest.mark.parametrize("named,applied", [(None, "energy-rest"), ("energy", "energy"), ("inrank", "inrank")])
def test_a_dense_source_is_compressed_at_the_named_criterion_else_at_compress_default(
        tmp_path, config_path, monkeypatch, named, applied):
    """The warm-start recipe trains at plain energy, but a dense SOURCE is compressed as compress would
    (energy-rest) unless --criterion is named: then at exactly that rule."""
    from inrank_convert.training import entrypoints

    run = tmp_path / "dense"
    train(config_path, run, options(mode="dense", steps=4, lr=1e-2))
    rules = []

    def recording_compress(*args, options, **kwargs):
        rules.append(options.rule)
        return compress(*args, options=options, **kwargs)

    monkeypatch.setattr(entrypoints, "compress", recording_compress)
    overrides = dict(data=str(TEXT), steps=1, batch_size=4, block_size=16, threshold=0.8, criterion=named)
    resume(run / "step-4", tmp_path / "resumed", overrides)
    assert [(rule.criterion, rule.threshold) for rule in rules] == [(applied, 0.8)]


@needs_data
def test_resume_from_a_dense_checkpoint_compresses_it_first(tmp_path, config_path):
    run = tmp_path / "dense"
    train(config_path, run, options(mode="dense", steps=6, lr=1e-2))
    # A step folder of a run: measured against the run's step-0 (its seed recipe), as compress RUN does.
    result = resume(run / "step-6", tmp_path / "resumed", dict(data=str(TEXT), steps=2, batch_size=4, block_size=16,
                                                               threshold=0.95, criterion="energy"))
    assert result.step == 2 and result.ranks
    assert json.loads((tmp_path / "resumed" / "step-2" / "train_state" / "trainer_state.json").read_text()
                      )["reference"]["mode"] == "seed"
    assert (tmp_path / "resumed" / "step-2" / "inrank.safetensors").is_file()
    assert not any(p.name.startswith(".inrank-resume") for p in tmp_path.iterdir())  # the temp artifact is gone


@needs_data
def test_torchrun_with_two_gloo_processes_matches_one_process(tmp_path, config_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed beside this python")
    args = [str(config_path), "--data", str(TEXT), "--tokenizer", str(TOKENIZER), "--steps", "6", "--mode", "inrank",
            "--recipe", "reference", "--batch-size", "4", "--block-size", "16", "--log-every", "1", "--buffer", "2", "--rank-warmup", "2",
            "--rank-every", "2", "--save-every", "3", "--seed", "3", "--lr", "3e-3", "--quiet", "--factorize", "all"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "inrank_convert", "train",
                           *args, "-o", str(tmp_path / "ddp")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    train(config_path, tmp_path / "single", options(steps=6, save_every=3, rank_warmup=2, rank_every=2))
    ddp, single = read_metrics(tmp_path / "ddp"), read_metrics(tmp_path / "single")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == list(range(1, 7))  # one writer
    for a, b in zip(ddp, single, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["ranks"] == b["ranks"]
    steps = sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.name.startswith("step-"))
    assert steps == ["step-0", "step-3", "step-6"]
    assert not [p for p in (tmp_path / "ddp").iterdir() if p.name.startswith(".inrank-tmp")]
    assert (tmp_path / "ddp" / METRICS_FILE).read_text().count("\n") == 6
    controller_state = json.loads((tmp_path / "ddp" / "step-6" / "train_state" / "trainer_state.json").read_text())
    assert controller_state["world_size"] == 2


@needs_data
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inrank_training_on_cuda_with_bfloat16_resumes(tmp_path, config_path):
    run = tmp_path / "run"
    train(config_path, run, options(steps=6, save_every=3, device="cuda", dtype="bfloat16"))
    shutil.copytree(run, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "step-6")
    resume(tmp_path / "cut", None, {})
    full, resumed = losses(run), losses(tmp_path / "cut")
    assert full.keys() == resumed.keys()
    for step in full:  # cuBLAS may pick other kernels: close, not bit-exact
        assert resumed[step] == pytest.approx(full[step], rel=1e-2)


def test_old_artifact_resumes_training(old, tmp_path):
    """resume starts InRank training from a version-1 artifact's factors: step 0 is its model."""
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
    assert read_manifest(tmp_path / "run" / "step-3").version == FORMAT_VERSION  # its checkpoints are written in the current version


@needs_data
def test_checkpoints_of_a_run_from_a_bare_config_name_their_architecture(inrank_run, tmp_path):
    """A run started from a bare config.json (no ``architectures``): every step folder's config.json
    names the model class (vLLM, llama.cpp's converter and mergekit choose the class from it), and so
    does what decompress writes from an artifact made before that (its config.json lacks it)."""
    import json

    from inrank_convert import compress
    from inrank_convert.export.dense import decompress

    run, _ = inrank_run
    steps = sorted(run.glob("step-*"))
    assert len(steps) >= 2
    for step in steps:
        assert json.loads((step / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"], step
    artifact = tmp_path / "artifact"
    compress(run, artifact)
    config = json.loads((artifact / "config.json").read_text())
    del config["architectures"]
    (artifact / "config.json").write_text(json.dumps(config))
    decompress(artifact, tmp_path / "dense")
    written = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert written == {**config, "architectures": ["GPT2LMHeadModel"]}
