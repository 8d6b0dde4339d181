"""Run every benchmark (or those named on the command line), print one ratio table, write results.json.

Usage: python -m benchmarks [compress] [svd] [memory] [runtime] [train] [compression] [calibration] [finetune]
       [llama] [distributed] [scale]

``scale`` (a 7B-shaped pair) runs only when named.

A benchmark module may define ``skip_reason()``: when it returns a reason the benchmark is skipped
(said on stdout and recorded in results.json). A row whose ``passed`` is None has no target (it is
there to compare with) and shows ``-``. A module with ``TIMED = False`` measures no time, so
the busy-machine warning is not given for it.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from . import (
    bench_calibration,
    bench_compress,
    bench_compression,
    bench_distributed,
    bench_finetune,
    bench_llama,
    bench_memory,
    bench_runtime,
    bench_scale,
    bench_svd,
    bench_train,
)
from .common import BenchResult, Contention, machine_info

BUSY_WARNING = 0.05  # other processes' share of the CPUs above which timings are suspect

BENCHMARKS = {module.NAME: module
              for module in (bench_compress, bench_svd, bench_memory, bench_runtime, bench_train, bench_compression,
                              bench_calibration, bench_finetune, bench_llama, bench_distributed, bench_scale)}
# Run only when named (``python -m benchmarks scale``, ``make bench-scale``): 30 GB of disk, ~15 min.
ON_REQUEST = {bench_scale.NAME}
RESULTS_FILE = Path(__file__).resolve().parent / "results.json"
COLUMNS = ("benchmark", "measured", "baseline", "ratio", "target", "result")


def render_table(results: list[BenchResult]) -> None:
    rows = [(r.name, r.measured, r.baseline, f"{r.ratio:.2f}", f"{r.ratio_label} {r.target}",
             "-" if r.passed is None else "PASS" if r.passed else "FAIL") for r in results]
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(row[i])) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
        for row in [COLUMNS, *rows]:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
        return
    table = Table(title="inrank-convert benchmarks (ratios against baselines measured in this run)",
                  box=box.SIMPLE_HEAVY)
    for column in COLUMNS:
        table.add_column(column, justify="right" if column == "ratio" else "left", no_wrap=True)
    for row in rows:
        style = {"PASS": "green", "FAIL": "red"}.get(row[-1], "dim")
        table.add_row(*row[:-1], f"[{style}]{row[-1]}[/{style}]")
    # Wide enough for every cell on one line, even when stdout is a pipe (rich then assumes 80).
    needed = sum(max(len(str(row[i])) for row in [COLUMNS, *rows]) + 3 for i in range(len(COLUMNS))) + 4
    Console(width=max(needed, Console().width)).print(table)


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    unknown = [name for name in argv if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    selected = argv or [name for name in BENCHMARKS if name not in ON_REQUEST]
    started = time.perf_counter()
    results: list[BenchResult] = []
    owners: list[str] = []  # the benchmark each row came from
    errors: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name in selected:
        print(f"[{name}] {BENCHMARKS[name].__doc__.splitlines()[0]}", flush=True)
        reason = getattr(BENCHMARKS[name], "skip_reason", lambda: None)()
        if reason:
            skipped[name] = reason
            print(f"  skipped: {reason}\n", flush=True)
            continue
        bench_started = time.perf_counter()
        try:
            with Contention() as contention:
                produced = BENCHMARKS[name].run()
        except Exception:  # noqa: BLE001 - report it and go on with the other benchmarks
            errors[name] = traceback.format_exc()
            print(errors[name], file=sys.stderr)
            continue
        # A benchmark gives one row, or several that share one measurement (a list).
        rows = produced if isinstance(produced, list) else [produced]
        seconds = time.perf_counter() - bench_started
        for row in rows:
            row.details = {**row.details, "benchmark_seconds": seconds, "contention": contention.to_json()}
        results.extend(rows)
        owners.extend([name] * len(rows))
        print(f"  done in {seconds:.1f} s\n", flush=True)
    total = time.perf_counter() - started
    render_table(results)
    for owner, result in zip(owners, results, strict=True):
        share = result.details["contention"]["other_processes_share_of_machine"]
        timed = getattr(BENCHMARKS[owner], "TIMED", True)  # False: it measures no time (sizes, perplexity)
        if timed and share is not None and share > BUSY_WARNING:
            print(f"warning: other processes used {share:.0%} of the CPUs during '{result.name}': "
                  "its timings are inflated; re-run on a quiet machine")
    for name, reason in skipped.items():
        print(f"skipped '{name}': {reason}")
    print(f"total {total:.0f} s; details in {RESULTS_FILE}")
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "total_seconds": total,
        "results": {name: [r.to_json() for owner, r in zip(owners, results, strict=True) if owner == name]
                    for name in dict.fromkeys(owners)},
        "errors": errors,
        "skipped": skipped,
    }
    RESULTS_FILE.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
