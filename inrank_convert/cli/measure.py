"""Size against quality: ``report`` (one artifact and others on one text), ``sweep`` (many settings
of one checkpoint) and ``compare-runs`` (two training runs)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from inrank_convert.cli import console, console_runs
from inrank_convert.cli.boundary import user_errors
from inrank_convert.cli.options import (
    ArtifactArg,
    DeviceOpt,
    EmbeddingsOpt,
    EvalDeviceOpt,
    EvalDtypeOpt,
    InitOpt,
    InitRevisionOpt,
    InitSeedOpt,
    JsonOpt,
    MergeOpt,
    NoInitOpt,
    QuietOpt,
    RevisionOpt,
    TokenizerOpt,
    calibration_request,
    check_plot,
    model_paths,
    parse_dtype,
)
from inrank_convert.core.errors import UsageError


class _WindowProgress:
    """One progress bar per model over its perplexity windows (the library calls back per window)."""

    def __init__(self, stack: contextlib.ExitStack, quiet: bool):
        self._stack, self._quiet = stack, quiet
        self._label = None
        self._inner: contextlib.ExitStack | None = None
        self._advance = None

    def __call__(self, label: str, done: int, total: int) -> None:
        if label != self._label:
            if self._inner is not None:
                self._inner.close()
            self._inner = self._stack.enter_context(contextlib.ExitStack())
            self._advance = self._inner.enter_context(console.progress(total, f"perplexity {label}", self._quiet))
            self._label = label
        self._advance(f"window {done}/{total}")


@user_errors
def report_command(
    artifact: ArtifactArg,
    data: Annotated[Path, typer.Option("--data", help="UTF-8 text file (or folder of text files) to measure perplexity on.")],
    original: Annotated[Path | None, typer.Option(
        "--original", help="The dense checkpoint to compare with (any CKPT form; default: the recorded source).")] = None,
    also: Annotated[list[Path] | None, typer.Option(
        "--also", help="Another artifact or checkpoint to measure on the same text (repeatable).")] = None,
    device: EvalDeviceOpt = "cpu",
    dtype: EvalDtypeOpt = "float32",
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Use only the first N tokens of the text.")] = None,
    stride: Annotated[int | None, typer.Option(
        "--stride", help="Sliding windows moved by N tokens (each token scored once); default: non-overlapping.")] = None,
    context: Annotated[int | None, typer.Option(
        "--context", help="Window length in tokens (default: the models' context length).")] = None,
    tokenizer: TokenizerOpt = None,
    init: Annotated[Path | None, typer.Option("--init", help="Use this init instead of the artifact's recorded one.")] = None,
    merge: MergeOpt = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write size-vs-perplexity and per-layer ranks to this PNG.")] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Size and perplexity side by side: the original, the compressed artifact, and any --also models.

    Example: inrank-convert report gpt2-inrank --data wiki.test.raw --max-tokens 8192 --json
    """
    from inrank_convert.measure.plots import plot_report
    from inrank_convert.measure.report import report

    check_plot(plot)
    with contextlib.ExitStack() as stack:
        bar = _WindowProgress(stack, quiet or json_output)
        result = report(artifact, data, original=original, also=tuple(also or ()), device=device,
                        dtype=parse_dtype(dtype), max_tokens=max_tokens, stride=stride, tokenizer=tokenizer,
                        context=context, init=init, merge=merge, on_window=bar)
    for note in result.notes:
        console.warn(note)
    if plot is not None:
        plot_report(result, plot)
    console.emit_json(result.to_json()) if json_output else console.render_report(result.to_json())


def _numbers(text: str | None, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """A comma-separated list of numbers ("0.8,0.9"); empty for none."""
    if text is None:
        return default
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise UsageError(f"{name} takes numbers separated by commas, got {text!r}", name, f"e.g. {name} 0.05,0.1,0.2") from err


@user_errors
def sweep_command(
    ckpt: Annotated[Path, typer.Argument(help="HF folder, sharded folder, .safetensors/.bin/.pt/.ckpt, run folder or artifact.")],
    data: Annotated[Path, typer.Option("--data", help="Held-out UTF-8 text (file or folder) to measure perplexity on.")],
    calibrate: Annotated[Path | None, typer.Option(
        "--calibrate", help="Also sweep the budgets calibrated on this text (see compress --calibrate).")] = None,
    calib_tokens: Annotated[int | None, typer.Option("--calib-tokens", help="Use the first N tokens of --calibrate (default 65536).")] = None,
    thresholds: Annotated[str | None, typer.Option(
        "--thresholds", help="Per-tensor thresholds, comma-separated (default 0.8,0.9,0.95,0.99; '' for none).")] = None,
    ratios: Annotated[str | None, typer.Option(
        "--ratios", help="Size budgets as fractions of the dense bytes (default 0.03,0.05,0.1,0.2; '' for none).")] = None,
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="Every setting in int8 (compress's default storage) as well as in bfloat16 (--quantize none).")] = True,
    int4: Annotated[bool, typer.Option("--int4", help="Every setting in int4 (--quantize int4) as well.")] = False,
    mixed: Annotated[bool, typer.Option("--mixed", help="Every size budget in mixed precision (--quantize mixed: "
                                        "the budget chooses 8, 4, 3 or 2 bits per component) as well.")] = False,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Use only the first N tokens of --data.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(
        "--tokenizer", help="Tokenizer folder for --data and --calibrate (default: the checkpoint's).")] = None,
    init: InitOpt = None,
    init_seed: InitSeedOpt = None,
    no_init: NoInitOpt = False,
    revision: RevisionOpt = None,
    init_revision: InitRevisionOpt = None,
    device: DeviceOpt = "cpu",
    embeddings: EmbeddingsOpt = True,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write bytes against perplexity, one line per series, to this PNG.")] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Compress at many settings and measure each: the whole size/perplexity trade-off in one table.

    Example: inrank-convert sweep runs/gpt2/ --data wiki.valid.raw --calibrate train.txt --int4 --plot sweep.png
    """
    from inrank_convert.artifact.storage import NO_QUANTIZATION
    from inrank_convert.compression.plan import PlanOptions
    from inrank_convert.measure.plots import plot_sweep
    from inrank_convert.measure.sweep import DEFAULT_RATIOS, DEFAULT_THRESHOLDS, STORAGES, sweep

    calibration = calibration_request(calibrate, calib_tokens, tokenizer)
    check_plot(plot)
    silent = quiet or json_output
    source, init = model_paths(ckpt, revision, init, init_revision)
    result = sweep(source, data, thresholds=_numbers(thresholds, "--thresholds", DEFAULT_THRESHOLDS),
                   ratios=_numbers(ratios, "--ratios", DEFAULT_RATIOS), storages=(*(STORAGES if int8 else (NO_QUANTIZATION,)), *(("int4",) if int4 else ()),
                                                                      *(("mixed",) if mixed else ())),
                   calibration=calibration, max_tokens=max_tokens, tokenizer=tokenizer, init=init, init_seed=init_seed,
                   no_init=no_init, options=PlanOptions(device=device, embeddings=embeddings),
                   on_row=None if silent else lambda row: console.status(
                       f"{row.setting.label}: {row.ratio:.2%} of dense, perplexity {row.perplexity:.4g} "
                       f"({row.increase_percent:+.2f}%)"))
    if plot is not None:
        plot_sweep(result, plot)
    console.emit_json(result.to_json()) if json_output else console.render_sweep(result.to_json())


@user_errors
def compare_runs_command(
    dense_run: Annotated[Path, typer.Argument(help="A run folder (train --mode dense).")],
    inrank_run: Annotated[Path, typer.Argument(help="A run folder of the same architecture (train --mode inrank).")],
    data: Annotated[Path | None, typer.Option(
        "--data", help="Score every step both runs saved on this text (default: the runs' own validation losses).")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Use only the first N tokens of --data.")] = None,
    device: EvalDeviceOpt = "cpu",
    plot: Annotated[Path | None, typer.Option("--plot", help="Write perplexity and rank fraction over steps to this PNG.")] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Two training runs side by side: validation curves, rank fraction, bytes, parameters, speed.

    Example: inrank-convert compare-runs runs/dense runs/inrank --data val.txt --plot runs.png
    """
    from inrank_convert.measure.compare_runs import compare_runs
    from inrank_convert.measure.plots import plot_compare_runs

    check_plot(plot)
    silent = quiet or json_output
    result = compare_runs(dense_run, inrank_run, data=data, max_tokens=max_tokens, device=device,
                          on_checkpoint=None if silent else lambda label, step: console.status(f"scoring {label} step {step}"))
    if plot is not None:
        plot_compare_runs(result, plot)
    console.emit_json(result.to_json()) if json_output else console_runs.render_compare_runs(result.to_json())
