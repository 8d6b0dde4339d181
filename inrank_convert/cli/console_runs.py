"""What training commands print: the progress bar or log lines of a run, its summary, the demo's
tables and ``compare-runs``'s. The output streams and cell formats are ``console``'s, the one owner
of printing; this module only lays out the runs' tables.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from inrank_convert.cli.console import human_bytes, number_cell, optional_cell, stderr, stdout


@contextmanager
def training_progress(total: int, start: int, quiet: bool = False) -> Iterator:
    """A training bar on stderr (step, loss, tokens/s, total rank); yields ``update(record)``.
    Without a terminal it logs a plain line per logged step instead (for CI logs and nohup)."""
    if quiet:
        yield lambda record: None
        return
    if not stderr.is_terminal:
        def log(record: dict) -> None:
            sys.stderr.write(_training_line(record) + "\n")
            sys.stderr.flush()

        yield log
        return
    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[label]}"), console=stderr, transient=True)
    with bar:
        task = bar.add_task("train", total=total, completed=start, label="")
        yield lambda record: bar.update(task, completed=record["step"], label=_training_line(record, step=False))


def _training_line(record: dict, step: bool = True) -> str:
    parts = [f"step {record['step']}"] if step else []
    parts.append(f"loss {record['loss']:.4f}")
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
    parts.append(f"{record['tokens_per_second']:.0f} tok/s")
    if "total_rank" in record:
        parts.append(f"rank {record['total_rank']}")
    return "  ".join(parts)


def render_training(result: dict) -> None:
    """``train``/``resume``: where the run stands and its last checkpoint."""
    loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"
    line = f"{result['run']}: steps {result['start_step']} -> {result['step']}, loss {loss}"
    if result["val_loss"] is not None:
        line += f", val loss {result['val_loss']:.4f}"
    if result["ranks"]:
        line += f", total rank {result['total_rank']} over {len(result['ranks'])} layers"
    line += f", {result['tokens_per_second']:.0f} tokens/s"
    stdout.print(line)
    if result["checkpoints"]:
        stdout.print(f"last checkpoint: {result['checkpoints'][-1]}")


def render_demo(result: dict) -> None:
    """``demo``: the dense and InRank runs side by side, every model's size and perplexity, then
    mean ranks per layer type."""
    data, story = result["data"], result["story"]
    measured = result["measured"]
    table = Table(title=f"Dense vs InRank: {story[0]['steps']} steps from one init on {Path(data['train']).name}; "
                        f"validation perplexity on {Path(data['eval']).name}", title_justify="left")
    table.add_column("")
    for run in story[:2]:
        table.add_column(run["run"], justify="right")

    for label, key, form in (("final validation perplexity", "val_perplexity", ".2f"),
                             ("total rank / full rank: final", "rank_fraction_final", ".1%"),
                             ("total rank / full rank: mean", "rank_fraction_mean", ".1%"),
                             ("checkpoint", "checkpoint_bytes", "bytes"),
                             (f"perplexity, {measured['text_tokens']} tokens", "checkpoint_perplexity", ".2f"),
                             (f"artifact at {result['dense_artifact']['rule']}", "artifact_bytes", "bytes"),
                             ("its perplexity", "artifact_perplexity", ".2f"),
                             ("training time (s)", "seconds", ".0f"), ("tokens/s", "tokens_per_second", ".0f")):
        table.add_row(label, *(human_bytes(run[key]) if form == "bytes" else optional_cell(run.get(key), form) for run in story[:2]))
    stdout.print(table)
    models = Table(title=f"Size and perplexity on {Path(data['eval']).name} ({measured['text_tokens']} tokens)",
                   title_justify="left")
    models.add_column("model")
    models.add_column("path", overflow="fold")
    for column in ("bytes", "of dense", "perplexity", "change"):
        models.add_column(column, justify="right", no_wrap=True)
    labels = {result["dense"]["checkpoints"][-1]: "dense (trained)", result["dense_artifact"]["output"]: "dense, compressed",
              result["inrank"]["checkpoints"][-1]: "InRank (trained)", result["inrank_artifact"]["output"]: "InRank, compressed",
              result["resumed"]["checkpoints"][-1]: "resumed InRank",
              result["continued"]["checkpoints"][-1]: "dense continued"}
    for row in measured["models"]:
        change = row["change_percent"]
        models.add_row(labels.get(row["path"], row["label"]), row["path"], human_bytes(row["bytes"]),
                       f"{100 * row['ratio']:.2f}%", number_cell(row["perplexity"], 2), "" if change is None else f"{change:+.2f}%")
    stdout.print(models)
    ranks = Table(title="Mean rank per layer type", title_justify="left")
    columns = [key for key in result["ranks"][0] if key != "type"] if result["ranks"] else []
    ranks.add_column("layer type")
    for column in columns:
        ranks.add_column(column, justify="right")
    for row in result["ranks"]:
        ranks.add_row(row["type"], *("" if row.get(c) is None else f"{row[c]:.1f}".removesuffix(".0") for c in columns))
    stdout.print(ranks)
    resumed, continued = story[2], story[3]
    stdout.print(f"InRank resumed from the dense artifact: {resumed['steps']} steps, total rank {resumed['start_total_rank']} "
                 f"-> {resumed['total_rank']}, validation perplexity {optional_cell(resumed['val_perplexity'], '.2f')} "
                 f"training {optional_cell(resumed['trainable_parameters'], ',')} parameters; the dense run continued on the "
                 f"same tokens: {optional_cell(continued['val_perplexity'], '.2f')} training "
                 f"{optional_cell(continued['trainable_parameters'], ',')}; plots: {', '.join(result['plots'])}; "
                 f"{result['seconds']:.0f} s in all")


def render_compare_runs(result: dict) -> None:
    """compare-runs: one column per run."""
    runs = result["runs"]
    table = Table(title="Runs side by side" + (f" (perplexity on {result['data_tokens']} tokens of {result['data']})"
                                                if result.get("data") else ""))
    table.add_column("")
    for run in runs:
        table.add_column(f"{run['label']} ({run['mode']}{', efficient' if run['efficient'] else ''})", justify="right")

    rows = [("steps", [str(run["final_step"]) for run in runs]),
            ("final validation loss" + ("" if result["same_val_data"] else " (own val data)"),
             [optional_cell(run["final_val_loss"], ".4f") for run in runs]),
            ("final validation perplexity", [optional_cell(run["final_val_perplexity"], ".2f") for run in runs])]
    if result.get("data"):
        rows.append(("final perplexity on --data",
                     [optional_cell(run["data_curve"][-1]["perplexity"] if run["data_curve"] else None, ".2f") for run in runs]))
    rows += [("total rank / full rank: final", [optional_cell(run["final_rank_fraction"], ".1%") for run in runs]),
             ("total rank / full rank: mean", [optional_cell(run["mean_rank_fraction"], ".1%") for run in runs]),
             ("checkpoint bytes", [human_bytes(run["bytes"]) for run in runs]),
             ("parameters stored", [f"{run['parameters']:,}" for run in runs]),
             ("parameters trained", [optional_cell(run.get("trainable_parameters"), ",") for run in runs]),
             ("tokens/s (mean)", [optional_cell(run["tokens_per_second"], ".0f") for run in runs])]
    for label, values in rows:
        table.add_row(label, *values)
    stdout.print(table)
