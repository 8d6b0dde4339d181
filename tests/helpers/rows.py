"""Models whose update lives in rows: a fine-tune whose vocabulary grew (``grown_pair``), a
from-scratch-like token embedding (a rank-1 drift over every row + own updates on a few rows:
``drifted_gpt2``, ``plant_rows``), and what the tests of the lowrank+rows kind compare them with.
conftest's ``grown`` and ``drifted`` fixtures compress them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from inrank_convert.export.dense import decompress
from tests.conftest import (
    ModelPair,
    build_model,
    gpt2_config,
    llama_config,
    planted_update,
    save_hf,
    train_state,
)

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
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and tied embeddings
        return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def decompressed_logits(artifact: Path, folder: Path, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    decompress(artifact, folder, force=True)
    return logits(AutoModelForCausalLM.from_pretrained(folder), tokens)


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


def plant_rows(pair: ModelPair, name: str, rows: int = 12, seed: int = 0) -> torch.Tensor:
    """Make tensor ``name`` of the pair's trained model its init + a drift shared by every row (a
    rank-1 term holding ~96% of the update's energy) + own updates on ``rows`` rows; rewrites the
    trained folder. Returns the planted row indices."""
    init = pair.init_state[name]
    generator = torch.Generator().manual_seed(seed)
    count, width = init.shape
    drift = torch.ones(count, 1) @ torch.randn(1, width, generator=generator)
    drift *= 0.5 * float(init.norm()) / float(drift.norm())
    index = torch.randperm(count, generator=generator)[:rows]
    own = torch.randn(rows, width, generator=generator)
    own *= 0.2 * float(drift.norm()) / float(own.norm())
    update = drift
    update[index] += own
    trained = (init + update).contiguous()
    file = pair.trained_dir / "model.safetensors"
    state = load_file(file)
    assert name in state
    state[name] = trained
    save_file(state, file, metadata={"format": "pt"})
    old = pair.trained_state[name]
    for key, value in list(pair.trained_state.items()):  # a tied name is the same tensor
        if value is old:
            pair.trained_state[key] = trained
    return index


EMBED = "model.embed_tokens.weight"


def seen_rows_llama(folder: Path, seen: int = 24) -> tuple[Path, Path, torch.Tensor]:
    """init and fine-tuned LLaMA (untied): planted updates on every matrix (norms unchanged) but the
    token embedding, whose update is a shared direction + an own update on ``seen`` rows only (the
    tokens a fine-tune's text holds: an untied input embedding gets no gradient on the others).
    Returns (init, trained, the seen rows)."""
    model = build_model(llama_config(), seed=11)
    init = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    trained = train_state(init, seed=5, unchanged=tuple(name for name, tensor in init.items() if tensor.ndim == 1))
    generator = torch.Generator().manual_seed(6)
    index = torch.randperm(VOCAB, generator=generator)[:seen].sort().values
    update = torch.zeros(VOCAB, 64)
    update[index] = torch.randn(1, 64, generator=generator) + 0.5 * torch.randn(seen, 64, generator=generator)
    update *= 0.5 * float(init[EMBED].norm()) / float(update.norm())
    trained[EMBED] = init[EMBED] + update
    save_hf(model, init, folder / "init")
    save_hf(model, trained, folder / "trained")
    return folder / "init", folder / "trained", index
