"""A lowrank+rows embedding resumed as its rows and factors (--embedding-training rows): step 0 is
the artifact's model, the head stays tied, only the stored rows and the factors train, checkpoints
store it as lowrank+rows, and a run folder resumes it exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from inrank_convert.artifact import read_manifest
from inrank_convert.compression.job import compress
from inrank_convert.compression.plan import PlanOptions
from inrank_convert.inputs.text import cached_tokens, load_tokenizer
from inrank_convert.linalg.criteria import RankRule
from inrank_convert.model.layers import RowsLowRankEmbedding, TiedHead
from inrank_convert.runtime.modeling import load_compressed
from inrank_convert.training.entrypoints import resume
from inrank_convert.weights.run_folder import read_metrics
from tests.helpers.training import HAS_DATA, TEXT, losses

needs_data = pytest.mark.skipif(not HAS_DATA, reason="needs ../shared/data (GPT-2 tokenizer and Tiny Shakespeare)")


@pytest.fixture(scope="module")
def rows_artifact(tmp_path_factory, real_run):
    """The session's real run (2x64 GPT-2, 60 steps of Tiny Shakespeare) compressed at threshold 0.9
    (at the default 0.95 this short run's embedding needs too many rows: it is stored low rank)."""
    base = tmp_path_factory.mktemp("rows")
    compress(real_run.run, base / "artifact", options=PlanOptions(rule=RankRule(threshold=0.9)))
    entry = read_manifest(base / "artifact").tensors["transformer.wte.weight"]
    assert entry.kind == "lowrank+rows" and entry.rows and entry.rank
    return base / "artifact"


def test_the_rows_form_is_the_stored_weight_and_ties_the_head(rows_artifact):
    dense = load_compressed(rows_artifact)
    model = load_compressed(rows_artifact, zero_as_lowrank=True, rows_as_factors="input")
    embedding, head = model.get_input_embeddings(), model.lm_head
    assert isinstance(embedding, RowsLowRankEmbedding) and isinstance(head, TiedHead) and head.embedding is embedding
    assert torch.allclose(embedding.weight, dense.get_input_embeddings().weight, atol=1e-6)
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-4)
    trained = {name for name, p in model.named_parameters() if p.requires_grad and "wte" in name}
    assert trained == {"transformer.wte.lora_A", "transformer.wte.lora_B", "transformer.wte.rows"}
    rows = embedding.rows.shape[0]
    assert rows < embedding.num_embeddings  # only the stored rows train one by one


def test_only_the_token_embedding_trains_as_rows_positions_train_dense(real_run, tmp_path):
    # GPT-2's wpe stored as rows (the positions whose update the threshold kept): as rows, a position
    # whose update was dropped could never train again, so from an artifact it trains dense.
    run = tmp_path / "run"
    shutil.copytree(real_run.run, run)
    last = run / real_run.trained.name / "model.safetensors"
    weights, init = load_file(last), load_file(run / "step-0" / "model.safetensors")
    weights["transformer.wpe.weight"][8:] = init["transformer.wpe.weight"][8:]  # only 8 positions moved
    save_file(weights, last, metadata={"format": "pt"})
    compress(run, tmp_path / "artifact", options=PlanOptions(rule=RankRule(threshold=0.9)))
    artifact = tmp_path / "artifact"
    assert read_manifest(artifact).tensors["transformer.wpe.weight"].kind == "lowrank+rows"
    model = load_compressed(artifact, zero_as_lowrank=True, rows_as_factors="input")
    positions = model.transformer.wpe
    assert type(positions) is torch.nn.Embedding and positions.weight.requires_grad
    assert torch.equal(positions.weight, load_compressed(artifact).transformer.wpe.weight)
    assert isinstance(model.get_input_embeddings(), RowsLowRankEmbedding)
    # A run's checkpoint loads every embedding in the form it was stored in.
    stored = load_compressed(artifact, zero_as_lowrank=True, rows_as_factors="all")
    assert isinstance(stored.transformer.wpe, RowsLowRankEmbedding)


@needs_data
def test_resumed_rows_start_at_the_artifact_and_train_fewer_parameters(rows_artifact, tmp_path):
    settings = dict(data=str(TEXT), steps=1, batch_size=4, block_size=16, seed=5, buffer=3)
    rows = resume(rows_artifact, tmp_path / "rows", settings)  # the default recipe trains the embedding as rows
    dense = resume(rows_artifact, tmp_path / "dense", {**settings, "embedding_training": "dense"})
    # The same first batch and dropout masks as the dense-embedding resume, whose step 0 is the artifact's model.
    assert read_metrics(tmp_path / "rows")[0]["loss"] == pytest.approx(read_metrics(tmp_path / "dense")[0]["loss"],
                                                                        rel=1e-5, abs=1e-5)
    embedding = load_compressed(rows_artifact).get_input_embeddings().weight
    saved_rows = read_manifest(rows_artifact).tensors["transformer.wte.weight"].rows
    assert dense.trainable_parameters - rows.trainable_parameters > (embedding.shape[0] - saved_rows - 3 * 50257) * 64
    stored = read_manifest(tmp_path / "rows" / "step-1").tensors
    assert stored["transformer.wte.weight"].kind == "lowrank+rows" and stored["lm_head.weight"].of == "transformer.wte.weight"
    assert stored["transformer.wpe.weight"].kind == "dense"  # trained dense (see above)
    # Every token of the training text has a row of its own, beside the rows the artifact stored.
    text_tokens = cached_tokens(TEXT, load_tokenizer(rows_artifact), None).unique()
    trained_rows = load_compressed(tmp_path / "rows" / "step-1", zero_as_lowrank=True,
                                   rows_as_factors="input").get_input_embeddings().row_index
    assert bool(torch.isin(text_tokens, trained_rows).all()) and stored["transformer.wte.weight"].rows > saved_rows


@needs_data
def test_a_rows_run_resumes_exactly(rows_artifact, tmp_path):
    run = tmp_path / "run"
    resume(rows_artifact, run, dict(data=str(TEXT), steps=6, batch_size=4, block_size=16, seed=5, buffer=3,
                                    save_every=3, log_every=1, embedding_training="rows"))
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "step-6")
    result = resume(copy, None, {})
    assert result.start_step == 3 and losses(copy) == losses(run)


def test_added_rows_start_at_zero_and_keep_the_index_sorted():
    generator = torch.Generator().manual_seed(0)
    layer = RowsLowRankEmbedding(torch.randn(1, 4, generator=generator), torch.randn(10, 1, generator=generator),
                                 torch.randn(3, 4, generator=generator), torch.tensor([1, 5, 8]),
                                 torch.randn(10, 4, generator=generator))
    before, stored = layer.weight.detach().clone(), layer.rows.detach().clone()
    assert layer.add_rows(torch.tensor([5, 2, 9, 2])) == 2
    assert layer.row_index.tolist() == [1, 2, 5, 8, 9]
    assert torch.equal(layer.weight.detach(), before)
    assert torch.equal(layer.rows[[0, 2, 3]].detach(), stored) and layer.rows[[1, 4]].eq(0).all()
    assert layer.add_rows(torch.tensor([1, 9])) == 0


def test_the_adam_split_keeps_the_weight_and_gives_a_rows_the_dense_rate():
    generator = torch.Generator().manual_seed(1)
    B, A = torch.randn(50, 2, generator=generator) * 5, torch.randn(2, 8, generator=generator) * 30
    A[1] = 0  # a zero component stays as it is
    layer = RowsLowRankEmbedding(A.clone(), B.clone(), torch.randn(3, 8, generator=generator), torch.tensor([1, 5, 8]),
                                 torch.randn(50, 8, generator=generator))
    before = layer.weight.detach().clone()
    layer.split_for_adam()
    assert torch.allclose(layer.weight.detach(), before, atol=1e-4)
    assert layer.lora_A[0].norm().item() == pytest.approx((8 / 2) ** 0.5, rel=1e-5)
    assert torch.equal(layer.lora_A[1], torch.zeros(8)) and torch.equal(layer.lora_B[:, 1], B[:, 1])
    # One Adam step of lr on B moves a row with no row of its own by lr * |A's row| per component whose
    # gradient is not zero: here one of k = 2, so lr * sqrt(d / k) (both: lr * sqrt(d), dense Adam's rate).
    layer.zero_grad()
    optimizer = torch.optim.Adam([layer.lora_B], lr=1e-3)
    layer.weight[20].sum().backward()
    optimizer.step()
    moved = (layer.weight[20] - before[20]).norm().item()
    assert moved == pytest.approx(1e-3 * 8 ** 0.5 * (1 / 2) ** 0.5, rel=0.05)


@needs_data
def test_a_resumed_rows_embedding_starts_adam_split(rows_artifact, tmp_path):
    resume(rows_artifact, tmp_path / "rows", dict(data=str(TEXT), steps=1, batch_size=4, block_size=16, seed=5,
                                                  embedding_training="rows"))
    start = load_compressed(tmp_path / "rows" / "step-0", zero_as_lowrank=True, rows_as_factors="all")
    embedding = start.get_input_embeddings()
    rank, dim = embedding.lora_A.shape
    assert rank >= 1
    assert torch.allclose(embedding.lora_A.norm(dim=1), torch.full((rank,), (dim / rank) ** 0.5), rtol=1e-4)
    dense = load_compressed(rows_artifact).get_input_embeddings().weight
    assert torch.allclose(embedding.weight, dense, atol=1e-5)


@needs_data
def test_stored_rows_of_tokens_the_text_never_uses_stay_fixed_and_resume_exactly(rows_artifact, tmp_path):
    text = tmp_path / "other.txt"  # few of the artifact's stored rows are tokens of this text
    text.write_text("Quantum chemistry of zeolite catalysts, measured twice in Zurich laboratories. " * 30)
    run = tmp_path / "run"
    resume(rows_artifact, run, dict(data=str(text), steps=4, batch_size=2, block_size=16, seed=5, save_every=2,
                                    log_every=1, embedding_training="rows"))
    tokens = cached_tokens(text, load_tokenizer(rows_artifact), None).unique()
    start = load_compressed(rows_artifact, zero_as_lowrank=True, rows_as_factors="input").get_input_embeddings()
    outside = start.row_index[~torch.isin(start.row_index, tokens)]
    assert outside.numel() > 100
    state = json.loads((run / "step-4" / "train_state" / "trainer_state.json").read_text())
    assert state["rows_trained"] == "text"
    embedding, dim = start, start.embedding_dim
    # Trained: one row per token of the text and the low-rank part (beside the factors of the linear layers).
    ended = load_compressed(run / "step-4", zero_as_lowrank=True, rows_as_factors="all").get_input_embeddings()
    assert bool(torch.isin(outside, ended.row_index).all())  # the fixed rows are stored with the others
    before = dict(zip(embedding.row_index.tolist(), embedding.rows.detach(), strict=True))
    after = dict(zip(ended.row_index.tolist(), ended.rows.detach(), strict=True))
    assert all(torch.equal(after[i], before[i]) for i in outside.tolist())
    assert any(not torch.equal(after[i], before.get(i, torch.zeros(dim))) for i in tokens.tolist())
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "step-4")
    result = resume(copy, None, {})
    assert result.start_step == 2 and losses(copy) == losses(run)
