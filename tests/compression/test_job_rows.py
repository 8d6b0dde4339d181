"""The lowrank+rows kind and grown vocabularies through compress, load, verify, inspect and export-peft.

Real tiny GPT-2 (tied embeddings, Conv1D) and LLaMA (untied head, Linear) models, saved as Hugging
Face folders with their config.json:

- a fine-tune whose vocabulary grew by GROWN tokens (embedding and untied head have more rows than
  the base): compressed against the base, loaded, decompressed, verified, exported as a PEFT adapter
  over the base resized with ``resize_token_embeddings``;
- an update held by 5% of the rows only: stored as exactly those rows, and rebuilt bit for bit at
  threshold 1.0;
- a from-scratch-like token embedding (a rank-1 drift over every row + individual updates on 5% of
  the rows): lowrank+rows, which the PEFT adapter carries as an exact full-rank LoRA;
- damaged rows (index out of range, repeated; an int8 scale missing or of the wrong length):
  verify fails with one line.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_contract import expect_error, expect_ok
from conftest import build_model, gpt2_config, llama_config, planted_update, save_hf, train_state
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from inrank_convert import PlanOptions, RankRule, compress, load_compressed, open_artifact, read_manifest
from inrank_convert.artifact import ARTIFACT_FILE
from inrank_convert.artifact.format import MANIFEST_KEY
from inrank_convert.core.errors import ArtifactError
from inrank_convert.core.tensors import checksum
from inrank_convert.export.dense import decompress
from inrank_convert.export.peft_adapter import export_peft
from inrank_convert.measure.verify import verify_artifact

peft = pytest.importorskip("peft")

VOCAB = 320  # the tiny configs' vocabulary (conftest)
GROWN = 16  # tokens the fine-tune adds
WTE = "transformer.wte.weight"
# Token ids over the grown vocabulary, new tokens included.
TOKENS = torch.randint(0, VOCAB + GROWN, (2, 24), generator=torch.Generator().manual_seed(0))
OLD_TOKENS = TOKENS % VOCAB  # for models of the base vocabulary
ATOL = 1e-4


def logits(model, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens).logits


def config_for(arch: str, **overrides):
    return gpt2_config(**overrides) if arch == "gpt2" else llama_config(**overrides)


def load_adapter(base, adapter_dir: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and tied embeddings
        return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def decompressed_logits(artifact: Path, folder: Path, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    decompress(artifact, folder, force=True)
    return logits(AutoModelForCausalLM.from_pretrained(folder), tokens)


def run_json(args: list) -> dict:
    return json.loads(expect_ok(args).stdout)


# ---------------------------------------------------------------------------------------------
# A fine-tune whose vocabulary grew


@dataclass
class GrownPair:
    arch: str
    base_dir: Path
    ft_dir: Path
    base_state: dict[str, torch.Tensor]
    ft_state: dict[str, torch.Tensor]
    grown: list[str]  # the tensors with GROWN more rows than the base's (canonical names)


def grown_pair(folder: Path, arch: str) -> GrownPair:
    """base (vocabulary VOCAB) and a fine-tune of it with VOCAB + GROWN tokens: the old rows of the
    embedding (and untied head) move by a small rank-1 drift, the new rows are new; every other
    matrix gets a planted rank-2 update and every vector a small shift."""
    base = build_model(config_for(arch), seed=3)
    base_state = {name: tensor.detach().clone() for name, tensor in base.state_dict().items()}
    if arch == "gpt2":  # keep the tie in the state dict (clone() broke it)
        base_state["lm_head.weight"] = base_state[WTE]
    save_hf(base, base_state, folder / f"{arch}-base")

    fine_tune = build_model(config_for(arch, vocab_size=VOCAB + GROWN), seed=4)
    generator = torch.Generator().manual_seed(5)
    ft_state: dict[str, torch.Tensor] = {}
    grown = []
    for name, tensor in fine_tune.state_dict().items():
        old = base_state[name]
        if arch == "gpt2" and name == "lm_head.weight":
            continue  # tied to wte: set below
        if old.shape != tensor.shape:
            assert tensor.shape[0] == VOCAB + GROWN and old.shape[0] == VOCAB
            rows, cols = old.shape
            drift = torch.randn(rows, 1, generator=generator) @ torch.randn(1, cols, generator=generator)
            new_rows = 0.02 * torch.randn(GROWN, cols, generator=generator)
            ft_state[name] = torch.cat([old + drift * (0.05 * float(old.norm()) / float(drift.norm())), new_rows])
            grown.append(name)
        elif old.ndim == 2:
            ft_state[name] = old + planted_update(old.shape, 2, 0.3 * float(old.norm()), generator)
        else:
            ft_state[name] = old + 0.01 * torch.randn(old.shape, generator=generator)
    if arch == "gpt2":
        ft_state["lm_head.weight"] = ft_state[WTE]
    save_hf(fine_tune, ft_state, folder / f"{arch}-ft")
    return GrownPair(arch, folder / f"{arch}-base", folder / f"{arch}-ft", base_state, ft_state, grown)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def grown(request, tmp_path_factory):
    """A grown-vocabulary pair and its artifact at the default threshold (library compress)."""
    folder = tmp_path_factory.mktemp(f"grown-{request.param}")
    pair = grown_pair(folder, request.param)
    out = folder / "out"
    compress(pair.ft_dir, out, init=pair.base_dir)
    return pair, out


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


def test_grown_vocabulary_loads_like_its_decompressed_folder(grown, tmp_path):
    pair, out = grown
    model = load_compressed(out)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + GROWN
    expected = decompressed_logits(out, tmp_path / "dense")
    assert torch.allclose(logits(model), expected, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(pair.base_dir)
    # The compressed model is not the base model: the update is applied (old tokens, old vocabulary).
    assert (logits(base, OLD_TOKENS) - logits(model, OLD_TOKENS)[..., :VOCAB]).abs().max() > 100 * ATOL


def test_grown_vocabulary_verifies_every_layer(grown):
    pair, out = grown
    payload = run_json(["verify", out, "--json"])
    assert payload["ok"] and payload["source_checked"], payload
    stored = read_manifest(out).stored_entries()
    assert stored and {layer["name"] for layer in payload["layers"]} == set(stored)
    for layer in payload["layers"]:
        assert layer["measured_error"] is not None and layer["measured_error"] <= layer["expected_error"] + 1e-3, layer
    for name in pair.grown:
        [layer] = [layer for layer in payload["layers"] if layer["name"] == name]
        # Measured against trained - base padded with zero rows: the recorded error, not 0 or 1.
        assert 0.0 < layer["measured_error"] < 1.0
        assert layer["measured_error"] == pytest.approx(stored[name].error, rel=1e-3, abs=1e-5)


def test_grown_vocabulary_exports_a_peft_adapter_over_the_resized_base(grown, tmp_path):
    pair, out = grown
    payload = run_json(["export-peft", out, "-o", tmp_path / "adapter", "--json"])
    carried = {item["name"]: item for item in payload["carried_in_full"]}
    assert set(carried) == set(pair.grown)
    for item in carried.values():
        assert item["how"] == "modules_to_save" and "grown vocabulary" in item["why"], item
        assert f"resize_token_embeddings({VOCAB + GROWN})" in item["why"]
        assert item["bytes"] == len(item["modules"]) * (VOCAB + GROWN) * 64 * 4
        assert any(item["why"] == note for note in payload["notes"])
    assert payload["resize_token_embeddings"] == VOCAB + GROWN
    saved = {"lm_head", "transformer.wte"} if pair.arch == "gpt2" else {"lm_head", "model.embed_tokens"}
    assert saved <= set(payload["modules_to_save"])
    assert not saved & set(payload["target_modules"])

    base = AutoModelForCausalLM.from_pretrained(pair.base_dir)
    base.resize_token_embeddings(VOCAB + GROWN)
    model = load_adapter(base, tmp_path / "adapter")
    expected = logits(load_compressed(out))
    assert torch.allclose(logits(model), expected, atol=ATOL)
    # Without the trained modules the new tokens are wrong: the saved copies really are used.
    plain = AutoModelForCausalLM.from_pretrained(pair.base_dir)
    plain.resize_token_embeddings(VOCAB + GROWN)
    assert (logits(plain) - expected).abs().max() > 100 * ATOL


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
             options=PlanOptions(rule=RankRule("energy", 1.0), factor_dtype=torch.float32))
    tensors = read_manifest(out).tensors
    assert pair.grown
    for name in pair.grown:
        assert tensors[name].reference_rows == VOCAB, (
            f"{name} is {tensors[name].kind} without reference_rows (compression.execution.execute_entry: pass "
            "entry.reference_rows to the dense entry too)")


def test_inspect_shows_grown_rows(grown):
    pair, out = grown
    payload = run_json(["inspect", out, "--json"])
    layers = {layer["name"]: layer for layer in payload["layers"]}
    assert pair.grown
    for name in pair.grown:
        layer = layers[name]
        assert layer["kind"] == "lowrank+rows" and layer["rows"] >= GROWN and layer["reference_rows"] == VOCAB
        assert layer["storage"] == "bfloat16" and 0.0 < layer["error"] < 1.0
    table = expect_ok(["inspect", out]).stdout
    [line] = [line for line in table.splitlines() if pair.grown[0] in line]
    assert "lowrank+rows" in line and f"{layers[pair.grown[0]]['rows']} ({GROWN} new)" in line
    assert "bfloat16" in line
    totals = next(row for row in table.splitlines() if "reference:" in row)
    assert f"{len(pair.grown)} lowrank+rows" in totals


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
# A from-scratch-like token embedding: a rank-1 drift + rows, carried by PEFT as a full-rank LoRA


def drifted_gpt2(folder: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """init and trained GPT-2: planted updates everywhere; wte = init + a rank-1 drift holding >90%
    of the update's energy, nonzero on every row, + individual updates on 5% of the rows."""
    model = build_model(gpt2_config(), seed=7)
    init = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    init["lm_head.weight"] = init[WTE]
    trained = train_state(init, seed=2)
    generator = torch.Generator().manual_seed(3)
    drift = (1.0 + 0.1 * torch.rand(VOCAB, 1, generator=generator)) @ torch.randn(1, 64, generator=generator)
    drift *= 0.5 * float(init[WTE].norm()) / float(drift.norm())
    seen = torch.randperm(VOCAB, generator=generator)[:VOCAB // 20]
    individual = torch.zeros(VOCAB, 64)
    individual[seen] = torch.randn(seen.numel(), 64, generator=generator)
    individual *= 0.25 * float(drift.norm()) / float(individual.norm())  # ~6% of the energy
    update = drift + individual
    assert float(drift.pow(2).sum()) > 0.9 * float(update.pow(2).sum()) and bool((drift != 0).all())
    trained[WTE] = trained["lm_head.weight"] = init[WTE] + update
    save_hf(model, init, folder / "init")
    save_hf(model, trained, folder / "trained")
    return folder / "init", folder / "trained", trained


@pytest.fixture(scope="module", params=[None, "int8"])
def drifted(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"drift-{request.param}")
    init_dir, trained_dir, trained = drifted_gpt2(folder)
    out = folder / "out"
    compress(trained_dir, out, init=init_dir, options=PlanOptions(quantize=request.param))
    return init_dir, trained_dir, out, request.param


def test_drifted_embedding_is_stored_as_rank_one_plus_rows(drifted):
    _, _, out, quantize = drifted
    entry = read_manifest(out).tensors[WTE]
    assert entry.kind == "lowrank+rows" and entry.rank == 1 and 0 < entry.rows <= VOCAB // 20, entry
    assert entry.storage == (quantize or "bfloat16")


def test_export_peft_carries_rows_as_an_exact_full_rank_lora(drifted, tmp_path):
    init_dir, _, out, _ = drifted
    payload = run_json(["export-peft", out, "-o", tmp_path / "adapter", "--json"])
    [item] = [item for item in payload["carried_in_full"] if item["name"] == WTE]
    assert item["how"] == "full_rank_lora" and sorted(item["modules"]) == ["lm_head", "transformer.wte"]
    assert item["bytes"] == 2 * 4 * 64 * (VOCAB + 64) and "row-sparse" in item["why"]
    assert item["why"] in payload["notes"] and payload["resize_token_embeddings"] is None
    assert {"lm_head", "transformer.wte"} <= set(payload["full_rank"])
    assert all(entry["name"] != WTE or entry["how"] for entry in payload["carried_in_full"])

    model = load_adapter(AutoModelForCausalLM.from_pretrained(init_dir), tmp_path / "adapter")
    compressed = load_compressed(out)
    assert torch.allclose(logits(model, OLD_TOKENS), logits(compressed, OLD_TOKENS), atol=ATOL)
    artifact = open_artifact(out)
    try:
        # The adapter's update is the artifact's whole update: B @ A and the rows (int8 scales applied).
        update = artifact.reconstruct(WTE).float() - artifact.reference.get(WTE).float()
        B, A = artifact.factors(WTE)
        assert B.dtype == A.dtype == torch.float32
        assert (update - B @ A).abs().max() > 1e-3  # the rows matter: a LoRA of B @ A alone would miss them
    finally:
        artifact.close()
    modules = dict(model.base_model.model.named_modules())
    for module in ("transformer.wte", "lm_head"):
        assert torch.allclose(modules[module].get_delta_weight("default"), update, atol=1e-6), module


def test_inspect_shows_rows_and_storage(drifted):
    _, _, out, quantize = drifted
    storage = quantize or "bfloat16"
    payload = run_json(["inspect", out, "--json"])
    layers = {layer["name"]: layer for layer in payload["layers"]}
    assert layers and all({"name", "shape", "kind", "rank", "energy", "bytes", "dtype", "rows", "storage", "error"}
                          <= set(layer) for layer in layers.values())
    entry = read_manifest(out).tensors[WTE]
    wte = layers[WTE]
    assert (wte["kind"], wte["rank"], wte["rows"], wte["storage"]) == ("lowrank+rows", 1, entry.rows, storage)
    assert wte["error"] == pytest.approx(entry.error) and 0.0 < wte["error"] < 0.5
    assert wte["reference_rows"] is None
    dense = layers["transformer.h.0.ln_1.weight"]
    assert dense["kind"] == "dense" and dense["rows"] is None and dense["storage"] == "float32"
    assert layers["transformer.h.0.attn.c_attn.weight"]["storage"] == storage

    lines = expect_ok(["inspect", out]).stdout.splitlines()
    header = next(line for line in lines if "tensor" in line and "kind" in line)
    assert "rows" in header and "storage" in header and "rank" in header and "energy" in header
    [row] = [line for line in lines if WTE in line]
    cells = row.replace("│", " ").split()
    assert cells[:5] == [WTE, f"{VOCAB}x64", "lowrank+rows", "1", str(entry.rows)] and cells[-1] == storage
    totals = next(line for line in lines if "reference:" in line)
    assert "1 lowrank+rows" in totals


# ---------------------------------------------------------------------------------------------
# Damaged rows and scales: one line, non-zero exit


def rewrite(artifact: Path, change) -> None:
    """Rewrite the artifact file after ``change(tensors)``, with checksums recomputed, so that only
    the structure is wrong (what a buggy writer would produce)."""
    file = artifact / ARTIFACT_FILE
    with safe_open(str(file), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = dict(handle.metadata())
    change(tensors)
    manifest = json.loads(metadata[MANIFEST_KEY])
    manifest["checksums"] = {name: checksum(tensor) for name, tensor in tensors.items()}
    metadata[MANIFEST_KEY] = json.dumps(manifest)
    save_file(tensors, str(file), metadata=metadata)


def damaged_copy(out: Path, folder: Path, change) -> Path:
    copy = folder / "damaged"
    shutil.copytree(out, copy)
    rewrite(copy, change)
    return copy


@pytest.mark.parametrize("damage,says", [
    ("out of range", ("row_index", "outside")),
    ("repeated", ("row_index", "repeats")),
])
def test_verify_refuses_a_bad_row_index(drifted, tmp_path, damage, says):
    _, _, out, _ = drifted
    index_name = WTE + ".row_index"

    def change(tensors):
        index = tensors[index_name].clone()
        assert index.numel() >= 2
        index[-1] = VOCAB if damage == "out of range" else index[0]
        tensors[index_name] = index

    copy = damaged_copy(out, tmp_path, change)
    line = expect_error(["verify", copy], says=(*says, "re-run compress"), inputs=(copy,))
    assert line.startswith("error: verification failed")
    result = verify_artifact(copy)
    assert not result.ok and result.damaged and "row_index" in result.problem()
    assert not result.layers  # nothing measured on a damaged file
    for args in (["inspect", copy], ["verify", out]):
        expect_ok(args)  # inspect reads the header alone; the original is untouched
    with pytest.raises(ArtifactError, match="row_index"):
        load_compressed(copy)


@pytest.mark.parametrize("drifted", ["int8"], indirect=True)  # scales exist in int8 artifacts only
def test_verify_refuses_a_missing_or_wrong_int8_scale(drifted, tmp_path):
    _, _, out, quantize = drifted
    assert quantize == "int8"
    missing = damaged_copy(out, tmp_path / "missing", lambda tensors: tensors.pop(WTE + ".rows_scale"))
    expect_error(["verify", missing], says=("rows_scale", "lacks"), inputs=(missing,))

    def shorten(tensors):
        tensors[WTE + ".lora_scale"] = torch.ones(2)  # rank 1: one scale expected

    wrong = damaged_copy(out, tmp_path / "wrong", shorten)
    # Refused when the artifact is opened, from the header alone: the scale's shape against the rank.
    line = expect_error(["verify", wrong], says=("lora_scale", "rank 1"), inputs=(wrong,))
    assert "is F32 [2]" in line and "needs" in line and line.endswith("[1]: " + str(wrong / "inrank.safetensors")
                                                                      + " (the file is damaged: re-run compress)")


def test_reference_only_base_of_a_grown_vocabulary_loads(grown, tmp_path):
    """decompress --reference-only of a grown-vocabulary artifact writes the base: its config.json
    says the base's vocabulary, so from_pretrained loads it, and base + adapter (after the resize)
    is the compressed model."""
    pair, _ = grown
    out = tmp_path / "embedded"
    compress(pair.ft_dir, out, init=pair.base_dir, embed_init=True)
    decompress(out, tmp_path / "base", reference_only=True)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert base.config.vocab_size == VOCAB == base.get_input_embeddings().num_embeddings
    export_peft(out, tmp_path / "adapter")
    base.resize_token_embeddings(VOCAB + GROWN)
    assert torch.allclose(logits(load_adapter(base, tmp_path / "adapter")), logits(load_compressed(out)), atol=ATOL)
