"""Every PNG the tool writes: spectra and rank-vs-threshold curves (``spectrum --plot``), size vs
perplexity with per-layer ranks (``report --plot``, the demo). matplotlib is an optional extra,
imported only when a plot is asked for; figures are written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from inrank_convert.core.errors import UsageError, flag
from inrank_convert.runtime.evaluate import finite_or_none
from inrank_convert.weights.output_lock import output_lock

if TYPE_CHECKING:
    from inrank_convert.measure.analysis import SpectrumResult
    from inrank_convert.measure.compare_runs import CompareResult
    from inrank_convert.measure.report import ReportResult
    from inrank_convert.measure.sweep import SweepResult


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; a clear error when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UsageError("plots need matplotlib", flag("--plot"), "pip install 'inrank-convert[plot]'") from err
    return plt


def check_plot_path(path: str | Path) -> None:
    """Before any work: matplotlib is there, the folder exists, and the extension is an image
    format matplotlib writes (``x.safetensors`` would fail only after minutes of work)."""
    pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    formats = FigureCanvasBase.get_supported_filetypes()  # {"png": "Portable Network Graphics", ...}
    if path.suffix.lstrip(".").lower() not in formats:
        raise UsageError(f"a plot is written as an image, and {path.suffix or 'no extension'!r} is not an image format",
                         str(path), f"end {flag('--plot')} with .png; {', '.join(sorted(formats)[:6])} and others work too")
    if not path.absolute().parent.is_dir():
        raise UsageError("the plot's folder does not exist", str(path.absolute().parent),
                         f"create it or choose another {flag('--plot')}")


def save_figure(figure, path: str | Path) -> Path:
    """Save atomically: a half-written PNG must never look valid."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with output_lock(path):  # one writer of the file at a time, as for every output
            figure.savefig(temp, dpi=120, format=path.suffix.lstrip(".") or "png")
            os.replace(temp, path)
    except OSError as err:
        temp.unlink(missing_ok=True)
        raise UsageError(f"cannot write the plot ({err.strerror})", str(path), "choose a writable path") from err
    finally:
        pyplot().close(figure)
    return path


def plot_spectrum(result: SpectrumResult, path: str | Path) -> Path:
    """Normalized spectra (log scale) and rank-vs-threshold curves, one line per layer."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for layer in result.layers:
        values = torch.tensor(layer.singular_values)
        if values.numel() and float(values[0]) > 0:
            left.semilogy(range(1, values.numel() + 1), (values / values[0]).tolist(), alpha=0.6, linewidth=1)
        right.plot(result.thresholds, [layer.ranks[t] / min(layer.shape) for t in result.thresholds],
                   marker="o", alpha=0.6, linewidth=1)
    left.set(title="Singular values of each update (s / s_max)", xlabel="index", ylabel="relative singular value")
    right.set(title=f"Rank / full rank at each threshold ({result.criterion})", xlabel="threshold",
              ylabel="rank fraction")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_report(result: ReportResult, path: str | Path) -> Path:
    """Bytes on disk vs perplexity, one labelled point per model; the artifact's per-layer ranks as bars."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
    for row in result.models:
        value = finite_or_none(row.result.perplexity)
        if value is None:
            continue
        left.scatter([row.bytes], [value], s=40, zorder=3)
        left.annotate(row.label, (row.bytes, value), textcoords="offset points", xytext=(6, 4), fontsize=8)
    left.set_xscale("log")
    left.set(title=f"Size vs perplexity ({result.text_tokens} tokens, window {result.context})",
             xlabel="bytes on disk (log scale)", ylabel="perplexity")
    left.grid(True, alpha=0.3)
    # Matrices only: 1-D tensors (biases, norms) are always dense and have no rank worth a bar.
    ranked = [layer for layer in result.layers if len(layer["shape"]) == 2]
    positions = range(len(ranked))
    heights = [min(layer["shape"]) if layer["kind"] == "dense" else layer["rank"] or 0 for layer in ranked]
    colors = ["tab:blue" if layer["kind"] == "lowrank" else "tab:gray" if layer["kind"] == "dense" else "tab:red"
              for layer in ranked]
    right.bar(list(positions), heights, color=colors)
    right.set(title=f"Rank per layer ({result.rule}; gray = dense, full rank)", xlabel="layer", ylabel="rank")
    if len(ranked) <= 60:
        right.set_xticks(list(positions))
        right.set_xticklabels([_short(layer["name"]) for layer in ranked], rotation=90, fontsize=6)
    figure.tight_layout()
    return save_figure(figure, path)


def _short(name: str) -> str:
    return name.removesuffix(".weight").removeprefix("transformer.").removeprefix("model.")


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """Bytes (as a share of the dense checkpoint, log scale) against perplexity: one line per
    series of settings (per-tensor thresholds, budgets, calibrated budgets; bfloat16, int8, int4, mixed), the
    dense model as a horizontal line."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 5))
    series: dict[str, list] = {}
    for row in result.rows:
        series.setdefault(row.setting.series, []).append(row)
    for name, rows in series.items():
        rows = sorted(rows, key=lambda row: row.bytes)
        axis.plot([100.0 * row.ratio for row in rows], [row.perplexity for row in rows], marker="o", label=name,
                  linestyle="--" if "int8" in name else ":" if "int4" in name else "-." if "mixed" in name else "-")
    axis.axhline(result.dense_perplexity, color="black", linewidth=1, label="dense")
    axis.set_xscale("log")
    percent = plt.FuncFormatter(lambda value, _: f"{value:g}%")
    axis.xaxis.set_major_formatter(percent)
    axis.xaxis.set_minor_formatter(percent)
    axis.tick_params(axis="x", which="minor", labelsize=7)
    axis.set(title=f"Size against perplexity ({result.tokens} tokens of {Path(result.data).name})",
             xlabel="artifact bytes, share of the dense checkpoint (log scale)", ylabel="perplexity")
    finite = [row.perplexity for row in result.rows if math.isfinite(row.perplexity)]
    if finite:  # one setting far off the curve must not flatten all the others
        axis.set_ylim(result.dense_perplexity * 0.995, min(max(finite), result.dense_perplexity * 1.5) * 1.01)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def plot_compare_runs(result: CompareResult, path: str | Path) -> Path:
    """Left: validation loss (metrics) or perplexity on --data over steps, one line per run.
    Right: InRank's total rank over steps as a fraction of the full rank."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    scored = any(run.data_curve for run in result.runs)
    for run in result.runs:
        curve = [(s, p) for s, p in run.data_curve] if scored else [(s, math.exp(v)) for s, v in run.val_curve]
        if curve:
            left.plot([s for s, _ in curve], [p for _, p in curve], marker="o", markersize=3, label=run.label)
        if run.rank_curve and run.full_rank:
            right.plot([s for s, _ in run.rank_curve], [r / run.full_rank for _, r in run.rank_curve], label=run.label)
    what = f"perplexity on {Path(result.data).name}" if scored else "validation perplexity (metrics)"
    left.set(title=what, xlabel="step", ylabel="perplexity")
    left.set_yscale("log")
    right.set(title="total rank / full rank of the factorized layers", xlabel="step", ylabel="fraction", ylim=(0, 1))
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)
