"""Tiny real models built in fixtures: "trained" = init + planted rank-k updates + small noise."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Token caches of train/resume: one per test session (subprocesses inherit it), never the user's home.
os.environ.setdefault("INRANK_CONVERT_CACHE", tempfile.mkdtemp(prefix="inrank-token-cache-"))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PLANTED_RANK = 4
NOISE = 0.02  # noise norm relative to the planted update's norm (about 0.04% of its energy)


def gpt2_config(**overrides):
    from transformers import GPT2Config

    settings = dict(n_embd=64, n_layer=2, n_head=2, vocab_size=320, n_positions=64, bos_token_id=0, eos_token_id=0)
    settings.update(overrides)
    return GPT2Config(**settings)


def llama_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=320, max_position_embeddings=64, bos_token_id=0,
                    eos_token_id=0, tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def planted_update(shape, rank: int, scale: float, generator: torch.Generator, noise: float = NOISE) -> torch.Tensor:
    rows, cols = shape
    left = torch.randn(rows, rank, generator=generator)
    right = torch.randn(rank, cols, generator=generator)
    # Distinct singular values so that every truncation is unique.
    weights = torch.linspace(1.0, 0.3, rank)
    update = (left * weights) @ right
    update *= scale / update.norm()
    if not noise:  # an exactly rank-k update (no noise draw: the generator's stream is the caller's)
        return update
    extra = torch.randn(rows, cols, generator=generator)
    return update + extra * (noise * scale / extra.norm())


def train_state(init_state: dict[str, torch.Tensor], seed: int = 1, rank: int = PLANTED_RANK,
                unchanged: tuple[str, ...] = (), noise: float = NOISE) -> dict[str, torch.Tensor]:
    """init + planted rank-k update (+ noise, relative to its norm) on every 2-D tensor; small shifts on 1-D ones."""
    generator = torch.Generator().manual_seed(seed)
    trained = {}
    seen: dict[int, str] = {}
    for name, tensor in init_state.items():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:  # tied: keep it tied
            trained[name] = trained[seen[pointer]]
            continue
        seen[pointer] = name
        if name in unchanged:
            trained[name] = tensor.clone()
        elif tensor.ndim == 2:
            scale = 0.3 * float(tensor.norm())
            trained[name] = tensor + planted_update(tensor.shape, rank, scale, generator, noise)
        else:
            trained[name] = tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
    return trained


def energy_rank_float64(delta: torch.Tensor, threshold: float) -> int:
    """Oracle: smallest r with sum(s[:r]^2) >= t * ||delta||_F^2, all in float64."""
    s = torch.linalg.svdvals(delta.double())
    total = float((delta.double() ** 2).sum())
    cumulative = torch.cumsum(s**2, 0)
    return int(torch.nonzero(cumulative >= threshold * total * (1 - 1e-9))[0, 0]) + 1


def form_rank_float64(delta: torch.Tensor, threshold: float) -> int:
    """Oracle of compress's energy rule (forms.py): when the leading component alone holds at least
    half of the energy, keep it and ``threshold`` of the energy left after it; else the plain rule."""
    s = torch.linalg.svdvals(delta.double())
    total = float((delta.double() ** 2).sum())
    dominant = float(s[0] ** 2) if float(s[0] ** 2) >= 0.5 * total else 0.0
    target = dominant + threshold * (total - dominant)
    cumulative = torch.cumsum(s**2, 0)
    return int(torch.nonzero(cumulative >= target * (1 - 1e-9))[0, 0]) + 1


def inrank_rank_float64(delta: torch.Tensor, threshold: float) -> int:
    """Oracle: InRank's loop, written as in the paper's code (one r at a time), in float64."""
    s = torch.linalg.svdvals(delta.double())
    for r in range(s.numel() + 1):
        tail = s.clone()
        tail[:r] = 0
        if 1 - torch.var(tail) / torch.var(s) >= threshold - 1e-12:
            return r
    return s.numel()


@dataclass
class ModelPair:
    """An init and a trained model saved as Hugging Face folders, with their state dicts."""

    arch: str
    config: object
    init_dir: Path
    trained_dir: Path
    init_state: dict[str, torch.Tensor]
    trained_state: dict[str, torch.Tensor]
    init_seed: int

    def factorized_names(self) -> list[str]:
        return [n for n, t in self.trained_state.items() if t.ndim == 2 and n != "lm_head.weight" or
                (n == "lm_head.weight" and not getattr(self.config, "tie_word_embeddings", False))]


def save_hf(model, state: dict[str, torch.Tensor], folder: Path) -> Path:
    model.load_state_dict(state)
    model.save_pretrained(folder)
    return folder


def make_pair(tmp_path: Path, arch: str = "gpt2", seed: int = 7, unchanged: tuple[str, ...] = (),
              noise: float = NOISE) -> ModelPair:
    config = gpt2_config() if arch == "gpt2" else llama_config()
    model = build_model(config, seed)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if arch == "gpt2":  # keep the tie of the model's own state dict
        init_state["lm_head.weight"] = init_state["transformer.wte.weight"]
    trained_state = train_state(init_state, unchanged=unchanged, noise=noise)
    init_dir = save_hf(model, init_state, tmp_path / f"{arch}-init")
    trained_dir = save_hf(model, trained_state, tmp_path / f"{arch}-trained")
    return ModelPair(arch, config, init_dir, trained_dir, init_state, trained_state, seed)


@pytest.fixture
def gpt2_pair(tmp_path) -> ModelPair:
    return make_pair(tmp_path, "gpt2")


@pytest.fixture
def llama_pair(tmp_path) -> ModelPair:
    return make_pair(tmp_path, "llama")


@pytest.fixture(params=["gpt2", "llama"])
def any_pair(request, tmp_path) -> ModelPair:
    return make_pair(tmp_path, request.param)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file below ``folder``: to prove an input was not touched."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


REAL_TEXT = SHARED_DATA / "tinyshakespeare" / "input.txt"
GPT2_TOKENIZER_DIR = SHARED_DATA / "gpt2-tokenizer"
REAL_STEPS = 60
REAL_EVAL_TOKENS = 4096
needs_real_data = pytest.mark.skipif(not (REAL_TEXT.is_file() and (GPT2_TOKENIZER_DIR / "vocab.json").is_file()),
                                     reason=f"shared data (Tiny Shakespeare, GPT-2 tokenizer) absent under {SHARED_DATA}")


@dataclass
class RealRun:
    trained: Path  # the last step's folder
    run: Path  # the run folder
    train_text: Path  # what it was trained on (and calibrates on)
    eval_text: Path  # held out
    tokens: torch.Tensor  # the first REAL_EVAL_TOKENS ids of eval_text (GPT-2 tokenizer)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory) -> RealRun:
    """A real run: 2x64 GPT-2 (GPT-2 tokenizer), 60 steps on the first 90% of the first 300 KB of
    Tiny Shakespeare; the last 10% is held out."""
    if not (REAL_TEXT.is_file() and (GPT2_TOKENIZER_DIR / "vocab.json").is_file()):
        pytest.skip(f"shared data (Tiny Shakespeare, GPT-2 tokenizer) absent under {SHARED_DATA}")
    from transformers import GPT2Config

    from inrank_convert.inputs.text import load_tokenizer, tokenize_text
    from inrank_convert.training.entrypoints import train
    from inrank_convert.training.options import TrainOptions

    root = tmp_path_factory.mktemp("real")
    text = REAL_TEXT.read_text()[:300_000]
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    (root / "train.txt").write_text(text[:cut])
    (root / "val.txt").write_text(text[cut:])
    GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=64, vocab_size=50257, bos_token_id=50256,
               eos_token_id=50256).save_pretrained(root / "config")
    train(root / "config" / "config.json", root / "run",
          TrainOptions(data=str(root / "train.txt"), steps=REAL_STEPS, batch_size=8, block_size=64, lr=3e-3,
                       tokenizer=str(GPT2_TOKENIZER_DIR), log_every=1000))
    tokens = tokenize_text(text[cut:], load_tokenizer(None, GPT2_TOKENIZER_DIR), REAL_EVAL_TOKENS)
    return RealRun(root / "run" / f"step-{REAL_STEPS}", root / "run", root / "train.txt", root / "val.txt", tokens)
