"""Fixtures every test folder shares: tiny real models ("trained" = init + planted rank-k updates +
small noise), the shared data's paths, a real training run, and the models and artifacts that tests
of several packages read. Helpers that are not fixtures live in tests/helpers/."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from tests.helpers.eval_models import EvalModels
    from tests.helpers.old_artifact import OldArtifact

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Token caches of train/resume: one per test session (subprocesses inherit it), never the user's home.
os.environ.setdefault("INRANK_CONVERT_CACHE", tempfile.mkdtemp(prefix="inrank-token-cache-"))

REPO = Path(__file__).resolve().parents[1]  # the repository root (this file is tests/conftest.py)
SHARED_DATA = REPO.parent / "shared" / "data"
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


def dominant_update(shape, rank: int, scale: float, generator: torch.Generator, share: float) -> torch.Tensor:
    """A rank-1 component holding about ``share`` of the energy (orthogonal to the rest) plus a
    rank-``rank`` update with slowly decaying values: the spectrum on which the plain energy rule and
    ``energy-rest`` part ways."""
    rows, cols = shape
    left, _ = torch.linalg.qr(torch.randn(rows, rank + 1, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(cols, rank + 1, generator=generator))
    rest = torch.linspace(1.0, 0.5, rank)
    rest = rest * ((1 - share) / float(rest.pow(2).sum())) ** 0.5
    values = torch.cat([torch.tensor([share ** 0.5]), rest])  # sum of squares 1
    return scale * (left * values) @ right.T


def train_state(init_state: dict[str, torch.Tensor], seed: int = 1, rank: int = PLANTED_RANK,
                unchanged: tuple[str, ...] = (), noise: float = NOISE,
                dominant_share: float | None = None) -> dict[str, torch.Tensor]:
    """init + planted rank-k update (+ noise, relative to its norm) on every 2-D tensor; small shifts
    on 1-D ones. ``dominant_share``: each 2-D update is a dominant component holding that share of
    its energy plus a rank-k rest (``dominant_update``, no noise)."""
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
            planted = planted_update(tensor.shape, rank, scale, generator, noise) if dominant_share is None \
                else dominant_update(tensor.shape, rank, scale, generator, dominant_share)
            trained[name] = tensor + planted
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
    """Oracle of the energy-rest criterion (compress's default): when the leading component alone
    holds at least half of the energy, keep it and ``threshold`` of the energy left after it; else
    the plain rule."""
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
              noise: float = NOISE, dominant_share: float | None = None) -> ModelPair:
    config = gpt2_config() if arch == "gpt2" else llama_config()
    model = build_model(config, seed)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if arch == "gpt2":  # keep the tie of the model's own state dict
        init_state["lm_head.weight"] = init_state["transformer.wte.weight"]
    trained_state = train_state(init_state, unchanged=unchanged, noise=noise, dominant_share=dominant_share)
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


# --------------------------------------------------------------------------- shared by several folders

# A short real text and a byte-level BPE trained on it (``tokenizer_file``) whose ids fit the tiny
# models' 320-token vocabulary: what the end-to-end CLI tests tokenize.
RIVER_TEXT = " ".join([
    "the river ran past the old mill and the miller watched the water turn the wheel all day.",
    "in the evening the lamps were lit and the children came home from the fields along the river.",
    "a boat came down the river with apples and bread, and the miller bought a basket of each.",
    "when the rain fell the water rose, and the wheel turned faster than the miller had ever seen.",
] * 12)


def byte_level_bpe(text: str, vocab_size: int = 320):
    """A real byte-level BPE (tokenizers' ``Tokenizer``) trained on ``text``: ``vocab_size`` ids at most,
    so its ids fit the fixture models' 320-token vocabulary (and GPT-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tokenizer.train_from_iterator([text], trainer)
    return tokenizer


def saved_byte_level_bpe(text: str, folder: Path) -> Path:
    """``byte_level_bpe(text)`` saved as ``folder/tokenizer.json``; returns that file."""
    path = folder / "tokenizer.json"
    byte_level_bpe(text).save(str(path))
    return path


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    """A real byte-level BPE trained on RIVER_TEXT, its ids below the models' 320."""
    tokenizer = byte_level_bpe(RIVER_TEXT)
    assert tokenizer.get_vocab_size() <= 320
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory) -> EvalModels:
    """GPT-2-vocabulary models with the GPT-2 tokenizer and two artifacts of them (helpers/eval_models.py),
    built once per session."""
    from tests.helpers.eval_models import HAS_DATA, build_eval_models

    if not HAS_DATA:
        pytest.skip(f"shared data (GPT-2 tokenizer, WikiText-2) absent under {SHARED_DATA}")
    return build_eval_models(tmp_path_factory.mktemp("eval-models"))


@pytest.fixture(params=["zero", "reference"])
def old(request, tmp_path) -> OldArtifact:
    """A version-1 artifact written by hand (helpers/old_artifact.py), with a zero or a path reference."""
    from tests.helpers.old_artifact import write_old_artifact

    return write_old_artifact(tmp_path, request.param)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def grown(request, tmp_path_factory):
    """A grown-vocabulary pair (helpers/rows.py) and its artifact at the default threshold (library compress)."""
    from inrank_convert import compress
    from tests.helpers.rows import grown_pair

    folder = tmp_path_factory.mktemp(f"grown-{request.param}")
    pair = grown_pair(folder, request.param)
    out = folder / "out"
    compress(pair.ft_dir, out, init=pair.base_dir)
    return pair, out


@pytest.fixture(scope="module", params=["none", "int8"])
def drifted(request, tmp_path_factory):
    """A GPT-2 pair whose token embedding drifted (helpers/rows.py), compressed in bfloat16
    (``--quantize none``) and in int8 (the default): (init, trained, artifact, quantize)."""
    from inrank_convert import PlanOptions, compress
    from tests.helpers.rows import drifted_gpt2

    folder = tmp_path_factory.mktemp(f"drift-{request.param}")
    init_dir, trained_dir, trained = drifted_gpt2(folder)
    out = folder / "out"
    compress(trained_dir, out, init=init_dir, options=PlanOptions(quantize=request.param))
    return init_dir, trained_dir, out, request.param


@pytest.fixture(scope="session")
def shakespeare_ids() -> torch.Tensor:
    """Token ids of the first 200 KB of Tiny Shakespeare under a 320-id byte-level BPE trained on it."""
    from tests.helpers.calibration import TEXT, VOCAB, WINDOW

    if not TEXT.is_file():
        pytest.skip(f"Tiny Shakespeare absent under {SHARED_DATA}")
    text = TEXT.read_text()[:200_000]
    ids = torch.tensor(byte_level_bpe(text, VOCAB).encode(text).ids, dtype=torch.long)
    assert ids.numel() > 50 * WINDOW and int(ids.max()) < VOCAB and int(ids.min()) >= 0
    return ids
