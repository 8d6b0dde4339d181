"""The only module that prints: Rich tables on stdout, progress and warnings on stderr, JSON.
(``console_runs`` lays out the training commands' tables and progress on these same streams.)"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Piped output (files, grep, CI logs) gets a wide table so that long tensor names stay whole.
stdout = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def error(message: str) -> None:
    # Plain write: Rich would wrap a long message onto several lines or read [..] as markup.
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def status(message: str) -> None:
    """One line of progress on stderr (a stage of a long command, a search step)."""
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()


def emit_json(payload: dict) -> None:
    """Strict JSON: a number that is not finite (an overflowed error in verify) is written as the
    string "inf", "-inf" or "nan", which every JSON parser reads (bare Infinity is not JSON)."""
    sys.stdout.write(json.dumps(_strict(payload), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(item) for item in value]
    return value


def human_bytes(count: int | float) -> str:
    value = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(value) < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


@contextmanager
def progress(total: int, description: str, quiet: bool = False) -> Iterator:
    """A progress bar on stderr; yields ``advance(label)``. Silent with --quiet or --json, and
    when stderr is not a terminal (Rich would leave blank lines in logs and before errors)."""
    if quiet or total == 0 or not stderr.is_terminal:
        yield lambda label=None: None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[label]}"), console=stderr, transient=True)
    with bar:
        task = bar.add_task(description, total=total, label="")
        yield lambda label=None: bar.update(task, advance=1, label=label or "")


def _energy(value) -> str:
    return "" if value is None else f"{value:.4f}"


def _rank(value) -> str:
    return "" if value is None else str(value)


def _rows(layer: dict) -> str:
    """Stored rows of a lowrank+rows tensor; for a grown vocabulary, how many of them are new."""
    rows = layer.get("rows")
    if rows is None:
        return ""
    reference_rows = layer.get("reference_rows")
    if reference_rows is not None and layer.get("shape"):
        return f"{rows} ({layer['shape'][0] - reference_rows} new)"
    return str(rows)


def layer_table(layers: list[dict], title: str) -> Table:
    """Shape, kind, rank, energy kept and bytes per tensor; the stored rows, the storage
    precision and a calibrated layer's output error too when the layers say (format version 2:
    inspect and compress, not report)."""
    table = Table(title=title, title_justify="left")
    table.add_column("tensor", overflow="fold")
    with_rows = any(layer.get("rows") is not None for layer in layers)
    with_storage = any(layer.get("storage") is not None for layer in layers)
    with_outputs = any(layer.get("output_error") is not None for layer in layers)
    columns = [("shape", "left"), ("kind", "left"), ("rank", "right")]
    columns += [("rows", "right")] if with_rows else []
    columns += [("energy", "right"), ("bytes", "right")]
    columns += [("storage", "left")] if with_storage else []
    columns += [("output error", "right")] if with_outputs else []
    for column, justify in columns:
        table.add_column(column, justify=justify, no_wrap=True)
    for layer in layers:
        cells = ["x".join(map(str, layer["shape"])), layer["kind"], _rank(layer.get("rank"))]
        cells += [_rows(layer)] if with_rows else []
        cells += [_energy(layer.get("energy")), human_bytes(layer.get("bytes", 0))]
        cells += [_storage(layer)] if with_storage else []
        cells += [_energy(layer.get("output_error"))] if with_outputs else []
        table.add_row(layer["name"], *cells)
    return table


def _storage(layer: dict) -> str:
    """The storage, and its bands where they differ (int4: ``int4 2x8b+14x4b``)."""
    storage, bands = layer.get("storage") or "", layer.get("bands")
    if not bands or len(bands) < 2:
        return storage
    return f"{storage} " + "+".join(f"{band['components']}x{band['bits']}b" for band in bands)


def totals_line(summary: dict) -> str:
    kinds: dict[str, int] = {}
    for layer in summary["layers"]:
        kinds[layer["kind"]] = kinds.get(layer["kind"], 0) + 1
    counts = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    return (f"{human_bytes(summary['compressed_bytes'])} of {human_bytes(summary['original_bytes'])} "
            f"({100 * summary['ratio']:.2f}%), reference: {summary['reference']}, rule: {summary['rule']}; {counts}")


def render_summary(summary: dict, title: str) -> None:
    stdout.print(layer_table(summary["layers"], title))
    stdout.print(totals_line(summary))
    if summary.get("tied"):
        stdout.print("tied (stored once): " + ", ".join(f"{a} -> {c}" for a, c in summary["tied"].items()))
    calibration = summary.get("calibration")
    if calibration:
        stdout.print(f"calibrated on {calibration['tokens']} tokens (text sha256 {calibration['text_sha256'][:12]}...), "
                     f"{calibration['layers']} layers' input Grams, damping {calibration['damping']:g}")
        distilled = calibration.get("distill")
        if distilled:
            measured = f"{distilled['held_out']} held-out windows" if distilled["held_out"] else "its first windows"
            after = "non-finite" if distilled["kl_after"] is None else f"{distilled['kl_after']:.4g}"
            stdout.print(f"scales distilled {distilled['steps']} steps ({distilled['scales']} scales of "
                         f"{distilled['tensors']} tensors, {distilled['seconds']:.0f} s): KL to the trained model "
                         f"{distilled['kl_before']:.4g} -> {after} nats/token on {measured}, "
                         f"{'kept' if distilled['kept'] else 'not kept (the scales stay as rounded)'}")
    target = summary.get("perplexity_target")
    if target:
        stdout.print(f"perplexity target +{target['max_increase_percent']:g}%: {target['perplexity']:g} against the "
                     f"dense {target['dense_perplexity']:g} ({target['increase_percent']:+.3f}%) on "
                     f"{target['eval_tokens']} tokens, {target['steps']} candidates")


def render_plan(plan: dict) -> None:
    table = Table(title=f"Plan ({plan['rule']}), nothing written", title_justify="left")
    table.add_column("tensor", overflow="fold")
    for column in ("shape", "dtype", "action", "max rank that pays", "bytes", "why"):
        table.add_column(column)
    for entry in plan["layers"]:
        table.add_row(entry["name"], "x".join(map(str, entry["shape"])), entry["dtype"], entry["action"],
                      _rank(entry["breakeven_rank"]), human_bytes(entry["original_bytes"]), entry["reason"])
    for alias, canonical in plan["tied"].items():
        table.add_row(alias, "", "", "alias", "", "", f"tied to {canonical}")
    stdout.print(table)
    stdout.print(f"original size {human_bytes(plan['original_bytes'])}")


def render_spectrum(result: dict) -> None:
    table = Table(title=f"Update spectra ({result['criterion']} criterion, reference: {result['reference']})",
                  title_justify="left")
    table.add_column("tensor", overflow="fold")
    table.add_column("shape", no_wrap=True)
    table.add_column("||delta||_F", justify="right")
    for threshold in result["thresholds"]:
        table.add_column(f"r@{threshold:g}", justify="right")
    for layer in result["layers"]:
        table.add_row(layer["name"], "x".join(map(str, layer["shape"])), f"{layer['frobenius_norm']:.4g}",
                      *(str(layer["ranks"][f"{t:g}"]) for t in result["thresholds"]))
    stdout.print(table)


def render_verify(result: dict) -> None:
    stdout.print(f"checksums: {'ok' if result['checksums_ok'] else 'MISMATCH in ' + ', '.join(result['bad_checksums'][:5])}")
    stdout.print(f"reference: {'ok' if result['reference_ok'] else 'FAILED'} ({result['reference']})")
    model = "ok" if result["model_ok"] and result["model_checked"] else "not checked" if result["model_ok"] else "FAILED"
    stdout.print(f"model: {model} ({result['model']})")
    if result["source"]:
        stdout.print(f"source: {result['source']}")
    if result["layers"]:
        # expected: the recorded error of what is stored; rounding: the most that rounding the rebuilt
        # weight to its dtype adds (both relative to the update); measured must not exceed their sum.
        table = Table(title="Reconstruction error (relative to each update)", title_justify="left")
        table.add_column("tensor", overflow="fold")
        for column in ("kind", "rank", "expected", "rounding", "measured"):
            table.add_column(column, no_wrap=True)
        for layer in result["layers"]:
            table.add_row(layer["name"], layer["kind"], _rank(layer["rank"]), f"{layer['expected_error']:.2e}",
                          f"{layer['rounding_error']:.2e}", f"{layer['measured_error']:.2e}")
        stdout.print(table)
    stdout.print("verify: OK" if result["ok"] else "verify: FAILED")


def number_cell(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def optional_cell(value, form: str) -> str:
    """``value`` in ``form``, or an empty cell when there is none (a dense run has no rank)."""
    return "" if value is None else format(value, form)


def _count(value: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def render_report(result: dict) -> None:
    """``report``: one row per model (size, parameters, perplexity, speed), then the artifact's layers."""
    table = Table(title=f"Perplexity on {result['data']} ({result['text_tokens']} tokens, window {result['context']}, "
                        f"stride {result['stride']}, {result['device']} {result['dtype']})", title_justify="left")
    table.add_column("model")
    table.add_column("path", overflow="fold")
    for column in ("bytes", "ratio", "parameters", "perplexity", "change", "tokens/s"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in result["models"]:
        change = row["change_percent"]
        table.add_row(row["label"], row["path"], human_bytes(row["bytes"]), f"{100 * row['ratio']:.2f}%",
                      _count(row["parameters"]), number_cell(row["perplexity"], 3),
                      "" if change is None else f"{change:+.2f}%", number_cell(row["tokens_per_second"], 0))
    stdout.print(table)
    stdout.print(layer_table(result["layers"], f"Layers of {result['artifact']} (reference: {result['reference']}, "
                                               f"rule: {result['rule']})"))


def render_export_peft(result: dict) -> None:
    """``export-peft``: what was written, how vLLM serves it (--target vllm), and the perplexities (--data)."""
    stdout.print(f"wrote a LoRA adapter on {len(result['target_modules'])} modules, {len(result['modules_to_save'])} "
                 f"saved whole, {len(result['biases'])} biases ({human_bytes(result['bytes'])}) to "
                 f"{result['output']}; base model: {result['base']}")
    if result["target"] == "vllm":
        stdout.print(f"serve it with: vllm serve BASE --enable-lora --max-lora-rank {result['max_lora_rank']} "
                     f"--lora-modules adapter={result['output']}")
    scores = result.get("perplexity")
    if not scores:
        return
    table = Table(title=f"Perplexity on {scores['data']} ({scores['tokens']} tokens, window {scores['context']})",
                  title_justify="left")
    table.add_column("model")
    table.add_column("perplexity", justify="right", no_wrap=True)
    table.add_column("vs artifact", justify="right", no_wrap=True)
    artifact = scores["artifact"]
    for label, key in (("base (reference)", "reference"), (f"base + {result['target']} adapter", "adapter"),
                       ("artifact", "artifact")):
        value = scores[key]
        change = "" if value is None or not artifact else f"{100 * (value / artifact - 1):+.2f}%"
        table.add_row(label, number_cell(value, 3), change)
    stdout.print(table)


def render_generation(result: dict) -> None:
    """``generate``: the prompt and its continuation on stdout; the speed on stderr."""
    sys.stdout.write(result["text"] + "\n")
    sys.stdout.flush()
    speed = result["tokens_per_second"]
    stderr.print(f"[dim]{result['new_tokens']} new tokens in {result['seconds']:.2f} s"
                 + (f" ({speed:.1f} tokens/s)" if speed else "") + f", seed {result['seed']}[/dim]")


def render_sweep(result: dict) -> None:
    """The sweep's table: one row per setting, sorted by size, the dense model first."""
    table = Table(title=f"{result['source']}: size and perplexity on {result['tokens']} tokens of {result['data']}")
    for column in ("setting", "bytes", "of dense", "perplexity", "change"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    table.add_row("dense", human_bytes(result["dense_bytes"]), "100.00%", f"{result['dense_perplexity']:.2f}", "")
    for row in sorted(result["rows"], key=lambda row: row["bytes"]):
        table.add_row(row["setting"], human_bytes(row["bytes"]), f"{row['ratio']:.2%}", f"{row['perplexity']:.2f}",
                      f"{row['increase_percent']:+.2f}%")
    stdout.print(table)
