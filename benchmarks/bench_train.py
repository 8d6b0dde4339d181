"""Benchmark 5: time of one training step (forward + backward + AdamW) of InRank-Efficient vs dense.

A GPT-2-small-shaped model (width 768, 12 heads, 12 layers, context 256, dropout 0, random
weights) trains in float32 on one fixed batch of 8 x 128 random tokens. InRank-Efficient is the
same model after ``factorize_model(efficient=True, factorize="mlp")`` as the InRank reference
trains it in stage 2 (after its ranks are frozen): every MLP matrix becomes B @ A of width
2 x 128 = 256, a third of the full rank 768 (the reference's GPT-2 small settles near 250), with no
dense reference; attention, embeddings and the tied LM head stay dense. The main row has GPT-2's
50257-token vocabulary (whose tied head is a large share of the step); for the second row both
models' tied embedding is resized to 8192 tokens (the rest of each model is kept, so the SVDs of
the factorization run once). Both models warm up, then their steps alternate (dense, InRank,
dense, ...) and each keeps its median. Targets (issue 12): InRank-Efficient's step <= 0.8x dense's
on CPU (dense / InRank >= 1.25); >= 1.3x faster on GPU (the paper's GPT-2 figure).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .bench_runtime import device, synchronize
from .common import BenchResult, fmt_seconds, log

NAME = "train"
EMBED, HEADS, LAYERS, CONTEXT = 768, 12, 12, 256
FACTORIZE = "mlp"  # the reference's layers
BUFFER = EMBED // 6  # efficient factors are 2 x buffer wide: a third of the full rank
BATCH, BLOCK = 8, 128
LEARNING_RATE = 1e-4
WARMUP_STEPS = 2
TIMED_STEPS = {50257: 5, 8192: 8}  # vocabulary -> timed steps per model (the full vocab's are slower)
BUILD_VOCAB = next(iter(TIMED_STEPS))
TARGETS = {"cpu": 1.25, "cuda": 1.3}  # dense / InRank step time


def build(vocab: int, device_name: str) -> tuple[nn.Module, nn.Module]:
    """(dense, InRank-Efficient) models with the same initial weights, in training mode."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from inrank_convert.training.rank_control import RankPolicy, factorize_model

    config = GPT2Config(vocab_size=vocab, n_embd=EMBED, n_head=HEADS, n_layer=LAYERS, n_positions=CONTEXT,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1,
                        eos_token_id=vocab - 1)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    inrank = copy.deepcopy(dense)
    # Rank = buffer = 128: width 256 = n/3, the factors the init's best rank-256 approximation.
    factorize_model(inrank, RankPolicy(buffer=BUFFER, growth="exact"), efficient=True,
                    generator=torch.Generator().manual_seed(0), factorize=FACTORIZE, initial_rank=BUFFER)
    return dense.to(device_name).train(), inrank.to(device_name).train()


def timed_step(model: nn.Module, batch: torch.Tensor, device_name: str) -> Callable[[], float]:
    """A function that runs one optimizer step of ``model`` on ``batch`` and returns its seconds."""
    from inrank_convert.training.loop import batch_loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)

    def step() -> float:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        batch_loss(model, batch).backward()
        optimizer.step()
        synchronize(device_name)
        return time.perf_counter() - started

    return step


def measure(dense: nn.Module, inrank: nn.Module, vocab: int, timed_steps: int, device_name: str) -> dict:
    """Median step seconds of both models at ``vocab`` (their tied embedding resized to it)."""
    for model in (dense, inrank):
        if model.config.vocab_size != vocab:
            model.resize_token_embeddings(vocab, mean_resizing=False)
    batch = torch.randint(0, vocab, (BATCH, BLOCK + 1), generator=torch.Generator().manual_seed(0)).to(device_name)
    steps = {"dense": timed_step(dense, batch, device_name), "inrank": timed_step(inrank, batch, device_name)}
    for _ in range(WARMUP_STEPS):
        for step in steps.values():
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(timed_steps):
        for name, step in steps.items():
            seconds[name].append(step())
    median = {name: statistics.median(times) for name, times in seconds.items()}
    # Neighbouring steps share the machine's load, so their ratio resists drifting contention.
    paired_ratio = statistics.median(d / i for d, i in zip(seconds["dense"], seconds["inrank"], strict=True))
    for name, times in seconds.items():
        log(f"vocab {vocab}: {name:6s} median {median[name] * 1000:.0f} ms/step {fmt_seconds(times)}")
    log(f"vocab {vocab}: median of the paired dense / inrank ratios {paired_ratio:.2f}")
    return {"vocab": vocab, "median_seconds": median, "step_seconds": seconds, "paired_ratio_median": paired_ratio,
            "trainable_parameters": {"dense": count_parameters(dense), "inrank": count_parameters(inrank)}}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run() -> list[BenchResult]:
    from inrank_convert.training.rank_control import low_rank_layers

    device_name = device()
    on = device_name.split(":")[0]
    target = TARGETS[on]
    started = time.perf_counter()
    dense, inrank = build(BUILD_VOCAB, device_name)
    factorized = [layer for _, layer in low_rank_layers(inrank)]
    width_ratio = statistics.mean(layer.rank / min(layer.in_features, layer.out_features) for layer in factorized)
    log(f"built both models in {time.perf_counter() - started:.1f} s; {len(factorized)} factorized layers, "
        f"mean width {width_ratio:.3f} of full rank")
    setup = {"device": device_name, "embed": EMBED, "heads": HEADS, "layers": LAYERS, "batch": BATCH, "block": BLOCK,
             "buffer": BUFFER, "warmup_steps": WARMUP_STEPS, "dtype": "float32", "mean_width_ratio": width_ratio,
             "widths": sorted({layer.rank for layer in factorized}),
             "factorize": FACTORIZE, "note": "attention, embeddings and the tied LM head stay dense"}
    results = []
    for vocab, timed_steps in TIMED_STEPS.items():
        measured = measure(dense, inrank, vocab, timed_steps, device_name)
        dense_seconds, inrank_seconds = measured["median_seconds"]["dense"], measured["median_seconds"]["inrank"]
        ratio = dense_seconds / inrank_seconds
        results.append(BenchResult(
            f"InRank-Efficient (MLP width n/3) vs dense train step, GPT-2 small, vocab {vocab} ({on})",
            f"{inrank_seconds * 1000:.0f} ms/step, width {width_ratio:.2f} n",
            f"dense {dense_seconds * 1000:.0f} ms/step", ratio, "dense / inrank time",
            f">= {target:g} ({on} target)", ratio >= target, {**setup, **measured}))
    return results
