"""Benchmark 1: ``compress`` wall time vs a plain read of the same two checkpoints (GPT-2 small).

The pair: init = ``AutoModelForCausalLM.from_config(GPT2Config())`` under ``torch.manual_seed(0)``
(124M parameters); trained = init + for every 2-D weight a planted rank-32 update (norm 0.3x
the weight's) with Gaussian noise holding 5% of the update's energy; 1-D tensors get small noise.

Baseline (docs/design.md §11): one streaming pass with ``safe_open`` over both files that loads every
tensor pair and computes the Frobenius norm of (trained - init) in float32: the least work any
delta compressor must do. Both files are read once first so both sides run from the page cache.

Two compress sides, alternated with the read: a first compress (the hash cache off, so it reads and
hashes both inputs, as a compress of a new checkpoint does) and a repeat compress (both inputs'
sha256 remembered by the hash cache, as in a sweep or a second threshold). The hash cache lives in a
scratch folder of this run, never the user's.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time
from pathlib import Path
from unittest import mock

import torch

from inrank_convert.weights import hash_cache

from .common import BenchResult, best_of, fmt_seconds, log, planted_update, scratch_dir, warm_page_cache

NAME = "compress"
TARGET_RATIO = 4.0
PLANTED_RANK = 32
UPDATE_SCALE = 0.3  # update norm relative to the weight's norm
NOISE_FRACTION = 0.05  # share of the update's energy that is Gaussian noise
VECTOR_NOISE = 1e-3  # std of the noise added to 1-D tensors (biases, norms)
THRESHOLD = 0.9
REPEATS = 3
PROFILE_TOP = 15


def build_pair(root: Path) -> tuple[Path, Path, int]:
    """Write init/ and trained/ Hugging Face folders (save_pretrained) under ``root``; (init, trained, parameters)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers import AutoModelForCausalLM, GPT2Config
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    init_dir, trained_dir = root / "init", root / "trained"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config())
    model.save_pretrained(init_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.ndim == 2:
                rows, cols = parameter.shape
                norm = UPDATE_SCALE * float(torch.linalg.vector_norm(parameter))
                parameter += planted_update(rows, cols, PLANTED_RANK, norm, NOISE_FRACTION, generator)
            else:
                parameter += VECTOR_NOISE * torch.randn(parameter.shape, generator=generator)
    model.save_pretrained(trained_dir)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    return init_dir, trained_dir, parameters


def plain_read(trained_file: Path, init_file: Path) -> float:
    """Stream both checkpoints tensor by tensor; return sum of ||trained - init||_F (float32)."""
    from safetensors import safe_open

    total = 0.0
    with safe_open(str(trained_file), framework="pt", device="cpu") as trained, \
            safe_open(str(init_file), framework="pt", device="cpu") as init:
        for name in trained.keys():
            weight = trained.get_tensor(name).to(torch.float32)
            reference = init.get_tensor(name).to(torch.float32)
            total += float(torch.linalg.vector_norm(weight - reference))
    return total


def _phase_breakdown(init_dir: Path, trained_dir: Path, options) -> dict[str, float]:
    """Time compress's steps one after the other (serially, so they do not overlap as in compress)."""
    from inrank_convert.compression.job import plan_compression
    from inrank_convert.compression.updates import load_update, planned_work
    from inrank_convert.inputs.sources import open_inputs

    phases: dict[str, float] = {}
    started = time.perf_counter()
    inputs = open_inputs(trained_dir, init_dir)
    phases["open_inputs"] = time.perf_counter() - started
    try:
        started = time.perf_counter()
        plan = plan_compression(inputs, options)
        phases["plan (shapes, ties, name checks)"] = time.perf_counter() - started
        started = time.perf_counter()
        inputs.trained.file_hashes(fresh=True)
        phases["sha256 trained file"] = time.perf_counter() - started
        started = time.perf_counter()
        inputs.reference.checkpoint.file_hashes(fresh=True)
        phases["sha256 init file (reference manifest)"] = time.perf_counter() - started
        started = time.perf_counter()
        device = torch.device("cpu")
        for _, entry in planned_work(plan, inputs, actions=("factorize",)):
            load_update(inputs, entry, device)
        phases["load_update: read, subtract, energy + finite check (2-D)"] = time.perf_counter() - started
    finally:
        inputs.close()
    return phases


def _layer_breakdown(layers) -> dict[str, float]:
    """Seconds inside execute_entry (subtract + factorize + factor copies) summed by kind and engine."""
    sums: dict[str, float] = {}
    for layer in layers:
        key = f"execute_entry {layer.kind}/{layer.engine or '-'}"
        sums[key] = sums.get(key, 0.0) + layer.seconds
    return sums


def run() -> list[BenchResult]:
    from inrank_convert.compression.job import compress
    from inrank_convert.compression.plan import PlanOptions
    from inrank_convert.linalg.criteria import RankRule

    options = PlanOptions(rule=RankRule(threshold=THRESHOLD), quantize="none")  # the documented figures: bfloat16
    with scratch_dir("inrank-bench-compress-") as root:
        started = time.perf_counter()
        init_dir, trained_dir, parameters = build_pair(root)
        log(f"built GPT-2 small pair ({parameters / 1e6:.1f}M parameters) in {time.perf_counter() - started:.1f} s")
        init_file, trained_file = init_dir / "model.safetensors", trained_dir / "model.safetensors"
        file_bytes = init_file.stat().st_size + trained_file.stat().st_size
        warm_seconds = warm_page_cache(trained_file, init_file)
        warm_page_cache(trained_file, init_file)
        output = root / "artifact"

        def run_compress(cached: bool = True):
            os.environ[hash_cache.SWITCH_ENV] = "1" if cached else "0"
            return compress(trained_dir, output, init=init_dir, options=options, force=True)

        # The run's own hash cache; the environment as it was afterwards.
        with mock.patch.dict(os.environ, {hash_cache.FOLDER_ENV: str(root / "hash-cache")}):
            # The cache remembers a file only once it is older than its racy window: wait that out,
            # then one compress records both hashes.
            newest = max(os.stat(path).st_ctime_ns for path in (trained_file, init_file))
            time.sleep(max(0.0, (newest + hash_cache.RACY_NS) / 1e9 - time.time() + 0.1))
            run_compress()
            if any(hash_cache.remembered(path) is None for path in (trained_file, init_file)):
                raise RuntimeError("the hash cache did not remember the benchmark's inputs")
            # Alternate the sides so none gets a systematically warmer machine.
            read_times, first_times, repeat_times = [], [], []
            result = None
            for _ in range(REPEATS):
                read_times.append(best_of(lambda: plain_read(trained_file, init_file), 1)[0])
                seconds, _, result = best_of(lambda: run_compress(cached=False), 1)
                first_times.append(seconds)
                repeat_times.append(best_of(run_compress, 1)[0])

            profiler = cProfile.Profile()
            profiler.enable()
            run_compress(cached=False)  # what the first compress does
            profiler.disable()
            phases = _phase_breakdown(init_dir, trained_dir, options)
        read_best, compress_best, repeat_best = min(read_times), min(first_times), min(repeat_times)
        ratio, repeat_ratio = compress_best / read_best, repeat_best / read_best
        log(f"plain read best {read_best:.3f} s {fmt_seconds(read_times)}, "
            f"first compress best {compress_best:.3f} s {fmt_seconds(first_times)}, "
            f"repeat compress (hashes cached) best {repeat_best:.3f} s {fmt_seconds(repeat_times)}")

        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(PROFILE_TOP)
        profile_text = _trim_profile(stream.getvalue())
        phases.update(_layer_breakdown(result.layers))

    kinds: dict[str, int] = {}
    for layer in result.layers:
        kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
    ranks = sorted({layer.rank for layer in result.layers if layer.kind == "lowrank"})
    print("\n  compress phases (each timed alone, serially; in compress the sha256 runs in a thread "
          "beside the SVDs and reading is prefetched one tensor ahead):")
    for phase, seconds in phases.items():
        print(f"    {seconds:7.3f} s  {phase}")
    slowest = sorted(result.layers, key=lambda layer: layer.seconds, reverse=True)[:5]
    print("\n  slowest layers in execute_entry:")
    for layer in slowest:
        print(f"    {layer.seconds:7.3f} s  {layer.name} {list(layer.shape)} {layer.kind} r={layer.rank}")
    print(f"\n  cProfile of one compress run (main thread only; top {PROFILE_TOP} by cumulative time):")
    print("\n".join("    " + line for line in profile_text.splitlines()))
    details = {
        "model": "GPT2Config() defaults", "parameters": parameters, "file_bytes_both": file_bytes,
        "planted_rank": PLANTED_RANK, "noise_fraction": NOISE_FRACTION, "threshold": THRESHOLD,
        "read_seconds": read_times, "compress_seconds": first_times, "repeat_compress_seconds": repeat_times,
        "repeat_best": repeat_best,
        "read_best": read_best, "compress_best": compress_best,
        "read_throughput_gb_s": file_bytes / read_best / 1e9,
        "first_cache_warm_seconds": warm_seconds,
        "compressed_bytes": result.compressed_bytes, "original_bytes": result.original_bytes,
        "size_ratio": result.ratio, "layer_kinds": kinds, "lowrank_ranks": ranks,
        "min_energy": min(layer.energy for layer in result.layers),
        "phases_serial_seconds": phases,
        "slowest_layers": [{"name": layer.name, "shape": list(layer.shape), "seconds": layer.seconds,
                            "rank": layer.rank} for layer in slowest], "profile_top_cumulative": profile_text,
    }
    read = f"{read_best:.3f} s ({file_bytes / read_best / 1e9:.1f} GB/s)"
    return [
        BenchResult(
            name=f"compress vs plain read, GPT-2 {parameters / 1e6:.0f}M, first compress (hashes both inputs)",
            measured=f"{compress_best:.2f} s", baseline=read, ratio=ratio, ratio_label="compress / read",
            target=f"<= {TARGET_RATIO:g}", passed=ratio <= TARGET_RATIO, details=details),
        BenchResult(
            name=f"compress vs plain read, GPT-2 {parameters / 1e6:.0f}M, repeat compress (hashes cached)",
            measured=f"{repeat_best:.2f} s", baseline=read, ratio=repeat_ratio, ratio_label="compress / read",
            target=f"<= {TARGET_RATIO:g}", passed=repeat_ratio <= TARGET_RATIO,
            details={"repeat_compress_seconds": repeat_times, "read_seconds": read_times}),
    ]


def _trim_profile(text: str) -> str:
    """pstats output from the column header on (drops the preamble and blank lines)."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.lstrip().startswith("ncalls"):
            return "\n".join(lines[index - 1 if index else 0:])
    return "\n".join(lines)
