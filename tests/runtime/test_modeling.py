"""runtime/modeling.py: load_compressed builds a running model equal to the decompressed one: its
LowRankLinear layers compute what their dense reconstruction does, for a grown vocabulary and for a
version-1 artifact (written by hand, helpers/old_artifact.py) too."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from inrank_convert import PlanOptions, RankRule, compress, load_compressed, read_manifest
from inrank_convert.core.errors import ArtifactError
from inrank_convert.export.dense import decompress
from inrank_convert.model.layers import LowRankLinear
from inrank_convert.runtime.evaluate import perplexity
from inrank_convert.runtime.modeling import load_dense, model_config
from tests.conftest import build_model, llama_config
from tests.helpers import rows
from tests.helpers.eval_models import needs_data
from tests.helpers.old_artifact import LOWRANK

TOKENS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def compressed(tmp_path, pair, threshold=0.9, **kwargs):
    out = tmp_path / "out"
    compress(pair.trained_dir, out, options=PlanOptions(rule=RankRule("energy-rest", threshold)),
             **({"init": pair.init_dir} | kwargs))
    return out


@pytest.mark.parametrize("merge", [False, True])
def test_logits_equal_the_decompressed_model(tmp_path, any_pair, merge):
    out = compressed(tmp_path, any_pair)
    decompress(out, tmp_path / "dense")
    expected = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval())
    model = load_compressed(out, merge=merge)
    assert not model.training
    assert torch.allclose(logits(model), expected, atol=1e-5)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers and all(layer.merged == merge for layer in layers)


def test_every_factorized_linear_becomes_low_rank(tmp_path, llama_pair):
    out = compressed(tmp_path, llama_pair)
    model = load_compressed(out)
    low_rank = {name for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    from inrank_convert import read_manifest

    expected = {name.removesuffix(".weight") for name, entry in read_manifest(out).tensors.items()
                if entry.kind == "lowrank" and not name.endswith("embed_tokens.weight")}
    assert low_rank == expected
    # The embedding (rows gathered, not multiplied) is rebuilt dense.
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)


def test_the_default_int8_artifact_loads_balanced_factors(tmp_path, llama_pair):
    """What a resumed run trains from: each LowRankLinear's B column and A row have equal norms
    (compress stores int8 by default; the whole scale on one side trained badly)."""
    out = tmp_path / "out"
    compress(llama_pair.trained_dir, out, init=llama_pair.init_dir)
    layers = [m for m in load_compressed(out).modules() if isinstance(m, LowRankLinear)]
    assert layers and all(entry.storage == "int8" for entry in read_manifest(out).tensors.values()
                          if entry.kind == "lowrank")
    for layer in layers:
        B, A = layer.lora_B.detach(), layer.lora_A.detach()  # [out, r], [r, in]
        assert torch.allclose(B.norm(dim=0), A.norm(dim=1), rtol=1e-4), layer


def test_gpt2_conv1d_and_tied_head(tmp_path, gpt2_pair):
    model = load_compressed(compressed(tmp_path, gpt2_pair))
    assert isinstance(model.transformer.h[0].mlp.c_fc, LowRankLinear)
    assert model.lm_head.weight is model.transformer.wte.weight
    reference = gpt2_pair.trained_state["transformer.h.0.ln_1.bias"]
    assert torch.equal(model.transformer.h[0].ln_1.bias, reference)


def test_no_init_artifact_has_no_reference_weights(tmp_path, llama_pair):
    out = compressed(tmp_path, llama_pair, threshold=0.9, no_init=True, init=None)
    model = load_compressed(out)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers and all(layer.weight_ref is None for layer in layers)
    decompress(out, tmp_path / "dense")
    assert torch.allclose(logits(model), logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")), atol=1e-5)


def test_seed_reference_and_bfloat16(tmp_path, gpt2_pair):
    out = compressed(tmp_path, gpt2_pair, init=None, init_seed=gpt2_pair.init_seed)
    full = load_compressed(out)
    half = load_compressed(out, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    assert torch.allclose(logits(half).float(), logits(full), atol=0.1, rtol=0.05)


def test_missing_config_is_a_clear_error(tmp_path, gpt2_pair):
    out = compressed(tmp_path, gpt2_pair)
    (out / "config.json").unlink()
    with pytest.raises(ArtifactError, match="no config.json"):
        load_compressed(out)


def test_config_of_another_model_is_refused(tmp_path, gpt2_pair, llama_pair):
    out = compressed(tmp_path, gpt2_pair)
    shutil.copy(llama_pair.trained_dir / "config.json", out / "config.json")
    with pytest.raises(ArtifactError, match="no parameter of the llama model"):
        load_compressed(out)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_logits_match_cpu(tmp_path, llama_pair):
    out = compressed(tmp_path, llama_pair)
    cpu = logits(load_compressed(out))
    gpu = load_compressed(out, device="cuda")
    with torch.no_grad():
        assert torch.allclose(gpu(TOKENS.cuda()).logits.cpu(), cpu, atol=1e-3)


@pytest.mark.parametrize("factorized", [False, True])
def test_equal_but_untied_tensors_are_both_filled(tmp_path, factorized):
    """An untied LLaMA whose head equals its embedding: compress stores one as an alias of the other
    (value tie), and load_compressed must still fill both parameters, whether the canonical one is
    stored dense or swapped out for a LowRankLinear."""
    from safetensors.torch import save_file

    config = llama_config()  # tie_word_embeddings=False
    model = build_model(config, 3)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["model.embed_tokens.weight"] = state["lm_head.weight"].clone()  # equal values, separate storage
    folder = tmp_path / "untied"
    model.config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    rule = RankRule("energy-rest", 1.0, fixed_rank=4) if factorized else RankRule("energy-rest", 1.0)
    result = compress(folder, out, no_init=True, options=PlanOptions(rule=rule))
    assert len(result.tied) == 1  # the value tie was found
    canonical = next(iter(result.tied.values()))
    assert (next(layer for layer in result.layers if layer.name == canonical).kind == "lowrank") == factorized
    expected = build_model(config, 3)
    expected.load_state_dict(state if not factorized else _decompressed_state(out, tmp_path))
    loaded = load_compressed(out)
    assert torch.allclose(logits(loaded), logits(expected.eval()), atol=1e-4)
    embedding = loaded.get_input_embeddings().weight
    assert torch.allclose(embedding, expected.get_input_embeddings().weight, atol=1e-5)


def _decompressed_state(out, tmp_path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    decompress(out, tmp_path / "dense")
    return load_file(tmp_path / "dense" / "model.safetensors")


@needs_data
def test_low_rank_layers_compute_what_their_dense_reconstruction_does(eval_models, wiki_tokens):
    """LowRankLinear (never forming B @ A) and the dense W_ref + B @ A give the same perplexity."""
    compressed = load_compressed(eval_models.half)
    assert any(type(module).__name__ == "LowRankLinear" for module in compressed.modules())
    dense = load_dense(eval_models.half, model_config(eval_models.half))  # the artifact read as a checkpoint
    low_rank = perplexity(compressed, wiki_tokens)
    reconstructed = perplexity(dense, wiki_tokens)
    assert low_rank.nll == pytest.approx(reconstructed.nll, rel=1e-5)


def test_grown_vocabulary_loads_like_its_decompressed_folder(grown, tmp_path):
    pair, out = grown
    model = load_compressed(out)
    assert model.get_input_embeddings().weight.shape[0] == rows.VOCAB + rows.GROWN
    expected = rows.decompressed_logits(out, tmp_path / "dense")
    assert torch.allclose(rows.logits(model), expected, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(pair.base_dir)
    # The compressed model is not the base model: the update is applied (old tokens, old vocabulary).
    assert (rows.logits(base, rows.OLD_TOKENS) - rows.logits(model, rows.OLD_TOKENS)[..., :rows.VOCAB]).abs().max() > 100 * rows.ATOL


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
