"""compression/job.py: compress end to end: ranks, reconstruction, every input form and every reference mode."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inrank_convert import PlanOptions, RankRule, compress, open_artifact, read_manifest
from inrank_convert.artifact import ARTIFACT_FILE, FORMAT_VERSION, INIT_FILE, artifact_bytes
from inrank_convert.export.dense import decompress
from inrank_convert.linalg.gram import native_bfloat16
from tests.conftest import (
    PLANTED_RANK,
    energy_rank_float64,
    form_rank_float64,
    inrank_rank_float64,
    make_pair,
    snapshot,
)


def stored_names(artifact: Path) -> list[str]:
    """The tensor names inside the artifact's safetensors file, read with safetensors itself."""
    with safe_open(str(artifact / ARTIFACT_FILE), framework="pt") as handle:
        return list(handle.keys())


def options(threshold=0.9, criterion="energy-rest", **kwargs) -> PlanOptions:
    """A rank rule, factors in bfloat16 unless a storage is named (the rank and error checks here are
    about the truncation; int8's own are in tests/artifact/test_storage.py)."""
    kwargs.setdefault("quantize", None if "factor_dtype" in kwargs else "none")
    return PlanOptions(rule=RankRule(criterion, threshold), **kwargs)


def update(pair, name):
    return pair.trained_state[name].double() - pair.init_state[name].double()


def exact_rank(delta: torch.Tensor, threshold: float, criterion: str) -> int:
    oracles = {"energy": energy_rank_float64, "energy-rest": form_rank_float64, "inrank": inrank_rank_float64}
    return oracles[criterion](delta, threshold)


@pytest.mark.parametrize("criterion,threshold", [("energy-rest", 0.9), ("energy-rest", 0.5), ("energy", 0.9),
                                                 ("inrank", 0.9), ("inrank", 0.6)])
def test_ranks_equal_exact_float64_svd(tmp_path, any_pair, criterion, threshold):
    result = compress(any_pair.trained_dir, tmp_path / "out", init=any_pair.init_dir,
                      options=options(threshold, criterion))
    checked = 0
    for layer in result.layers:
        if layer.kind == "lowrank":
            assert layer.rank == exact_rank(update(any_pair, layer.name), threshold, criterion), layer.name
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("threshold", [0.9, 0.8])
def test_the_energy_criterion_keeps_the_smallest_rank_holding_the_threshold_on_dominant_updates(
        tmp_path, arch, threshold):
    """Every update has a dominant first component (65% of its energy) and a rank-4 rest: `--criterion
    energy` stores each at the smallest rank holding ``threshold`` of its energy, exactly (a float64
    oracle's), where energy-rest keeps more; the manifest says which rule made the artifact."""
    pair = make_pair(tmp_path, arch, dominant_share=0.65)
    names = pair.factorized_names()
    plain = {name: energy_rank_float64(update(pair, name), threshold) for name in names}
    rest = {name: form_rank_float64(update(pair, name), threshold) for name in names}
    assert len(names) >= 10 and all(rest[name] > plain[name] for name in names)  # the two rules differ on every one
    for criterion, oracle in (("energy", plain), ("energy-rest", rest)):
        out = tmp_path / criterion
        result = compress(pair.trained_dir, out, init=pair.init_dir, options=options(threshold, criterion))
        ranks = {layer.name: layer.rank for layer in result.layers if layer.kind == "lowrank"}
        assert set(ranks) == set(names), {layer.name: layer.kind for layer in result.layers}
        assert ranks == {name: oracle[name] for name in names}, criterion
        assert read_manifest(out).rule.criterion == criterion


def test_threshold_one_reproduces_trained_weights(tmp_path, any_pair):
    compress(any_pair.trained_dir, tmp_path / "out", init=any_pair.init_dir, options=options(1.0))
    artifact = open_artifact(tmp_path / "out")
    names = [name for name in any_pair.trained_state if name in artifact.tensors]
    assert names
    for name in names:
        assert torch.allclose(artifact.reconstruct(name), any_pair.trained_state[name], atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("engine", ["auto", "exact"])
def test_threshold_one_stores_the_numerical_rank_of_rounded_low_rank_updates(tmp_path, arch, engine):
    """Every 2-D tensor's update is exactly rank 4, made in float32 as W0 + U @ V (so W rounds): at -t 1.0
    the rounding is no rank, every one is stored at rank 4, and each trained weight is rebuilt to
    float32 rounding (the old energy slack stored most of them dense, at up to full rank)."""
    pair = make_pair(tmp_path, arch, noise=0.0)
    result = compress(pair.trained_dir, tmp_path / "out", init=pair.init_dir, options=options(1.0, engine=engine))
    ranks = {layer.name: (layer.kind, layer.rank) for layer in result.layers if layer.name in pair.factorized_names()}
    assert len(ranks) == len(pair.factorized_names()) >= 10
    assert ranks == {name: ("lowrank", PLANTED_RANK) for name in ranks}
    artifact = open_artifact(tmp_path / "out")
    eps = torch.finfo(torch.float32).eps
    names = [name for name in pair.trained_state if name in artifact.tensors]
    assert set(ranks) <= set(names)
    for name in names:
        source = pair.trained_state[name].double()
        error = float((artifact.reconstruct(name).double() - source).norm())
        assert error <= 4 * eps * float(source.norm()), (name, error / (eps * float(source.norm())))
    artifact.close()


def test_lower_threshold_error_is_the_optimal_truncation_error(tmp_path, llama_pair):
    result = compress(llama_pair.trained_dir, tmp_path / "out", init=llama_pair.init_dir, options=options(0.8))
    artifact = open_artifact(tmp_path / "out")
    assert any(layer.kind == "lowrank" for layer in result.layers)
    for layer in result.layers:
        if layer.kind != "lowrank":
            continue
        delta = update(llama_pair, layer.name)
        s = torch.linalg.svdvals(delta)
        optimal = math.sqrt(float((s[layer.rank:] ** 2).sum()))
        error = float((llama_pair.trained_state[layer.name].double() - artifact.reconstruct(layer.name).double()).norm())
        assert error == pytest.approx(optimal, rel=1e-3), layer.name


def test_decompress_loads_with_from_pretrained_and_matches(tmp_path, any_pair):
    from transformers import AutoModelForCausalLM

    compress(any_pair.trained_dir, tmp_path / "out", init=any_pair.init_dir, options=options(1.0))
    decompress(tmp_path / "out", tmp_path / "dense")
    original = AutoModelForCausalLM.from_pretrained(any_pair.trained_dir).eval()
    restored = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(original(tokens).logits, restored(tokens).logits, atol=1e-4)


def _round_trip(tmp_path, source, pair, **kwargs):
    out = tmp_path / "out"
    result = compress(source, out, options=options(1.0), force=True, **kwargs)
    artifact = open_artifact(out)
    assert artifact.tensors
    for name in artifact.tensors:
        assert torch.allclose(artifact.reconstruct(name), pair.trained_state[name], atol=1e-5), name
    artifact.close()
    return result


def test_every_input_form_round_trips(tmp_path, gpt2_pair):
    pair = gpt2_pair
    forms = {}
    forms["hf"] = pair.trained_dir
    sharded = tmp_path / "sharded"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(pair.trained_dir).save_pretrained(sharded, max_shard_size="100KB")
    forms["sharded"] = sharded
    binary = tmp_path / "binfolder"
    binary.mkdir()
    shutil.copy(pair.trained_dir / "config.json", binary)
    torch.save(pair.trained_state, binary / "pytorch_model.bin")
    forms["bin-folder"] = binary
    save_file({k: v for k, v in pair.trained_state.items() if k != "lm_head.weight"}, tmp_path / "w.safetensors")
    forms["safetensors"] = tmp_path / "w.safetensors"
    torch.save(pair.trained_state, tmp_path / "w.pt")
    forms["pt"] = tmp_path / "w.pt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in pair.trained_state.items()}, "epoch": 1},
               tmp_path / "w.ckpt")
    forms["ckpt"] = tmp_path / "w.ckpt"
    for form, source in forms.items():
        result = _round_trip(tmp_path, source, pair, init=pair.init_dir)
        assert result.reference_mode == "reference", form
        if form in ("bin-folder", "pt", "ckpt"):
            assert result.tied == {"lm_head.weight": "transformer.wte.weight"}, form


def test_run_folder_and_artifact_inputs(tmp_path, gpt2_pair):
    run = tmp_path / "run"
    shutil.copytree(gpt2_pair.init_dir, run / "step-0")
    shutil.copytree(gpt2_pair.trained_dir, run / "step-400")
    result = _round_trip(tmp_path, run, gpt2_pair)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.reference.path.endswith("step-0")
    assert manifest.source.run.endswith("run")
    assert result.reference_mode == "reference"
    # An artifact is itself a CKPT: re-compress it at a lower threshold against its own reference.
    shutil.move(tmp_path / "out", tmp_path / "first")
    again = compress(tmp_path / "first", tmp_path / "second", options=options(0.8))
    assert again.reference_mode == "reference"
    first_ranks = {layer.name: layer.rank for layer in result.layers if layer.kind == "lowrank"}
    assert any(layer.kind == "lowrank" for layer in again.layers)
    assert all(layer.rank <= first_ranks.get(layer.name, 10**9) for layer in again.layers if layer.kind == "lowrank")


def test_reference_modes_round_trip_and_seed_is_small(tmp_path, gpt2_pair):
    pair = gpt2_pair
    sizes = {}
    for mode, kwargs in {
        "reference": {"init": pair.init_dir},
        "embedded": {"init": pair.init_dir, "embed_init": True},
        "seed": {"init_seed": pair.init_seed},
        "seed-checked": {"init": pair.init_dir, "init_seed": pair.init_seed},
    }.items():
        out = tmp_path / mode
        result = compress(pair.trained_dir, out, options=options(0.9), **kwargs)
        assert result.reference_mode == mode.removesuffix("-checked")
        assert (out / INIT_FILE).is_file() == (mode == "embedded")
        sizes[mode] = artifact_bytes(out)
        artifact = open_artifact(out)
        reference = artifact.reference
        assert any(artifact.tensors.get(name) is not None and artifact.tensors[name].kind == "lowrank"
                   for name in pair.init_state), mode
        for name in pair.init_state:
            if name in artifact.tensors and artifact.tensors[name].kind == "lowrank":
                assert torch.equal(reference.get(name).float(), pair.init_state[name]), (mode, name)
    # Seed recipes store no init tensors; embedding stores all of them.
    assert sizes["seed"] * 3 < sizes["embedded"]
    assert read_manifest(tmp_path / "seed").reference.recipe["seed"] == pair.init_seed


def test_embedded_artifact_stands_alone(tmp_path, gpt2_pair):
    init_copy = tmp_path / "init-copy"
    shutil.copytree(gpt2_pair.init_dir, init_copy)
    compress(gpt2_pair.trained_dir, tmp_path / "out", init=init_copy, embed_init=True, options=options(1.0))
    shutil.rmtree(init_copy)
    artifact = open_artifact(tmp_path / "out")
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.allclose(artifact.reconstruct(name), gpt2_pair.trained_state[name], atol=1e-5)


def test_no_init_factorizes_the_weights(tmp_path, llama_pair):
    result = compress(llama_pair.trained_dir, tmp_path / "out", no_init=True, options=options(1.0))
    assert result.reference_mode == "zero"
    artifact = open_artifact(tmp_path / "out")
    for name, tensor in llama_pair.trained_state.items():
        assert torch.allclose(artifact.reconstruct(name), tensor, atol=1e-5)


def test_init_seed_that_does_not_match_the_init_is_refused(tmp_path, gpt2_pair):
    from inrank_convert.core.errors import InitReferenceError

    with pytest.raises(InitReferenceError, match="does not regenerate"):
        compress(gpt2_pair.trained_dir, tmp_path / "out", init=gpt2_pair.init_dir,
                 init_seed=gpt2_pair.init_seed + 1, options=options())
    assert not (tmp_path / "out").exists()


def test_unchanged_layer_is_rank_zero_and_stores_nothing(tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    pair = make_pair(tmp_path, "llama", unchanged=(name,))
    result = compress(pair.trained_dir, tmp_path / "out", init=pair.init_dir, options=options())
    layer = next(layer for layer in result.layers if layer.name == name)
    assert (layer.kind, layer.rank, layer.bytes) == ("zero", 0, 0)
    assert not any(stored.startswith(name) for stored in stored_names(tmp_path / "out"))
    assert torch.equal(open_artifact(tmp_path / "out").reconstruct(name), pair.trained_state[name])


def test_dense_fallback_when_low_rank_is_not_smaller(tmp_path, llama_pair):
    result = compress(llama_pair.trained_dir, tmp_path / "out", init=llama_pair.init_dir,
                      options=options(1.0))
    assert any(len(layer.shape) == 2 for layer in result.layers)
    for layer in result.layers:
        if len(layer.shape) == 2:
            rows, cols = layer.shape
            assert layer.kind == "dense" and layer.rank * (rows + cols) >= rows * cols, layer.name
            assert layer.bytes == layer.original_bytes
    assert not any(name.endswith((".lora_A", ".lora_B")) for name in stored_names(tmp_path / "out"))


def test_one_d_tensors_dense_and_tied_weights_stored_once(tmp_path, gpt2_pair):
    torch.save(gpt2_pair.trained_state, tmp_path / "trained.bin")
    result = compress(tmp_path / "trained.bin", tmp_path / "out", init=gpt2_pair.init_dir, options=options())
    assert result.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in {layer.name for layer in result.layers}
    assert any(len(layer.shape) == 1 for layer in result.layers)
    for layer in result.layers:
        if len(layer.shape) == 1:
            assert layer.kind == "dense"
    manifest = read_manifest(tmp_path / "out")
    assert manifest.tensors["lm_head.weight"].to_json() == {"kind": "alias", "of": "transformer.wte.weight",
                                                            "shape": [320, 64], "dtype": "float32"}
    artifact = open_artifact(tmp_path / "out")
    assert torch.allclose(artifact.reconstruct("lm_head.weight"), artifact.reconstruct("transformer.wte.weight"))


def test_embeddings_flag_and_include_exclude(tmp_path, llama_pair):
    def kinds(**kwargs):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        result = compress(llama_pair.trained_dir, out, init=llama_pair.init_dir, options=options(**kwargs))
        return {layer.name: layer.kind for layer in result.layers}

    default = kinds()
    assert default["model.embed_tokens.weight"] == "lowrank" and default["lm_head.weight"] == "lowrank"
    no_embeddings = kinds(embeddings=False)
    assert no_embeddings["model.embed_tokens.weight"] == "dense" and no_embeddings["lm_head.weight"] == "dense"
    assert no_embeddings["model.layers.0.mlp.up_proj.weight"] == "lowrank"
    only_mlp = kinds(include=("*.mlp.*",))
    assert only_mlp["model.layers.1.mlp.down_proj.weight"] == "lowrank"
    assert only_mlp["model.layers.1.self_attn.q_proj.weight"] == "dense"
    no_attention = kinds(exclude=("*self_attn*",))
    assert no_attention["model.layers.0.self_attn.v_proj.weight"] == "dense"
    assert no_attention["model.layers.0.mlp.gate_proj.weight"] == "lowrank"


def test_fixed_rank_and_factor_dtype(tmp_path, llama_pair):
    result = compress(llama_pair.trained_dir, tmp_path / "out", init=llama_pair.init_dir,
                      options=PlanOptions(rule=RankRule(fixed_rank=2), factor_dtype=torch.bfloat16))
    lowrank = [layer for layer in result.layers if layer.kind == "lowrank"]
    assert lowrank and all(layer.rank == 2 for layer in lowrank)
    assert read_manifest(tmp_path / "out").tensors[lowrank[0].name].storage == "bfloat16"
    B, A = open_artifact(tmp_path / "out").factors(lowrank[0].name)  # read back as float32
    assert B.dtype == A.dtype == torch.float32 and B.shape[1] == A.shape[0] == 2
    with safe_open(str(tmp_path / "out" / ARTIFACT_FILE), framework="pt") as handle:
        assert handle.get_slice(lowrank[0].name + ".lora_B").get_dtype() == "BF16"


def test_randomized_engine_matches_exact_in_compress(tmp_path, llama_pair):
    exact = compress(llama_pair.trained_dir, tmp_path / "exact", init=llama_pair.init_dir,
                     options=options(0.9, engine="exact"))
    randomized = compress(llama_pair.trained_dir, tmp_path / "randomized", init=llama_pair.init_dir,
                          options=options(0.9, engine="randomized"))
    assert any(layer.kind == "lowrank" for layer in exact.layers)
    for a, b in zip(exact.layers, randomized.layers, strict=True):
        assert a.kind == b.kind
        if a.kind == "lowrank":
            assert abs(a.rank - b.rank) <= 1, a.name
            assert math.sqrt(1 - b.energy) <= math.sqrt(1 - a.energy) * 1.01 + 1e-6 or b.rank > a.rank


def test_compress_never_touches_inputs_and_force_replaces(tmp_path, gpt2_pair):
    before = snapshot(gpt2_pair.trained_dir), snapshot(gpt2_pair.init_dir)
    compress(gpt2_pair.trained_dir, tmp_path / "out", init=gpt2_pair.init_dir, options=options(0.9))
    first = (tmp_path / "out" / ARTIFACT_FILE).read_bytes()
    compress(gpt2_pair.trained_dir, tmp_path / "out", init=gpt2_pair.init_dir, options=options(0.5), force=True)
    assert (tmp_path / "out" / ARTIFACT_FILE).read_bytes() != first
    assert (snapshot(gpt2_pair.trained_dir), snapshot(gpt2_pair.init_dir)) == before
    assert not list(tmp_path.glob(".inrank-tmp-*"))


def test_artifact_is_a_valid_safetensors_file_with_side_files(tmp_path, gpt2_pair):
    from safetensors.torch import load_file

    compress(gpt2_pair.trained_dir, tmp_path / "out", init=gpt2_pair.init_dir, options=options())
    tensors = load_file(tmp_path / "out" / ARTIFACT_FILE)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.to_json()["format"] == "inrank-convert" and manifest.version == FORMAT_VERSION == 4
    name = "transformer.h.1.attn.c_attn.weight"
    rank = manifest.tensors[name].rank
    assert tensors[name + ".lora_B"].shape == (64, rank) and tensors[name + ".lora_A"].shape == (rank, 192)
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "generation_config.json").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_gives_the_cpu_ranks(tmp_path, llama_pair):
    cpu = compress(llama_pair.trained_dir, tmp_path / "cpu", init=llama_pair.init_dir, options=options(0.9))
    gpu = compress(llama_pair.trained_dir, tmp_path / "gpu", init=llama_pair.init_dir,
                   options=options(0.9, device="cuda"))
    assert cpu.layers
    for a, b in zip(cpu.layers, gpu.layers, strict=True):
        assert a.kind == b.kind and (a.rank is None or abs(a.rank - b.rank) <= 1), a.name
    artifact = open_artifact(tmp_path / "gpu")
    name = "model.layers.0.mlp.up_proj.weight"
    assert artifact.factors(name)[0].device.type == "cpu"  # factors are always stored from the CPU


def _noise_embedding_pair(root: Path) -> tuple[Path, Path]:
    """A bfloat16 LLaMA pair (untied, vocab 320 x 64) whose embedding and LM head changed by
    Gaussian noise alone (a full-rank update), every other matrix by a planted low-rank update."""
    from tests.conftest import build_model, llama_config, save_hf, train_state

    model = build_model(llama_config(), seed=5).to(torch.bfloat16)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = {k: v.to(torch.bfloat16) for k, v in train_state({k: v.float() for k, v in init.items()}).items()}
    generator = torch.Generator().manual_seed(9)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        noise = torch.randn(init[name].shape, generator=generator)
        trained[name] = (init[name].float() + noise * (0.05 * init[name].float().norm() / noise.norm())).to(torch.bfloat16)
    return save_hf(model, init, root / "init"), save_hf(model, trained, root / "trained")


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_the_gram_engines_product_dtype_follows_the_storage(tmp_path, dtype, monkeypatch):
    """bfloat16 factors (the default) may be computed by a bfloat16 product where the CPU has it
    natively (engine "gram-bfloat16"); float32 factors (``--dtype float32``) never are. Either way
    the recorded error is what verify measures against the source, to the bfloat16 model's rounding."""
    from inrank_convert.compression.execution import product_dtype
    from inrank_convert.linalg import gram
    from inrank_convert.measure.verify import verify_artifact

    monkeypatch.setattr(gram, "REDUCED_PRODUCT_MIN_WORK", 0)  # the embeddings here are 320 x 64

    init, trained = _noise_embedding_pair(tmp_path)
    result = compress(trained, tmp_path / "out", init=init, options=options(0.9, factor_dtype=dtype))
    native = native_bfloat16(torch.device("cpu"))
    expected = "gram-bfloat16" if dtype is None and native else "gram"
    embeddings = [layer for layer in result.layers if layer.name in ("model.embed_tokens.weight", "lm_head.weight")]
    assert len(embeddings) == 2 and all(layer.engine == expected for layer in embeddings), embeddings
    assert product_dtype("float32", torch.device("cpu")) is None
    assert product_dtype("int8", torch.device("cpu")) == (torch.bfloat16 if native else None)
    checked = verify_artifact(tmp_path / "out", source=trained)
    assert checked.checksums_ok and checked.source_checked
    by_name = {layer.name: layer for layer in checked.layers}
    for layer in embeddings:
        check = by_name[layer.name]
        assert abs(check.measured_error - check.expected_error) <= check.rounding_error + 1e-4 * check.expected_error, check


def test_a_rank_near_the_break_even_is_said_in_the_report(tmp_path):
    """A noise-only embedding update: at t = 0.9 its rank lands just under the dense break-even
    (kept as low rank, said per tensor); at t = 0.97 past it (dense, with no full SVD)."""
    init, trained = _noise_embedding_pair(tmp_path)
    near = compress(trained, tmp_path / "near", init=init, options=options(0.9))
    embeddings = {layer.name: layer for layer in near.layers if layer.name in ("model.embed_tokens.weight", "lm_head.weight")}
    assert len(embeddings) == 2
    for name, layer in embeddings.items():  # 320 x 64: too small a product for bfloat16 to pay
        assert layer.kind == "lowrank" and layer.engine == "gram", (name, layer.kind, layer.engine)
        assert any(note.startswith(f"{name}: near the dense break-even") for note in near.notes), near.notes
    assert near.to_json()["notes"] == near.notes
    blocks = [layer for layer in near.layers if layer.kind == "lowrank" and layer.name not in embeddings]
    assert blocks and not any(note.startswith(layer.name) for layer in blocks for note in near.notes)
    past = compress(trained, tmp_path / "past", init=init, options=options(0.97))
    for layer in past.layers:
        if layer.name in embeddings:
            assert layer.kind == "dense" and layer.rank > 53 and layer.engine == "gram", (layer.name, layer.kind)


def test_the_same_inputs_write_the_same_bytes_with_source_date_epoch(tmp_path, gpt2_pair, monkeypatch):
    """The manifest's ``created`` is the only thing that differs between two runs; with
    $SOURCE_DATE_EPOCH it is fixed, and the artifact files are byte for byte the same."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1796515200")
    for name in ("first", "second"):
        compress(gpt2_pair.trained_dir, tmp_path / name, init=gpt2_pair.init_dir, options=options(0.9))
    first, second = ((tmp_path / name / ARTIFACT_FILE).read_bytes() for name in ("first", "second"))
    assert first == second
    assert read_manifest(tmp_path / "first").created == "2026-12-06T00:00:00+00:00"


def test_mixed_budget_is_allocated_again_under_the_header_of_the_bands_it_chose(gpt2_pair, tmp_path):
    """Every mixed tensor may take four bands, so the first allocation reserves header room for all
    of them; it is made again under the header of the bands it chose, and still fits."""
    from inrank_convert.compression.job import CompressionJob
    from inrank_convert.compression.targets import allocate_target, chosen_bands

    options = PlanOptions(quantize="mixed", target_ratio=0.1)
    with CompressionJob(gpt2_pair.trained_dir, init=gpt2_pair.init_dir, options=options) as job:
        target = job.default_target()
        loose = job.header(target)
        first = allocate_target(job.spectra(), target, loose)
        chosen = job.header(target, bands=chosen_bands(first))
        assert chosen < loose  # the tiny pair's tensors do not each take all four widths
        budget = job.allocate(target)
        assert budget != first  # the bytes the loose header held back were spent
        assert job.header(target, bands=chosen_bands(budget)) <= chosen
        job.write(tmp_path / "out", target)
    assert artifact_bytes(tmp_path / "out") <= target
