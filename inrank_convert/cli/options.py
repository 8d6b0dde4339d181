"""What several commands share: option declarations (Typer ``Annotated`` aliases), option values
turned into library arguments, and the progress bars the library's callbacks drive.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import torch
import typer

from inrank_convert.cli import console
from inrank_convert.core.errors import UsageError
from inrank_convert.core.tensors import COMPUTE_DTYPES

ArtifactArg = Annotated[Path, typer.Argument(help="Artifact folder written by compress.")]
InitOpt = Annotated[Path | None, typer.Option("--init", help="Init or base checkpoint (any CKPT form): update = W - W_init.")]
InitSeedOpt = Annotated[int | None, typer.Option("--init-seed", help="Init = from_config(config.json) under torch.manual_seed(N); stores only the recipe.")]
NoInitOpt = Annotated[bool, typer.Option("--no-init", help="Reference is zero: factorize the weights themselves.")]
RevisionOpt = Annotated[str | None, typer.Option(
    "--revision", help="CKPT as a Hugging Face hub id: the branch, tag or commit to read from the cache (default main).")]
InitRevisionOpt = Annotated[str | None, typer.Option(
    "--init-revision", help="--init as a Hugging Face hub id: the branch, tag or commit to read from the cache.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda[:N]: where the SVDs run.")]
CriterionOpt = Annotated[str | None, typer.Option("--criterion", help=(
    "energy-rest (default): t of the energy left after a dominant leading component (one holding half or more), "
    "the plain rule when there is none; energy: the smallest r with sum(s[:r]^2) >= t ||delta||^2, exactly; "
    "inrank: InRank's explained variance."))]
EmbeddingsOpt = Annotated[bool, typer.Option("--embeddings/--no-embeddings", help="Factorize embeddings and an untied LM head.")]
IncludeOpt = Annotated[list[str] | None, typer.Option("--include", help="Glob over parameter names; only matches are factorized (repeatable).")]
ExcludeOpt = Annotated[list[str] | None, typer.Option("--exclude", help="Glob over parameter names kept dense (repeatable).")]
EvalDeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda[:N]: where the models run.")]
TokenizerOpt = Annotated[Path | None, typer.Option(
    "--tokenizer", help="Tokenizer folder (tokenizer.json, or GPT-2 vocab.json + merges.txt); default: the artifact's.")]
EvalDtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16: the dtype the models run in.")]
MergeOpt = Annotated[bool, typer.Option("--merge", help="Fold the factors into dense weights (dense speed and memory).")]


def parse_dtype(name: str | None) -> torch.dtype | None:
    """--dtype NAME: one of the compute dtypes (None: not given)."""
    if name is None:
        return None
    if name not in COMPUTE_DTYPES:
        raise UsageError(f"unknown dtype {name!r}", "--dtype", f"choose one of {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


class PlanProgress:
    """A progress bar whose length is known only once the library has made its plan."""

    def __init__(self, stack: contextlib.ExitStack, description: str, quiet: bool):
        self._stack, self._description, self._quiet = stack, description, quiet
        self._advance = None

    def start(self, plan) -> None:
        count = sum(1 for entry in plan.entries if entry.action != "alias")
        self._advance = self._stack.enter_context(console.progress(count, self._description, self._quiet))

    def advance(self, label: str | None = None) -> None:
        if self._advance is not None:
            self._advance(label)


def plan_options(threshold, rank, criterion, svd, device, dtype, embeddings, include, exclude, float64, seed,
                  quantize=None, target_ratio=None, target_size=None):
    from inrank_convert.compression.plan import PlanOptions
    from inrank_convert.linalg.criteria import DEFAULT_CRITERION, RankRule

    return PlanOptions(rule=RankRule(criterion or DEFAULT_CRITERION, threshold, rank), engine=svd, device=device,
                       factor_dtype=parse_dtype(dtype), embeddings=embeddings, include=tuple(include or ()),
                       exclude=tuple(exclude or ()), float64=float64, seed=seed, quantize=quantize,
                       target_ratio=target_ratio, target_size=target_size)


def calibration_request(calibrate: Path | None, calib_tokens: int | None, tokenizer: Path | None,
                        distill_steps: int | None = None):
    """``--calibrate TEXT [--calib-tokens N] [--distill-scales N]`` as a CalibrationRequest (None
    without --calibrate)."""
    from inrank_convert.compression.job import CalibrationRequest

    for given, which, what in ((calib_tokens, "--calib-tokens", "limits the calibration text"),
                               (distill_steps, "--distill-scales", "trains on the calibration text")):
        if calibrate is None and given is not None:
            raise UsageError(f"{which} {what}, but no --calibrate TEXT was given", which,
                             f"add --calibrate TEXT, or drop {which}")
    if calibrate is None:
        return None
    return CalibrationRequest(calibrate, *(() if calib_tokens is None else (calib_tokens,)), tokenizer=tokenizer,
                              distill_steps=distill_steps)


def model_paths(ckpt: Path, revision: str | None, init: Path | None,
                 init_revision: str | None) -> tuple[Path, Path | None]:
    """CKPT and --init as local paths: a hub id (not a local path) becomes its snapshot folder in
    the Hugging Face cache, at --revision / --init-revision."""
    from inrank_convert.core.hub import resolve_model

    if init_revision is not None and init is None:
        raise UsageError("--init-revision selects a version of --init, but no --init was given", "--init-revision",
                         "add --init HUB_ID, or drop --init-revision")
    source = resolve_model(ckpt, revision)
    return source, (resolve_model(init, init_revision, "--init-revision") if init is not None else None)


def check_plot(plot: Path | None) -> None:
    """Fail on a missing matplotlib or a bad --plot path before minutes of work."""
    if plot is not None:
        from inrank_convert.measure.plots import check_plot_path

        check_plot_path(plot)
