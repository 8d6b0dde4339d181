"""Benchmark 3: peak RSS of ``inrank-convert compress`` on a checkpoint pair of >= 1 GB each.

The pair is a config-less folder per checkpoint holding ``model.safetensors`` with LLaMA-7B-
shaped float32 matrices (MLP 11008x4096 and 4096x11008, attention 4096x4096); trained = init
+ planted rank-32 updates with 5% noise energy. The CLI runs in a fresh process; its peak RSS
comes from ``os.wait4`` (the kernel's high-water mark for that very child), and a polling
thread splits the resident set into anonymous memory and file-backed (mmap) pages.
Budget (docs/design.md §11): peak RSS <= 2 x the largest tensor + 1 GiB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from .common import BenchResult, GiB, human_bytes, log, planted_update, scratch_dir

NAME = "memory"
LAYERS = 2
HIDDEN, INTERMEDIATE = 4096, 11008
PLANTED_RANK = 32
UPDATE_SCALE = 0.3
NOISE_FRACTION = 0.05
INIT_STD = 0.02
THRESHOLD = 0.9
POLL_SECONDS = 0.01


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.input_layernorm.weight"] = (HIDDEN,)
        for name in ("q_proj", "k_proj", "v_proj"):
            shapes[f"{prefix}.self_attn.{name}.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)  # wide: exercises the transpose
    return shapes


def build_pair(root: Path) -> tuple[Path, Path]:
    """init/model.safetensors and trained/model.safetensors (no config.json) under ``root``."""
    from safetensors.torch import save_file

    init_dir, trained_dir = root / "init", root / "trained"
    init_dir.mkdir()
    trained_dir.mkdir()
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for name, shape in tensor_shapes().items():
        tensors[name] = torch.ones(shape) if len(shape) == 1 else INIT_STD * torch.randn(shape, generator=generator)
    save_file(tensors, str(init_dir / "model.safetensors"))
    # Turn the init into the trained model in place, so only one checkpoint is ever held in memory.
    for tensor in tensors.values():
        if tensor.ndim == 2:
            norm = UPDATE_SCALE * float(torch.linalg.vector_norm(tensor))
            tensor += planted_update(*tensor.shape, PLANTED_RANK, norm, NOISE_FRACTION, generator)
        else:
            tensor += 1e-3 * torch.randn(tensor.shape, generator=generator)
    save_file(tensors, str(trained_dir / "model.safetensors"))
    return init_dir, trained_dir


class _StatusPoller(threading.Thread):
    """Samples /proc/PID/status until the process exits; keeps the peak of each RSS field (bytes)."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks = {field: 0 for field in self.FIELDS}
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while not self._done.is_set():
            try:
                with open(path) as handle:
                    text = handle.read()
            except OSError:
                return
            found = False
            for line in text.splitlines():
                key, _, value = line.partition(":")
                if key in self.peaks and value.strip():
                    self.peaks[key] = max(self.peaks[key], int(value.split()[0]) * 1024)
                    found = True
            if not found:  # a zombie has no memory fields left
                return
            self.samples += 1
            time.sleep(POLL_SECONDS)

    def stop(self) -> None:
        self._done.set()


def run_cli(args: list[str], log_dir: Path) -> dict:
    """Run the CLI in a fresh process; return its exit code, wall time, peak RSS and output."""
    stdout_path, stderr_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(args, stdout=stdout, stderr=stderr)
        poller = _StatusPoller(process.pid)
        poller.start()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        poller.stop()
        poller.join()
        process.returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": process.returncode, "seconds": seconds, "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            "poll_peaks_bytes": poller.peaks, "poll_samples": poller.samples,
            "stdout": stdout_path.read_text(), "stderr": stderr_path.read_text()}


def cli_path() -> str:
    script = Path(sys.executable).parent / "inrank-convert"
    return str(script) if script.exists() else "inrank-convert"


def run() -> BenchResult:
    shapes = tensor_shapes()
    largest = max(torch.Size(shape).numel() * 4 for shape in shapes.values())
    budget = 2 * largest + GiB
    with scratch_dir("inrank-bench-memory-") as root:
        started = time.perf_counter()
        init_dir, trained_dir = build_pair(root)
        file_bytes = (init_dir / "model.safetensors").stat().st_size
        log(f"built a {len(shapes)}-tensor pair of {human_bytes(file_bytes)} per file "
            f"in {time.perf_counter() - started:.1f} s")
        args = [cli_path(), "compress", str(trained_dir), "--init", str(init_dir), "-o", str(root / "artifact"),
                "--threshold", str(THRESHOLD), "--quantize", "none", "--json"]  # the documented figures: bfloat16
        outcome = run_cli(args, root)
    if outcome["returncode"] != 0:
        raise RuntimeError(f"inrank-convert compress failed ({outcome['returncode']}): {outcome['stderr'][-2000:]}")
    summary = json.loads(outcome["stdout"])
    peaks = outcome["poll_peaks_bytes"]
    # The kernel's high-water mark of the compress process itself. Not wait4's ru_maxrss: on
    # exec Linux folds the forking parent's high-water mark into the child's maxrss, and this
    # parent has just built the whole pair in memory (ru_maxrss read 1.9 GB while VmHWM read 0.66).
    peak = peaks["VmHWM"]
    ratio = peak / budget
    log(f"compress took {outcome['seconds']:.1f} s; largest tensor {human_bytes(largest)}, peak RSS "
        f"{human_bytes(peak)} (polled peaks: anon {human_bytes(peaks['RssAnon'])}, "
        f"file-backed {human_bytes(peaks['RssFile'])}), budget 2*largest+1GiB = {human_bytes(budget)}")
    layers = summary["layers"]
    details = {
        "tensors": {name: list(shape) for name, shape in shapes.items()},
        "file_bytes_each": file_bytes, "largest_tensor_bytes": largest, "budget_bytes": budget,
        "peak_rss_bytes": peak, "peak_over_budget": ratio, "ru_maxrss_bytes_inherited": outcome["ru_maxrss_bytes"],
        "peak_over_largest_tensor": peak / largest,
        "anon_peak_over_budget": peaks["RssAnon"] / budget,
        "polled_peaks_bytes": peaks, "poll_samples": outcome["poll_samples"],
        "compress_seconds": outcome["seconds"], "command": args,
        "compressed_bytes": summary["compressed_bytes"], "size_ratio": summary["ratio"],
        "layers": [{key: layer[key] for key in ("name", "kind", "rank", "energy", "svd")} for layer in layers],
    }
    return BenchResult(
        name=f"peak RSS, CLI compress 2x{file_bytes / 1e9:.2f} GB",
        measured=f"{human_bytes(peak)} (anon {peaks['RssAnon'] / GiB:.2f}, mmap {peaks['RssFile'] / GiB:.2f})",
        baseline=f"{human_bytes(budget)} = 2x{largest / 2**20:.0f} MiB + 1 GiB",
        ratio=ratio, ratio_label="peak / budget", target="<= 1", passed=ratio <= 1.0, details=details)
