"""compression/job.py, the lowrank+rows kind: compress of a fine-tune whose vocabulary grew, of an
update held by a few rows, and of a from-scratch-like token embedding (a rank-1 drift + own rows).

Real tiny GPT-2 (tied embeddings, Conv1D) and LLaMA (untied head, Linear) models (helpers/rows.py,
conftest's ``grown`` and ``drifted``), saved as Hugging Face folders with their config.json:

- a fine-tune whose vocabulary grew by GROWN tokens (embedding and untied head have more rows than
  the base): compressed against the base into rows holding every new token; at threshold 1 the
  artifact is the fine-tune itself (loaded, decompressed, verified, exported as a PEFT adapter);
- an update held by 5% of the rows only: stored as exactly those rows, and rebuilt bit for bit at
  threshold 1.0;
- a from-scratch-like token embedding (a rank-1 drift over every row + individual updates on 5% of
  the rows): lowrank+rows.

Loading, verifying, inspecting and exporting these artifacts is tested beside those modules
(runtime/test_modeling.py, measure/test_verify.py, cli/test_inspect.py, export/test_peft_adapter.py,
export/test_dense.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from inrank_convert import PlanOptions, RankRule, compress, load_compressed, open_artifact, read_manifest
from inrank_convert.export.peft_adapter import export_peft
from tests.conftest import build_model, gpt2_config, save_hf
from tests.helpers.cli_contract import expect_ok, run_json
from tests.helpers.rows import ATOL, GROWN, OLD_TOKENS, VOCAB, WTE, decompressed_logits, load_adapter, logits

pytest.importorskip("peft")  # the threshold-1 fine-tune is checked through a PEFT adapter too


# ---------------------------------------------------------------------------------------------
# A fine-tune whose vocabulary grew


def test_grown_vocabulary_compresses_to_rows_holding_every_new_token(grown):
    pair, out = grown
    expected = ["model.embed_tokens.weight", "lm_head.weight"] if pair.arch == "llama" else [WTE]
    assert sorted(pair.grown) == sorted(expected)
    tensors = read_manifest(out).tensors
    if pair.arch == "gpt2":  # the tied head is wte (save_pretrained drops it, or the artifact aliases it)
        assert "lm_head.weight" not in tensors or tensors["lm_head.weight"].of == WTE
    artifact = open_artifact(out)
    try:
        for name in pair.grown:
            entry = tensors[name]
            assert entry.kind == "lowrank+rows", (name, entry)
            assert entry.shape == (VOCAB + GROWN, 64) and entry.reference_rows == VOCAB
            index, rows = artifact.rows(name)
            assert set(range(VOCAB, VOCAB + GROWN)) <= set(index.tolist()), name
            assert entry.rows == index.numel() == rows.shape[0]
            # The new rows are stored rows: rebuilt to bf16 precision (the default storage below 1).
            rebuilt = artifact.reconstruct(name)
            assert torch.allclose(rebuilt[VOCAB:], pair.ft_state[name][VOCAB:], atol=1e-3), name
    finally:
        artifact.close()


def test_grown_vocabulary_at_threshold_one_is_the_fine_tune(grown, tmp_path):
    """compress through the CLI at threshold 1.0, float32: the artifact is the fine-tune itself."""
    pair, _ = grown
    out = tmp_path / "exact"
    payload = run_json(["compress", pair.ft_dir, "--init", pair.base_dir, "-o", out, "--threshold", "1.0",
                        "--dtype", "float32", "--json"])
    layers = {layer["name"]: layer for layer in payload["layers"]}
    assert pair.grown and all(layers[name]["kind"] in ("lowrank+rows", "dense") for name in pair.grown)
    fine_tune = logits(AutoModelForCausalLM.from_pretrained(pair.ft_dir))
    assert torch.allclose(logits(load_compressed(out)), fine_tune, atol=ATOL)
    assert torch.allclose(decompressed_logits(out, tmp_path / "dense"), fine_tune, atol=ATOL)
    verified = run_json(["verify", out, "--json"])
    assert verified["ok"] and verified["source_checked"] and len(verified["layers"]) == len(layers)
    export_peft(out, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(pair.base_dir)
    base.resize_token_embeddings(VOCAB + GROWN)
    assert torch.allclose(logits(load_adapter(base, tmp_path / "adapter")), fine_tune, atol=ATOL)


def test_a_dense_grown_tensor_records_its_reference_rows(grown, tmp_path):
    """At threshold 1.0 a grown tensor may be stored dense; its entry must still say that the
    reference had fewer rows (inspect shows it; readers need not compare shapes)."""
    pair, _ = grown
    out = tmp_path / "exact"
    compress(pair.ft_dir, out, init=pair.base_dir,
             options=PlanOptions(rule=RankRule("energy-rest", 1.0), factor_dtype=torch.float32))
    tensors = read_manifest(out).tensors
    assert pair.grown
    for name in pair.grown:
        assert tensors[name].reference_rows == VOCAB, (
            f"{name} is {tensors[name].kind} without reference_rows (compression.execution.execute_entry: pass "
            "entry.reference_rows to the dense entry too)")


# ---------------------------------------------------------------------------------------------
# An update held by a few rows: exact at threshold 1.0


def on_grid(tensor: torch.Tensor, bits: int = 20) -> torch.Tensor:
    """Round to multiples of 2^-bits: sums and differences of such numbers below 2 are exact in
    float32 (24-bit mantissa), so an exact reconstruction can be asked for bit for bit; bfloat16
    (8 bits) could not hold them."""
    return torch.round(tensor * 2**bits) / 2**bits


def test_rows_round_trip_exactly_at_threshold_one(tmp_path):
    model = build_model(gpt2_config(), seed=8)
    init = {name: on_grid(tensor.detach().clone()) for name, tensor in model.state_dict().items()}
    init["lm_head.weight"] = init[WTE]
    generator = torch.Generator().manual_seed(9)
    changed = torch.sort(torch.randperm(VOCAB, generator=generator)[:VOCAB // 20]).values  # 5% of the rows
    trained = dict(init)
    wte = init[WTE].clone()
    wte[changed] += on_grid(0.05 * torch.randn(changed.numel(), 64, generator=generator))
    trained[WTE] = trained["lm_head.weight"] = wte
    assert torch.equal(torch.nonzero((wte != init[WTE]).any(dim=1)).flatten(), changed)
    save_hf(model, init, tmp_path / "init")
    save_hf(model, trained, tmp_path / "trained")

    out = tmp_path / "out"
    expect_ok(["compress", tmp_path / "trained", "--init", tmp_path / "init", "-o", out, "--threshold", "1.0",
               "--dtype", "float32"])
    entry = read_manifest(out).tensors[WTE]
    assert entry.kind == "lowrank+rows" and entry.rows == changed.numel() and entry.storage == "float32"
    assert entry.energy == 1.0 and entry.error == 0.0
    artifact = open_artifact(out)
    try:
        index, _ = artifact.rows(WTE)
        assert torch.equal(index, changed)
        assert torch.equal(artifact.reconstruct(WTE), trained[WTE])
        unchanged = [name for name, e in artifact.tensors.items() if e.kind == "zero"]
        assert unchanged and all(torch.equal(artifact.reconstruct(name), trained[name]) for name in unchanged)
    finally:
        artifact.close()
    assert torch.equal(logits(load_compressed(out), OLD_TOKENS),
                       logits(AutoModelForCausalLM.from_pretrained(tmp_path / "trained"), OLD_TOKENS))


# ---------------------------------------------------------------------------------------------
# A from-scratch-like token embedding: a rank-1 drift + rows


def test_drifted_embedding_is_stored_as_rank_one_plus_rows(drifted):
    _, _, out, quantize = drifted
    entry = read_manifest(out).tensors[WTE]
    assert entry.kind == "lowrank+rows" and entry.rank == 1 and 0 < entry.rows <= VOCAB // 20, entry
    assert entry.storage == ("bfloat16" if quantize == "none" else quantize)
