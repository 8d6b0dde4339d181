"""Looking at what is there: ``inspect`` (an artifact's header), ``spectrum`` (a checkpoint's
updates) and ``verify`` (an artifact's integrity)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from inrank_convert.cli import console
from inrank_convert.cli.boundary import user_errors
from inrank_convert.cli.options import (
    ArtifactArg,
    CriterionOpt,
    DeviceOpt,
    EmbeddingsOpt,
    ExcludeOpt,
    IncludeOpt,
    InitOpt,
    InitRevisionOpt,
    InitSeedOpt,
    JsonOpt,
    NoInitOpt,
    PlanProgress,
    QuietOpt,
    RevisionOpt,
    check_plot,
    model_paths,
    plan_options,
)
from inrank_convert.core.errors import UsageError
from inrank_convert.linalg.criteria import DEFAULT_THRESHOLD


@user_errors
def inspect_command(
    artifact: ArtifactArg,
    json_output: JsonOpt = False,
):
    """Per-layer table (shape, kind, rank, energy kept, bytes) and totals, from the header alone.

    Example: inrank-convert inspect gpt2-inrank --json
    """
    from inrank_convert.artifact import describe_artifact

    summary = describe_artifact(artifact)
    console.emit_json(summary) if json_output else console.render_summary(summary, f"{artifact} (format v{summary['version']})")


@user_errors
def spectrum_command(
    ckpt: Annotated[Path, typer.Argument(help="Trained checkpoint or run folder (any CKPT form).")],
    init: InitOpt = None,
    init_seed: InitSeedOpt = None,
    no_init: NoInitOpt = False,
    revision: RevisionOpt = None,
    init_revision: InitRevisionOpt = None,
    thresholds: Annotated[str, typer.Option("--thresholds", help="Comma-separated thresholds in (0, 1].")] = "0.5,0.8,0.9,0.95,0.99",
    criterion: CriterionOpt = None,
    device: DeviceOpt = "cpu",
    embeddings: EmbeddingsOpt = True,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    float64: Annotated[bool, typer.Option("--float64", help="SVDs in float64.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write spectra and rank curves to this PNG.")] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Singular-value spectra of the updates and the rank each threshold would give.

    Example: inrank-convert spectrum runs/gpt2/ --thresholds 0.5,0.9,0.99 --plot spectra.png
    """
    from inrank_convert.linalg.criteria import CRITERIA, DEFAULT_CRITERION
    from inrank_convert.measure.analysis import parse_thresholds, spectrum_report
    from inrank_convert.measure.plots import plot_spectrum

    criterion = criterion or DEFAULT_CRITERION
    if criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {criterion!r}", "--criterion", f"choose one of {', '.join(CRITERIA)}")
    values = parse_thresholds(thresholds)
    check_plot(plot)
    options = plan_options(DEFAULT_THRESHOLD, None, criterion, "exact", device, None, embeddings, include, exclude, float64, 0)
    source, init = model_paths(ckpt, revision, init, init_revision)
    with contextlib.ExitStack() as stack:
        bar = PlanProgress(stack, "spectra", quiet or json_output)
        result = spectrum_report(source, values, criterion, init=init, init_seed=init_seed, no_init=no_init,
                                 options=options, on_plan=bar.start, on_layer=bar.advance)
    if plot is not None:
        plot_spectrum(result, plot)
    console.emit_json(result.to_json()) if json_output else console.render_spectrum(result.to_json())


@user_errors
def verify_command(
    artifact: ArtifactArg,
    init: Annotated[Path | None, typer.Option("--init", help="Use this init instead of the recorded one.")] = None,
    source: Annotated[Path | None, typer.Option("--source", help="Trained checkpoint to measure reconstruction against.")] = None,
    json_output: JsonOpt = False,
):
    """Check the artifact's checksums, its init reference's hashes, and each layer's reconstruction error.

    Example: inrank-convert verify gpt2-inrank
    """
    from inrank_convert.measure.verify import verify_artifact

    result = verify_artifact(artifact, init, source)
    console.emit_json(result.to_json()) if json_output else console.render_verify(result.to_json())
    if not result.ok:
        console.error(f"verification failed: {artifact}: {result.problem()}")
        raise typer.Exit(1)
