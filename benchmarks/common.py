"""Shared helpers: timing, page-cache warming, synthetic updates, machine info, the result record."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

GiB = 1 << 30
MB = 1_000_000
READ_CHUNK = 16 << 20


@dataclass
class BenchResult:
    """One row of the ratio table, plus everything measured on the way (for results.json)."""

    name: str
    measured: str  # human-readable measured value
    baseline: str  # human-readable baseline (measured in the same run, or a computed budget)
    ratio: float
    ratio_label: str  # how the ratio is formed, e.g. "compress / read"
    target: str  # e.g. "<= 4.0"
    passed: bool | None  # None: a row that has no target (a comparison)
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def no_worse(name: str, label: str, row, baseline_label: str, baseline, details: dict) -> BenchResult:
    """``row`` against ``baseline`` (two rows of one ``report``): the target is a perplexity no higher."""
    return BenchResult(name, f"{label} {row.change_percent:+.2f}% ({row.ratio:.2%})",
                       f"{baseline_label} {baseline.change_percent:+.2f}% ({baseline.ratio:.2%})",
                       row.result.perplexity / baseline.result.perplexity, f"{label} / {baseline_label} ppl", "<= 1",
                       row.result.perplexity <= baseline.result.perplexity, details)


def best_of(function: Callable[[], object], repeats: int) -> tuple[float, list[float], object]:
    """(best seconds, every run's seconds, last return value) over ``repeats`` calls."""
    times = []
    value = None
    for _ in range(repeats):
        started = time.perf_counter()
        value = function()
        times.append(time.perf_counter() - started)
    return min(times), times, value


def warm_page_cache(*files: Path) -> float:
    """Read every file fully once with plain read() so later reads come from the page cache.

    Returns the seconds it took (cold or warm, whatever the cache held).
    """
    started = time.perf_counter()
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass
    return time.perf_counter() - started


def planted_update(rows: int, cols: int, rank: int, norm: float, noise_fraction: float,
                   generator: torch.Generator) -> torch.Tensor:
    """A rank-``rank`` update of Frobenius norm ~``norm`` plus Gaussian noise.

    The noise holds ``noise_fraction`` of the returned update's energy (squared Frobenius norm),
    the planted low-rank part the rest. Random factors, so its singular values are distinct.
    """
    left = torch.randn(rows, rank, generator=generator)
    right = torch.randn(rank, cols, generator=generator)
    low_rank = left @ right
    low_rank *= (norm * (1.0 - noise_fraction) ** 0.5) / float(torch.linalg.vector_norm(low_rank))
    if noise_fraction > 0:
        noise = torch.randn(rows, cols, generator=generator)
        noise *= (norm * noise_fraction ** 0.5) / float(torch.linalg.vector_norm(noise))
        low_rank += noise
    return low_rank


@contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder under /tmp (or $TMPDIR), removed afterwards whatever happens."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def machine_info() -> dict:
    import safetensors
    import transformers

    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "memory_bytes": _total_memory(),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _total_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return None


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def log(message: str) -> None:
    print(f"  {message}", flush=True)


def fmt_seconds(times: list[float]) -> str:
    return "[" + ", ".join(f"{t:.3f}" for t in times) + "]"


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes spent busy since boot (from /proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


class Contention:
    """Measures how much CPU *other* processes used while a block ran (timings on a shared
    2-core machine are only trustworthy when that stays near zero)."""

    def __enter__(self):
        self._wall = time.perf_counter()
        self._busy = _machine_busy_seconds()
        self._own = _own_cpu_seconds()
        self.load_before = os.getloadavg()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self._wall
        busy = _machine_busy_seconds()
        own = _own_cpu_seconds() - self._own
        self.other_cpu_seconds = None if busy is None or self._busy is None else max(0.0, busy - self._busy - own)
        self.load_after = os.getloadavg()
        return False

    def fraction(self) -> float | None:
        """Other processes' CPU use as a fraction of the machine's capacity over the block."""
        if self.other_cpu_seconds is None or self.wall <= 0:
            return None
        return self.other_cpu_seconds / (self.wall * (os.cpu_count() or 1))

    def to_json(self) -> dict:
        return {"wall_seconds": self.wall, "other_processes_cpu_seconds": self.other_cpu_seconds,
                "other_processes_share_of_machine": self.fraction(),
                "loadavg_before": self.load_before, "loadavg_after": self.load_after}
