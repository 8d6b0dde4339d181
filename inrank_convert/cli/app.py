"""The command line: parse options, call one library function, render its result.

This is the error boundary: an InrankError (a user's mistake or a broken input) becomes one
line on stderr and a non-zero exit code; only bugs show a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import typing
from pathlib import Path
from typing import Annotated

import torch
import typer

from inrank_convert.cli import console
from inrank_convert.core.errors import InrankError, ReportedElsewhere, UsageError, cli_flags
from inrank_convert.core.tensors import COMPUTE_DTYPES
from inrank_convert.core.version import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Compact low-rank artifacts from trained checkpoints: factorize W - W_init, keep what matters.")


def declared_flags(command) -> set[str]:
    """Every long flag a command declares (``--embeddings/--no-embeddings`` gives both)."""
    flags = set()
    for hint in typing.get_type_hints(command, include_extras=True).values():
        for info in getattr(hint, "__metadata__", ()):
            if not isinstance(info, typer.models.OptionInfo):
                continue
            # In Annotated[..., typer.Option("--x", "-x")] typer takes the first name as ``default``.
            declarations = [info.default, *(info.param_decls or ())]
            for declaration in declarations:
                if isinstance(declaration, str):
                    flags.update(part for part in declaration.split("/") if part.startswith("--"))
    return flags


def user_errors(command):
    """Turn library errors into one stderr line and an exit code. Inside the command, library
    messages name the options this command has as its flags (``errors.flag``)."""
    flags = declared_flags(command)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with cli_flags(flags):
                return command(*args, **kwargs)
        except InrankError as err:
            if not isinstance(err, ReportedElsewhere):  # under torchrun, rank 0 prints the job's one line
                console.error(err.message)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            console.error("interrupted; nothing was written")
            raise typer.Exit(130) from None
        except OSError as err:
            console.error(f"{err.strerror or err}: {err.filename or ''} (check the path, free space and permissions)")
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool):
    if value:
        typer.echo(f"inrank-convert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False):
    pass


def _dtype(name: str | None) -> torch.dtype | None:
    """--dtype NAME: one of the compute dtypes (None: not given)."""
    if name is None:
        return None
    if name not in COMPUTE_DTYPES:
        raise UsageError(f"unknown dtype {name!r}", "--dtype", f"choose one of {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


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
CriterionOpt = Annotated[str, typer.Option("--criterion", help="energy: sum(s[:r]^2) >= t ||delta||^2; inrank: InRank's explained variance.")]
EmbeddingsOpt = Annotated[bool, typer.Option("--embeddings/--no-embeddings", help="Factorize embeddings and an untied LM head.")]
IncludeOpt = Annotated[list[str] | None, typer.Option("--include", help="Glob over parameter names; only matches are factorized (repeatable).")]
ExcludeOpt = Annotated[list[str] | None, typer.Option("--exclude", help="Glob over parameter names kept dense (repeatable).")]
EvalDeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda[:N]: where the models run.")]
TokenizerOpt = Annotated[Path | None, typer.Option(
    "--tokenizer", help="Tokenizer folder (tokenizer.json, or GPT-2 vocab.json + merges.txt); default: the artifact's.")]


class _PlanProgress:
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


def _plan_options(threshold, rank, criterion, svd, device, dtype, embeddings, include, exclude, float64, seed,
                  quantize=None, target_ratio=None, target_size=None):
    from inrank_convert.compression.plan import PlanOptions
    from inrank_convert.linalg.spectrum import RankRule

    return PlanOptions(rule=RankRule(criterion, threshold, rank), engine=svd, device=device,
                       factor_dtype=_dtype(dtype), embeddings=embeddings, include=tuple(include or ()),
                       exclude=tuple(exclude or ()), float64=float64, seed=seed, quantize=quantize,
                       target_ratio=target_ratio, target_size=target_size)


DEFAULT_THRESHOLD = 0.90


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


def _calibration_request(calibrate: Path | None, calib_tokens: int | None, tokenizer: Path | None):
    """``--calibrate TEXT [--calib-tokens N]`` as a CalibrationRequest (None without --calibrate)."""
    from inrank_convert.compression.job import CalibrationRequest

    if calibrate is None and calib_tokens is not None:
        raise UsageError("--calib-tokens limits the calibration text, but no --calibrate TEXT was given",
                         "--calib-tokens", "add --calibrate TEXT, or drop --calib-tokens")
    if calibrate is None:
        return None
    return CalibrationRequest(calibrate, *(() if calib_tokens is None else (calib_tokens,)), tokenizer=tokenizer)


def _model_paths(ckpt: Path, revision: str | None, init: Path | None,
                 init_revision: str | None) -> tuple[Path, Path | None]:
    """CKPT and --init as local paths: a hub id (not a local path) becomes its snapshot folder in
    the Hugging Face cache, at --revision / --init-revision."""
    from inrank_convert.core.hub import resolve_model

    if init_revision is not None and init is None:
        raise UsageError("--init-revision selects a version of --init, but no --init was given", "--init-revision",
                         "add --init HUB_ID, or drop --init-revision")
    source = resolve_model(ckpt, revision)
    return source, (resolve_model(init, init_revision, "--init-revision") if init is not None else None)


def _default_output(ckpt: Path, source: Path) -> Path:
    """CKPT-inrank beside CKPT; for a hub id (resolved elsewhere), NAME-inrank in the current folder."""
    if source != ckpt:
        return Path(f"{ckpt.name}-inrank")
    return ckpt.with_name(ckpt.name.removesuffix(ckpt.suffix) + "-inrank")


def _check_plot(plot: Path | None) -> None:
    """Fail on a missing matplotlib or a bad --plot path before minutes of work."""
    if plot is not None:
        from inrank_convert.measure.plots import check_plot_path

        check_plot_path(plot)


def _rank0_reports(command):
    """Under torchrun, a user error met on a rank other than 0 before compress starts (a bad flag:
    every process meets it) is handed to rank 0, which prints the job's one line."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from inrank_convert.core.distributed import env_world

        try:
            return command(*args, **kwargs)
        except ReportedElsewhere:
            raise
        except KeyboardInterrupt:
            world = env_world()
            if not world.enabled or world.is_main:
                raise
            raise ReportedElsewhere(130) from None  # Ctrl-C reaches every process: rank 0 says it once
        except (InrankError, OSError) as err:
            world = env_world()
            if not world.enabled or world.is_main:
                raise
            from inrank_convert.compression.torchrun import hand_error_to_main

            hand_error_to_main(err)

    return wrapper


@app.command("compress")
@user_errors
@_rank0_reports
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
        "--threshold", "-t", help="Fraction of each update kept, in (0, 1] (default 0.9).")] = None,
    criterion: CriterionOpt = "energy",
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
    svd: Annotated[str, typer.Option("--svd", help="auto | exact | randomized.")] = "auto",
    device: DeviceOpt = "cpu",
    dtype: Annotated[str | None, typer.Option(
        "--dtype", help="Store factors and rows as float32, float16 or bfloat16 (default: bfloat16 below threshold 1, "
                        "the source dtype at 1).")] = None,
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="int8: factors and rows as int8, one float scale per rank-1 component and per row.")] = None,
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

    Example: inrank-convert compress runs/gpt2/ -o gpt2-inrank --threshold 0.9

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
    calibration = _calibration_request(calibrate, calib_tokens, tokenizer)
    options = _plan_options(threshold, rank, criterion, svd, device, dtype, embeddings, include, exclude, float64, seed,
                            quantize, target_ratio, target_size)
    if world.enabled and not dry_run:
        from inrank_convert.compression.torchrun import check_one_process

        check_one_process(options, calibration, max_increase is not None)
    source, init = _model_paths(ckpt, revision, init, init_revision)
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
            bar = _PlanProgress(stack, "compressing", silent or not world.is_main)
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


@app.command("inspect")
@user_errors
def inspect_command(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder written by compress.")],
    json_output: JsonOpt = False,
):
    """Per-layer table (shape, kind, rank, energy kept, bytes) and totals, from the header alone.

    Example: inrank-convert inspect gpt2-inrank --json
    """
    from inrank_convert.artifact import describe_artifact

    summary = describe_artifact(artifact)
    console.emit_json(summary) if json_output else console.render_summary(summary, f"{artifact} (format v{summary['version']})")


@app.command("spectrum")
@user_errors
def spectrum_command(
    ckpt: Annotated[Path, typer.Argument(help="Trained checkpoint or run folder (any CKPT form).")],
    init: InitOpt = None,
    init_seed: InitSeedOpt = None,
    no_init: NoInitOpt = False,
    revision: RevisionOpt = None,
    init_revision: InitRevisionOpt = None,
    thresholds: Annotated[str, typer.Option("--thresholds", help="Comma-separated thresholds in (0, 1].")] = "0.5,0.8,0.9,0.99",
    criterion: CriterionOpt = "energy",
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
    from inrank_convert.measure.analysis import parse_thresholds, spectrum_report
    from inrank_convert.measure.plots import plot_spectrum

    if criterion not in ("energy", "inrank"):
        raise UsageError(f"unknown criterion {criterion!r}", "--criterion", "choose energy or inrank")
    values = parse_thresholds(thresholds)
    _check_plot(plot)
    options = _plan_options(0.9, None, criterion, "exact", device, None, embeddings, include, exclude, float64, 0)
    source, init = _model_paths(ckpt, revision, init, init_revision)
    with contextlib.ExitStack() as stack:
        bar = _PlanProgress(stack, "spectra", quiet or json_output)
        result = spectrum_report(source, values, criterion, init=init, init_seed=init_seed, no_init=no_init,
                                 options=options, on_plan=bar.start, on_layer=bar.advance)
    if plot is not None:
        plot_spectrum(result, plot)
    console.emit_json(result.to_json()) if json_output else console.render_spectrum(result.to_json())


@app.command("decompress")
@user_errors
def decompress_command(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder written by compress.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Dense Hugging Face folder to write.")],
    init: Annotated[Path | None, typer.Option("--init", help="Use this init instead of the recorded one.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    reference_only: Annotated[bool, typer.Option(
        "--reference-only", help="Write the reference (init / base) model instead: the base for export-peft. "
        "With an embedded init, tensors stored dense keep their trained values.")] = False,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Write the dense model (W_ref + B @ A) as a Hugging Face folder that from_pretrained loads.

    Example: inrank-convert decompress gpt2-inrank -o gpt2-dense
    """
    from inrank_convert.artifact import read_manifest
    from inrank_convert.export.dense import decompress

    count = len(read_manifest(artifact).tensors)
    with console.progress(count, "decompressing", quiet or json_output) as advance:
        result = decompress(artifact, output, force=force, init=init, on_tensor=advance,
                            reference_only=reference_only)
    if json_output:
        console.emit_json(result.to_json())
    else:
        console.stdout.print(f"wrote {result.tensors} tensors ({console.human_bytes(result.bytes)}) to {output}")


@app.command("export-peft")
@user_errors
def export_peft_command(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder written by compress.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Adapter folder to write.")],
    init: Annotated[Path | None, typer.Option("--init", help="Use this init instead of the recorded one.")] = None,
    target: Annotated[str, typer.Option(
        "--target", help="peft: exact (LoRA, biases, modules_to_save); vllm: LoRA on linear projections only, "
                         "what vLLM serves (the rest is listed as dropped).")] = "peft",
    max_rank: Annotated[int | None, typer.Option(
        "--max-rank", help="--target vllm: the largest LoRA rank, at most 512 (default 512); a larger update "
                           "becomes its truncated SVD.")] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Text (file or folder): perplexity of the base, base + adapter (PEFT) and the artifact.")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", help="Use only the first N tokens of --data.")] = None,
    context: Annotated[int | None, typer.Option(
        "--context", help="Window length in tokens for --data (default: the model's context length).")] = None,
    tokenizer: TokenizerOpt = None,
    device: EvalDeviceOpt = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    json_output: JsonOpt = False,
):
    """Write a PEFT LoRA adapter that turns the reference (init / base) model into the compressed one.

    Load it with PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUTPUT); for a
    seed or embedded init, 'decompress --reference-only' writes BASE. --target vllm writes what vLLM
    serves and lists what that leaves out.

    Example: inrank-convert export-peft gpt2-inrank -o gpt2-adapter
    """
    from inrank_convert.export.adapter_check import export_and_score
    from inrank_convert.export.peft_adapter import export_peft
    from inrank_convert.export.vllm_plan import dropped_summary

    if data is None:
        for name, value in (("--max-tokens", max_tokens), ("--context", context), ("--tokenizer", tokenizer)):
            if value is not None:
                raise UsageError(f"{name} applies to the perplexity check only", f"{name} {value}",
                                 f"add --data TEXT, or drop {name}")
        result = export_peft(artifact, output, force=force, init=init, target=target, max_rank=max_rank)
    else:
        result = export_and_score(artifact, output, data, force=force, init=init, target=target, max_rank=max_rank,
                                  max_tokens=max_tokens, context=context, tokenizer=tokenizer, device=device)
    for note in result.notes:
        console.warn(note)
    lines = dropped_summary(result.dropped)
    if lines:
        console.warn(f"the vllm adapter leaves out or approximates {len(result.dropped)} changed tensors "
                     "(--json lists each):")
        for line in lines:
            console.status(f"  {line}")
    if json_output:
        console.emit_json(result.to_json())
    else:
        console.render_export_peft(result.to_json())


@app.command("verify")
@user_errors
def verify_command(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder written by compress.")],
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


EvalDtypeOpt = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16: the dtype the models run in.")]
MergeOpt = Annotated[bool, typer.Option("--merge", help="Fold the factors into dense weights (dense speed and memory).")]


@app.command("report")
@user_errors
def report_command(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder written by compress.")],
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

    _check_plot(plot)
    with contextlib.ExitStack() as stack:
        bar = _WindowProgress(stack, quiet or json_output)
        result = report(artifact, data, original=original, also=tuple(also or ()), device=device,
                        dtype=_dtype(dtype), max_tokens=max_tokens, stride=stride, tokenizer=tokenizer,
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


@app.command("sweep")
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
    int8: Annotated[bool, typer.Option("--int8/--no-int8", help="Every setting also with --quantize int8.")] = True,
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

    Example: inrank-convert sweep runs/gpt2/ --data wiki.valid.raw --calibrate train.txt --plot sweep.png
    """
    from inrank_convert.compression.plan import PlanOptions
    from inrank_convert.measure.plots import plot_sweep
    from inrank_convert.measure.sweep import DEFAULT_RATIOS, DEFAULT_THRESHOLDS, sweep

    calibration = _calibration_request(calibrate, calib_tokens, tokenizer)
    _check_plot(plot)
    silent = quiet or json_output
    source, init = _model_paths(ckpt, revision, init, init_revision)
    result = sweep(source, data, thresholds=_numbers(thresholds, "--thresholds", DEFAULT_THRESHOLDS),
                   ratios=_numbers(ratios, "--ratios", DEFAULT_RATIOS), storages=(None, "int8") if int8 else (None,),
                   calibration=calibration, max_tokens=max_tokens, tokenizer=tokenizer, init=init, init_seed=init_seed,
                   no_init=no_init, options=PlanOptions(device=device, embeddings=embeddings),
                   on_row=None if silent else lambda row: console.status(
                       f"{row.setting.label}: {row.ratio:.2%} of dense, perplexity {row.perplexity:.4g} "
                       f"({row.increase_percent:+.2f}%)"))
    if plot is not None:
        plot_sweep(result, plot)
    console.emit_json(result.to_json()) if json_output else console.render_sweep(result.to_json())


@app.command("compare-runs")
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

    _check_plot(plot)
    silent = quiet or json_output
    result = compare_runs(dense_run, inrank_run, data=data, max_tokens=max_tokens, device=device,
                          on_checkpoint=None if silent else lambda label, step: console.status(f"scoring {label} step {step}"))
    if plot is not None:
        plot_compare_runs(result, plot)
    console.emit_json(result.to_json()) if json_output else console.render_compare_runs(result.to_json())


@app.command("generate")
@user_errors
def generate_command(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder written by compress.")],
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")] = 50,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature; 0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest tokens; 0 = all.")] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: the same seed gives the same text.")] = 0,
    device: EvalDeviceOpt = "cpu",
    dtype: EvalDtypeOpt = "float32",
    tokenizer: TokenizerOpt = None,
    init: Annotated[Path | None, typer.Option("--init", help="Use this init instead of the artifact's recorded one.")] = None,
    merge: MergeOpt = False,
    json_output: JsonOpt = False,
):
    """Generate text from the compressed model (prompt and continuation on stdout).

    Example: inrank-convert generate gpt2-inrank --prompt "The history of" --max-new-tokens 40 --seed 1
    """
    from inrank_convert.runtime.evaluate import generate

    result = generate(artifact, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      seed=seed, device=device, dtype=_dtype(dtype), tokenizer=tokenizer, init=init, merge=merge)
    console.emit_json(result.to_json()) if json_output else console.render_generation(result.to_json())


StepsOpt = Annotated[int | None, typer.Option("--steps", help="Total optimizer steps of the run (not steps to add).")]
TrainDataOpt = Annotated[Path | None, typer.Option("--data", help="Training text: a file or a folder of text files.")]


def _training_overrides(**values) -> dict:
    """Command-line values for TrainOptions (paths as strings; None = not given)."""
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in values.items()}


def _finish_training(result, json_output: bool) -> None:
    if result.process_rank != 0:
        raise typer.Exit(130 if result.interrupted else 0)
    if json_output:
        console.emit_json(result.to_json())
    else:
        console.render_training(result.to_json())
    if result.interrupted:
        console.error(f"interrupted at step {result.step}; checkpoint saved in {result.checkpoints[-1]} "
                      f"(continue with: inrank-convert resume {result.run} --steps N)")
        raise typer.Exit(130)


@app.command("train")
@user_errors
def train_command(
    source: Annotated[Path, typer.Argument(help="config.json (init = from_config under --seed) or a model folder (or a "
                                               "Hugging Face hub id in the local cache) used as the init.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Run folder to create (step-0, step-N, metrics.jsonl).")],
    data: Annotated[Path, typer.Option("--data", help="Training text: a file or a folder of text files.")],
    steps: Annotated[int, typer.Option("--steps", help="Total optimizer steps.")],
    mode: Annotated[str, typer.Option("--mode", help="dense | inrank.")] = "dense",
    efficient: Annotated[bool, typer.Option("--efficient", help="InRank-Efficient: W = B @ A, no reference weight.")] = False,
    freeze_dense: Annotated[bool, typer.Option("--freeze-dense", help="Train only the factors.")] = False,
    val_data: Annotated[Path | None, typer.Option("--val-data", help="Validation text (sequential windows).")] = None,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 1e-3,
    min_lr: Annotated[float | None, typer.Option("--min-lr", help="LR at the end of the cosine (default lr/10).")] = None,
    warmup: Annotated[int | None, typer.Option("--warmup", help="LR warmup steps (default min(100, steps/10)); cosine after.")] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay of matrices.")] = 0.0,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Clip the gradient norm (0 = off).")] = 1.0,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per optimizer step (all processes).")] = 16,
    block_size: Annotated[int | None, typer.Option("--block-size", help="Tokens per sequence (default min(256, context)).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Init, data order and dropout seed.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda (under torchrun: each process's GPU).")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="Autocast dtype: float32, bfloat16, float16 (CUDA).")] = "float32",
    save_every: Annotated[int | None, typer.Option("--save-every", help="Checkpoint every N steps (and at the end).")] = None,
    eval_every: Annotated[int | None, typer.Option("--eval-every", help="Validation loss every N steps (default: at saves).")] = None,
    log_every: Annotated[int, typer.Option("--log-every", help="A metrics.jsonl record every N steps.")] = 10,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Tokenizer folder (default: beside the config).")] = None,
    criterion: Annotated[str, typer.Option("--criterion", help="Rank criterion: inrank (explained variance) or energy.")] = "inrank",
    threshold: Annotated[float, typer.Option("--threshold", help="Rank criterion threshold.")] = 0.9,
    buffer: Annotated[int, typer.Option("--buffer", help="Spare factor columns per layer (clipped to a quarter of full rank).")] = 100,
    rank_warmup: Annotated[int, typer.Option("--rank-warmup", help="Optimizer steps before the first rank decision.")] = 200,
    rank_every: Annotated[int, typer.Option("--rank-every", help="Optimizer steps between rank decisions.")] = 25,
    max_rank: Annotated[int | None, typer.Option("--max-rank", help="Rank cap (default min(rows, cols) // 2).")] = None,
    factorize: Annotated[str, typer.Option(
        "--factorize", help="Which linear layers InRank factorizes: mlp (the reference's), attention or all.")] = "mlp",
    initial_rank: Annotated[int | None, typer.Option(
        "--initial-rank", help="Starting rank per layer (default 2, the reference's).")] = None,
    stage2_at: Annotated[int | None, typer.Option(
        "--stage2-at", help="At this step freeze the ranks and re-split the factors by SVD (InRank-Efficient's stage 2).")] = None,
    growth: Annotated[str | None, typer.Option(
        "--growth", help="New factor columns: exact (B zero, function unchanged) or random (kaiming, the reference's; "
                         "with --efficient the factors start random too). Default: random with --efficient, "
                         "else exact.")] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Train a causal LM dense or with InRank; writes a run folder that compress reads.

    Example: inrank-convert train config.json -o runs/gpt2 --data input.txt --steps 2000 --mode inrank
    """
    from inrank_convert.training.entrypoints import train
    from inrank_convert.training.options import TrainOptions, check_options

    options = TrainOptions(**_training_overrides(
        data=data, steps=steps, val_data=val_data, mode=mode, efficient=efficient, freeze_dense=freeze_dense, lr=lr,
        min_lr=min_lr, warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip, grad_accum=grad_accum, batch_size=batch_size,
        block_size=block_size, seed=seed, device=device, dtype=dtype, save_every=save_every, eval_every=eval_every,
        log_every=log_every, tokenizer=tokenizer, criterion=criterion, threshold=threshold, buffer=buffer,
        rank_warmup=rank_warmup, rank_every=rank_every, max_rank=max_rank, factorize=factorize,
        initial_rank=initial_rank, stage2_at=stage2_at, growth=growth))
    check_options(options)
    with console.training_progress(steps, 0, quiet or json_output) as update:
        result = train(source, output, options, on_step=update)
    _finish_training(result, json_output)


@app.command("resume")
@user_errors
def resume_command(
    source: Annotated[Path, typer.Argument(help="A run folder (continued exactly), an artifact, or a dense checkpoint.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="New run folder (required unless SOURCE is a run).")] = None,
    data: TrainDataOpt = None,
    steps: StepsOpt = None,
    init: InitOpt = None,
    init_seed: InitSeedOpt = None,
    no_init: NoInitOpt = False,
    efficient: Annotated[bool | None, typer.Option("--efficient", help="InRank-Efficient (needs a zero-reference artifact).")] = None,
    freeze_dense: Annotated[bool | None, typer.Option("--freeze-dense", help="Train only the factors.")] = None,
    val_data: Annotated[Path | None, typer.Option("--val-data", help="Validation text.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate (default: the run's, else 1e-3).")] = None,
    min_lr: Annotated[float | None, typer.Option("--min-lr", help="LR at the end of the cosine.")] = None,
    warmup: Annotated[int | None, typer.Option("--warmup", help="LR warmup steps.")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Sequences per optimizer step.")] = None,
    block_size: Annotated[int | None, typer.Option("--block-size", help="Tokens per sequence.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Data order and dropout seed.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda.")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="Autocast dtype.")] = None,
    save_every: Annotated[int | None, typer.Option("--save-every", help="Checkpoint every N steps.")] = None,
    eval_every: Annotated[int | None, typer.Option("--eval-every", help="Validation loss every N steps.")] = None,
    log_every: Annotated[int | None, typer.Option("--log-every", help="A metrics record every N steps.")] = None,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Tokenizer folder (default: the checkpoint's).")] = None,
    criterion: Annotated[str | None, typer.Option("--criterion", help="inrank or energy (also compresses a dense SOURCE).")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Criterion threshold (also compresses a dense SOURCE).")] = None,
    buffer: Annotated[int | None, typer.Option("--buffer", help="Spare factor columns per layer.")] = None,
    rank_warmup: Annotated[int | None, typer.Option("--rank-warmup", help="Steps before the first rank decision.")] = None,
    rank_every: Annotated[int | None, typer.Option("--rank-every", help="Steps between rank decisions.")] = None,
    max_rank: Annotated[int | None, typer.Option("--max-rank", help="Rank cap.")] = None,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Continue InRank training: a run folder exactly where it stopped, or an artifact's factors.

    Example: inrank-convert resume gpt2-inrank -o runs/resumed --data input.txt --steps 500
    """
    from inrank_convert.training.entrypoints import resume

    overrides = _training_overrides(
        data=data, steps=steps, val_data=val_data, efficient=efficient, freeze_dense=freeze_dense, lr=lr, min_lr=min_lr,
        warmup=warmup,
        grad_accum=grad_accum, batch_size=batch_size, block_size=block_size, seed=seed, device=device, dtype=dtype,
        save_every=save_every, eval_every=eval_every, log_every=log_every, tokenizer=tokenizer, criterion=criterion,
        threshold=threshold, buffer=buffer, rank_warmup=rank_warmup, rank_every=rank_every, max_rank=max_rank)
    with console.training_progress(steps or 0, 0, quiet or json_output) as update:
        result = resume(source, output, overrides, init=init, init_seed=init_seed, no_init=no_init, on_step=update)
    _finish_training(result, json_output)


@app.command("demo")
@user_errors
def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Folder the demo owns (replaced by the next demo).")] = Path("demo-out"),
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Real text: gpt2-tokenizer/, tinyshakespeare/, wikitext-2-raw/ (default: ../shared/data).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps of each run from scratch.")] = 200,
    resume_steps: Annotated[int, typer.Option("--resume-steps", help="InRank steps resumed from the dense artifact.")] = 60,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Evaluation tokens of wiki.test.raw.")] = 16384,
    n_embd: Annotated[int, typer.Option("--n-embd", help="Model width.")] = 128,
    n_layer: Annotated[int, typer.Option("--n-layer", help="Transformer blocks.")] = 4,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Train a small GPT-2 dense and with InRank from one init, compress both, resume InRank, compare.

    Example: inrank-convert demo --out demo-out
    """
    from inrank_convert.demo import DemoSettings, run_demo

    if steps < 1 or resume_steps < 1 or eval_tokens < 2:
        raise UsageError("--steps, --resume-steps and --eval-tokens must be positive", None, "e.g. --steps 300")
    default_data = Path(__file__).resolve().parents[2] / "shared" / "data"
    settings = DemoSettings(out=out, data_dir=data_dir or default_data, steps=steps, resume_steps=resume_steps,
                            eval_tokens=eval_tokens, n_embd=n_embd, n_layer=n_layer, n_head=max(1, n_embd // 32))
    say = (lambda text: None) if quiet or json_output else (lambda text: console.stderr.print(text))
    result = run_demo(settings, on_stage=say, on_step=None if quiet or json_output else _log_demo_step)
    console.emit_json(result.to_json()) if json_output else console.render_demo(result.to_json())


def _log_demo_step(record: dict) -> None:
    console.stderr.print(f"  step {record['step']}  loss {record['loss']:.3f}  {record['tokens_per_second']:.0f} tok/s"
                         + (f"  total rank {record['total_rank']}" if "total_rank" in record else ""))


def main() -> None:
    app()
