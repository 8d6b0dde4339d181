"""Benchmark 4: tokens/s and peak memory of load_compressed (factored, merged) vs the dense model.

A LLaMA-shaped model (hidden 1024, 4 layers, untied head, GPT-2 vocabulary) with random
weights is compressed with --no-init at rank n/4 (hidden 1024 -> rank 256), so every Linear
runs as two skinny matmuls. Each variant runs in a fresh process (so peak memory is its own
VmHWM) over the same real text (WikiText-2 test, GPT-2 tokenizer; random tokens if
../shared/data is absent), with the same forward loop, alternating variants, best of two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .common import BenchResult, human_bytes, log, scratch_dir

NAME = "runtime"
HIDDEN, LAYERS, RANK = 1024, 4, 256  # rank = hidden / 4
WINDOW, WINDOWS = 256, 8
REPEATS = 2
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = ("dense", "merged", "factored")


def device() -> str:
    return os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def build(root: Path) -> tuple[Path, Path, Path]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from inrank_convert import PlanOptions, RankRule, compress

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2816, num_hidden_layers=LAYERS, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=50257, max_position_embeddings=WINDOW,
                         tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "dense")
    compress(root / "dense", root / "factored", no_init=True,
             options=PlanOptions(rule=RankRule(fixed_rank=RANK), include=("*_proj.weight", "lm_head.weight")))
    tokens = text_tokens()
    torch.save(tokens, root / "tokens.pt")
    return root / "dense", root / "factored", root / "tokens.pt"


def text_tokens() -> torch.Tensor:
    vocab, merges = DATA / "gpt2-tokenizer" / "vocab.json", DATA / "gpt2-tokenizer" / "merges.txt"
    text = DATA / "wikitext-2-raw" / "wiki.test.raw"
    needed = WINDOW * WINDOWS
    if vocab.is_file() and text.is_file():
        from transformers import GPT2TokenizerFast

        tokenizer = GPT2TokenizerFast(vocab=str(vocab), merges=str(merges))
        ids = tokenizer(text.read_text()[: needed * 8])["input_ids"][:needed]
        return torch.tensor(ids, dtype=torch.long)
    return torch.randint(0, 50257, (needed,), generator=torch.Generator().manual_seed(0))


def child(variant: str, model_dir: str, tokens_file: str, device_name: str) -> None:
    """Runs in a fresh process: load one variant, time the forward loop, print JSON."""
    from transformers import AutoModelForCausalLM

    from inrank_convert import load_compressed

    started = time.perf_counter()
    if variant == "dense":
        model = AutoModelForCausalLM.from_pretrained(model_dir).to(device_name).eval()
    else:
        model = load_compressed(model_dir, device=device_name, merge=variant == "merged")
    load_seconds = time.perf_counter() - started
    windows = torch.load(tokens_file, weights_only=True).view(WINDOWS, 1, WINDOW).to(device_name)  # [n, 1, window]
    with torch.no_grad():
        model(windows[0])  # warm-up: allocator, kernels
        synchronize(device_name)
        started = time.perf_counter()
        for window in windows:
            model(window)
        synchronize(device_name)
    seconds = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    peak_gpu = torch.cuda.max_memory_allocated() if device_name.startswith("cuda") else None
    print(json.dumps({"tokens_per_second": WINDOW * WINDOWS / seconds, "load_seconds": load_seconds,
                      "vm_hwm_bytes": vm_hwm(), "gpu_peak_bytes": peak_gpu, "stored_numbers": parameters}))


def synchronize(device_name: str) -> None:
    if device_name.startswith("cuda"):
        torch.cuda.synchronize()


def vm_hwm() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_variant(variant: str, model_dir: Path, tokens: Path, device_name: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.bench_runtime", variant, str(model_dir), str(tokens), device_name]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"{variant} run failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run() -> list[BenchResult]:
    device_name = device()
    with scratch_dir("inrank-bench-runtime-") as root:
        started = time.perf_counter()
        dense_dir, factored_dir, tokens = build(root)
        log(f"built the model and its rank-{RANK} --no-init artifact in {time.perf_counter() - started:.1f} s")
        runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
        for _ in range(REPEATS):
            for variant in VARIANTS:
                runs[variant].append(run_variant(variant, dense_dir if variant == "dense" else factored_dir,
                                                 tokens, device_name))
    best = {variant: max(results, key=lambda r: r["tokens_per_second"]) for variant, results in runs.items()}
    speed = {variant: best[variant]["tokens_per_second"] for variant in VARIANTS}
    memory_key = "gpu_peak_bytes" if device_name.startswith("cuda") else "vm_hwm_bytes"
    memory = {variant: min(r[memory_key] for r in runs[variant]) for variant in VARIANTS}
    for variant in VARIANTS:
        log(f"{variant:8s} {speed[variant]:8.0f} tokens/s, peak {human_bytes(memory[variant])}, "
            f"load {best[variant]['load_seconds']:.2f} s")
    details = {"device": device_name, "hidden": HIDDEN, "layers": LAYERS, "rank": RANK, "tokens": WINDOW * WINDOWS,
               "window": WINDOW, "runs": runs, "memory_measure": memory_key}
    merged_ratio = speed["merged"] / speed["dense"]
    factored_ratio = speed["factored"] / speed["dense"]
    memory_ratio = memory["factored"] / memory["dense"]
    on = device_name.split(":")[0]
    return [
        BenchResult(f"merged vs dense forward ({on})", f"{speed['merged']:.0f} tok/s", f"dense {speed['dense']:.0f} tok/s",
                    merged_ratio, "merged / dense speed", ">= 0.95", merged_ratio >= 0.95, details),
        BenchResult(f"factored r=n/4 vs dense forward ({on})", f"{speed['factored']:.0f} tok/s",
                    f"dense {speed['dense']:.0f} tok/s", factored_ratio, "factored / dense speed",
                    ">= 1.5 (GPU target)", factored_ratio >= 1.5, details),
        BenchResult(f"factored vs dense peak memory ({on})", human_bytes(memory["factored"]),
                    f"dense {human_bytes(memory['dense'])}", memory_ratio, "factored / dense memory", "< 1",
                    memory_ratio < 1.0, details),
    ]


if __name__ == "__main__":
    child(*sys.argv[1:5])
