"""``inrank-convert compress``: one checkpoint into an artifact (a rank rule, a size target or a
perplexity target; one process, or shared out under torchrun)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from inrank_convert.cli import console
from inrank_convert.cli.boundary import rank0_reports, user_errors
from inrank_convert.cli.options import (
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
    calibration_request,
    model_paths,
    plan_options,
)
from inrank_convert.core.errors import UsageError
from inrank_convert.linalg.criteria import DEFAULT_THRESHOLD


def _compress_threshold(threshold: float | None, target_ratio: float | None, target_size: int | None,
                        max_increase: float | None = None) -> float:
    """--threshold as given, or its default; refused beside a size or perplexity target (which set the ranks)."""
    if target_ratio is not None or target_size is not None or max_increase is not None:
        which = "--target-ratio" if target_ratio is not None else "--target-size" if target_size is not None \
            else "--max-perplexity-increase"
        if threshold is not None:
            raise UsageError(f"{which} allocates the ranks, but --threshold sets them per tensor", "--threshold",
                             "pass only one of them")
    return DEFAULT_THRESHOLD if threshold is None else threshold


def _check_target_flags(max_increase: float | None, eval_text: Path | None, eval_tokens: int | None) -> None:
    """Flags that only mean something beside another one."""
    if max_increase is not None and eval_text is None:
        raise UsageError("--max-perplexity-increase measures perplexity, but no text to measure it on was given",
                         "--max-perplexity-increase", "add --eval-text TEXT (held-out text, not the calibration text)")
    if max_increase is None and (eval_text is not None or eval_tokens is not None):
        which = "--eval-text" if eval_text is not None else "--eval-tokens"
        raise UsageError(f"{which} is the text of a perplexity target, but none was set", which,
                         "add --max-perplexity-increase P (percent), or drop it")


def _default_output(ckpt: Path, source: Path) -> Path:
    """CKPT-inrank beside CKPT; for a hub id (resolved elsewhere), NAME-inrank in the current folder."""
    if source != ckpt:
        return Path(f"{ckpt.name}-inrank")
    return ckpt.with_name(ckpt.name.removesuffix(ckpt.suffix) + "-inrank")


@user_errors
@rank0_reports
def compress_command(
    ckpt: Annotated[Path, typer.Argument(help="HF folder, sharded folder, .safetensors/.bin/.pt/.ckpt, run folder, "
                                             "artifact, or a Hugging Face hub id in the local cache.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Artifact folder to write (default: CKPT-inrank).")] = None,
    init: InitOpt = None,
    init_seed: InitSeedOpt = None,
    no_init: NoInitOpt = False,
    revision: RevisionOpt = None,
    init_revision: InitRevisionOpt = None,
    embed_init: Annotated[bool, typer.Option("--embed-init", help="Store the init tensors in the artifact so it stands alone.")] = False,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", "-t", help=f"Fraction of each update kept, in (0, 1] (default {DEFAULT_THRESHOLD:g}).")] = None,
    criterion: CriterionOpt = None,
    rank: Annotated[int | None, typer.Option("--rank", help="Fixed rank for every factorized tensor (clipped).")] = None,
    target_ratio: Annotated[float | None, typer.Option(
        "--target-ratio", help="Artifact file at most this fraction of the dense bytes, in (0, 1]: ranks and rows "
                               "allocated across tensors by the most error removed per byte.")] = None,
    target_size: Annotated[int | None, typer.Option(
        "--target-size", help="Artifact file at most this many bytes (allocated as --target-ratio).")] = None,
    max_increase: Annotated[float | None, typer.Option(
        "--max-perplexity-increase", help="Smallest artifact whose perplexity on --eval-text is at most P percent "
                                          "above the dense model's (a search over the size; --target-ratio or "
                                          "--target-size beside it caps the size).")] = None,
    eval_text: Annotated[Path | None, typer.Option(
        "--eval-text", help="Held-out text (file or folder) the perplexity target is measured on.")] = None,
    eval_tokens: Annotated[int | None, typer.Option(
        "--eval-tokens", help="Use only the first N tokens of --eval-text (default: all of it).")] = None,
    calibrate: Annotated[Path | None, typer.Option(
        "--calibrate", help="Text (file or folder) to whiten each layer's update by its input Gram on: the factors "
                            "minimize the layer's output error. Needs a size or perplexity target.")] = None,
    calib_tokens: Annotated[int | None, typer.Option(
        "--calib-tokens", help="Use the first N tokens of --calibrate (default 65536).")] = None,
    tokenizer: Annotated[Path | None, typer.Option(
        "--tokenizer", help="Tokenizer folder for --calibrate and --eval-text (default: the checkpoint's).")] = None,
    distill_scales: Annotated[int | None, typer.Option(
        "--distill-scales", help="Then train the stored scales, and nothing else (same bytes), for N steps to match "
                                 "the trained model's next-token distributions on the --calibrate text; kept only "
                                 "if they lower that KL. Integer storage only.")] = None,
    svd: Annotated[str, typer.Option("--svd", help="auto | exact | randomized.")] = "auto",
    device: DeviceOpt = "cpu",
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="Store factors and rows as float32, float16 or bfloat16 instead of int8 (at threshold 1: "
                        "the source dtype unless given).")] = None,
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="int8 (the default below threshold 1): factors and rows as int8, one float scale per "
                           "rank-1 component and per row; int4: 4-bit codes with a scale per 64 numbers (the two "
                           "leading components at 8 bits); none: floats (--dtype, else bfloat16).")] = None,
    embeddings: EmbeddingsOpt = True,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    float64: Annotated[bool, typer.Option("--float64", help="Exact SVDs in float64.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the randomized SVD.")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Factorize each weight's update relative to its init into a compact low-rank artifact.

    Example: inrank-convert compress runs/gpt2/ -o gpt2-inrank --threshold 0.95

    Under torchrun (torchrun --nproc_per_node N -m inrank_convert compress ...) the tensors are
    shared out over the processes and rank 0 writes the artifact.
    """
    from inrank_convert.compression.job import check_options, compress, plan_compression
    from inrank_convert.core.distributed import env_world
    from inrank_convert.inputs.sources import open_inputs

    world = env_world()
    if dry_run and not world.is_main:
        return  # rank 0 prints the plan
    threshold = _compress_threshold(threshold, target_ratio, target_size, max_increase)
    _check_target_flags(max_increase, eval_text, eval_tokens)
    calibration = calibration_request(calibrate, calib_tokens, tokenizer, distill_scales)
    options = plan_options(threshold, rank, criterion, svd, device, dtype, embeddings, include, exclude, float64, seed,
                            quantize, target_ratio, target_size)
    if world.enabled and not dry_run:
        from inrank_convert.compression.torchrun_schedule import check_one_process

        check_one_process(options, calibration, max_increase is not None)
    source, init = model_paths(ckpt, revision, init, init_revision)
    if dry_run:
        check_options(options)
        inputs = open_inputs(source, init, init_seed, no_init, embed_init)
        try:
            plan = plan_compression(inputs, options).to_json(str(Path(inputs.trained.path).resolve()),
                                                             inputs.reference.mode)
        finally:
            inputs.close()
        console.emit_json(plan) if json_output else console.render_plan(plan)
        return
    output = output or _default_output(ckpt, source)
    silent = quiet or json_output
    if max_increase is not None:
        from inrank_convert.compression.perplexity_target import compress_to_perplexity

        def on_step(step) -> None:
            if not silent:
                console.status(f"candidate of {step.bytes} bytes: perplexity {step.perplexity:.4g} "
                               f"({step.increase_percent:+.3f}%, {'within' if step.within else 'above'} the target)")

        searched = compress_to_perplexity(source, output, max_increase=max_increase, eval_text=eval_text,
                                          eval_tokens=eval_tokens, tokenizer=tokenizer, init=init, init_seed=init_seed,
                                          no_init=no_init, embed_init=embed_init, options=options, force=force,
                                          calibration=calibration, on_step=on_step,
                                          on_stage=None if silent else console.status)
        result = searched.compress
        summary = searched.to_json()
        title = (f"Compressed {ckpt} -> {output}: perplexity {searched.perplexity:.4g} "
                 f"({searched.increase_percent:+.3f}% of the dense {searched.dense_perplexity:.4g}, target "
                 f"+{max_increase:g}%) in {len(searched.steps)} candidates")
    else:
        with contextlib.ExitStack() as stack:
            bar = PlanProgress(stack, "compressing", silent or not world.is_main)
            progress = dict(on_plan=bar.start, on_layer=lambda layer: bar.advance(f"{layer.name} {layer.kind} r={layer.rank}"))
            if world.enabled:
                from inrank_convert.compression.torchrun import compress_distributed

                result = compress_distributed(source, output, init=init, init_seed=init_seed, no_init=no_init,
                                              embed_init=embed_init, options=options, force=force, **progress)
            else:
                result = compress(source, output, init=init, init_seed=init_seed, no_init=no_init,
                                  embed_init=embed_init, options=options, force=force, calibration=calibration,
                                  **progress)
        if result is None:  # a rank other than 0 of a torchrun job: rank 0 reports
            return
        summary = result.to_json()
        title = f"Compressed {ckpt} -> {output} in {result.seconds:.1f} s"
    for note in result.notes:
        console.warn(note)
    if json_output:
        console.emit_json(summary)
    else:
        console.render_summary(result.to_json(), title)
