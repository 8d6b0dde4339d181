"""Training: ``train`` (a run from an init or a config) and ``resume`` (a run, an artifact or a
dense checkpoint, continued with InRank)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inrank_convert.cli import console, console_runs
from inrank_convert.cli.boundary import user_errors
from inrank_convert.cli.options import InitOpt, InitSeedOpt, JsonOpt, NoInitOpt, QuietOpt

StepsOpt = Annotated[int | None, typer.Option("--steps", help="Total optimizer steps of the run (not steps to add).")]
GrowthOpt = Annotated[str | None, typer.Option(
    "--growth", help="New factor columns: exact (B zero, A tiny: function unchanged), lora (B zero, A kaiming: "
                     "unchanged, and the columns learn) or random (kaiming, the reference's; with --efficient the "
                     "factors start random too). Default: random with --efficient, else exact.")]
OnGrowthOpt = Annotated[str | None, typer.Option(
    "--on-growth", help="At a growth: pad (moments padded with zeros, the default) or resplit (B @ A re-split into "
                        "balanced SVD factors, fresh moments).")]
RankSignalOpt = Annotated[str | None, typer.Option(
    "--rank-signal", help="What grows a rank: product (B @ A's spectrum, the default) or update (also the update since "
                          "the last decision, where more than 1 - threshold of it lies beyond what the kept rank can "
                          "follow).")]
FactorSplitOpt = Annotated[str | None, typer.Option(
    "--factor-split", help="How the switch of --dense-warmup and a resume from an artifact split each update's "
                           "factors: balanced (sqrt(S) on each side, as compress writes them; the default) or "
                           "dense-rate (A's rows at norm sqrt(in / k), so the layer's rows move at the dense rate "
                           "under Adam).")]
FactorDecayOpt = Annotated[str | None, typer.Option(
    "--factor-decay", help="How --weight-decay reaches the factors: factors (AdamW on A and B, the default) or "
                           "frobenius (decay of B @ A).")]
FactorLrOpt = Annotated[float | None, typer.Option(
    "--factor-lr-scale", help="The factors' learning rate as a multiple of --lr (default 1).")]
RecipeOpt = Annotated[str, typer.Option(
    "--recipe", help="What InRank options left unset become: warm-start (a dense warm-up, then energy-rule factors "
                     "with buffer columns that learn) or reference (the InRank reference's mechanics).")]
RankCutOpt = Annotated[int | None, typer.Option(
    "--rank-cut", help="From --rank-cut-at on, every factorized layer keeps at most this rank: the best rank "
                       "(+ buffer) part of B @ A, fresh moments; no rank grows past it.")]
RankCutAtOpt = Annotated[int | None, typer.Option("--rank-cut-at", help="The step of --rank-cut (after the switch).")]
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
        console_runs.render_training(result.to_json())
    if result.interrupted:
        console.error(f"interrupted at step {result.step}; checkpoint saved in {result.checkpoints[-1]} "
                      f"(continue with: inrank-convert resume {result.run} --steps N)")
        raise typer.Exit(130)


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
    criterion: Annotated[str | None, typer.Option(
        "--criterion", help="Rank criterion: inrank (explained variance), energy or energy-rest (default: the recipe's).")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Rank criterion threshold (default: the "
                                                                         "recipe's).")] = None,
    buffer: Annotated[int, typer.Option("--buffer", help="Spare factor columns per layer (clipped to a quarter of full rank).")] = 100,
    rank_warmup: Annotated[int, typer.Option("--rank-warmup", help="Optimizer steps before the first rank decision.")] = 200,
    rank_every: Annotated[int, typer.Option("--rank-every", help="Optimizer steps between rank decisions.")] = 25,
    max_rank: Annotated[int | None, typer.Option("--max-rank", help="Rank cap per layer, up to its full rank (default min(rows, cols) // 2).")] = None,
    factorize: Annotated[str, typer.Option(
        "--factorize", help="Which linear layers InRank factorizes: mlp (the reference's), attention or all.")] = "mlp",
    initial_rank: Annotated[int | None, typer.Option(
        "--initial-rank", help="Starting rank per layer (default 2, the reference's).")] = None,
    stage2_at: Annotated[int | None, typer.Option(
        "--stage2-at", help="At this step freeze the ranks and re-split the factors by SVD (InRank-Efficient's stage 2).")] = None,
    growth: GrowthOpt = None,
    on_growth: OnGrowthOpt = None,
    rank_signal: RankSignalOpt = None,
    factor_split: FactorSplitOpt = None,
    rank_cut: RankCutOpt = None,
    rank_cut_at: RankCutAtOpt = None,
    factor_decay: FactorDecayOpt = None,
    factor_lr_scale: FactorLrOpt = None,
    orthogonal_init: Annotated[bool, typer.Option(
        "--orthogonal-init", help="Start the factorized layers from an orthogonal W_0 of the init's norm.")] = False,
    dense_warmup: Annotated[int | None, typer.Option(
        "--dense-warmup", help="Train dense this many steps, then factorize the update (--criterion, --threshold) "
                               "and go on in low rank; 0 = none (default: the recipe's).")] = None,
    recipe: RecipeOpt = "warm-start",
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Train a causal LM dense or with InRank; writes a run folder that compress reads.

    Example: inrank-convert train config.json -o runs/gpt2 --data input.txt --steps 2000 --mode inrank
    """
    from inrank_convert.training.entrypoints import train
    from inrank_convert.training.options import TrainOptions, check_options

    options = TrainOptions(**{key: value for key, value in _training_overrides(
        data=data, steps=steps, val_data=val_data, mode=mode, efficient=efficient, freeze_dense=freeze_dense, lr=lr,
        min_lr=min_lr, warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip, grad_accum=grad_accum, batch_size=batch_size,
        block_size=block_size, seed=seed, device=device, dtype=dtype, save_every=save_every, eval_every=eval_every,
        log_every=log_every, tokenizer=tokenizer, criterion=criterion, threshold=threshold, buffer=buffer,
        rank_warmup=rank_warmup, rank_every=rank_every, max_rank=max_rank, factorize=factorize,
        initial_rank=initial_rank, stage2_at=stage2_at, growth=growth, on_growth=on_growth, rank_signal=rank_signal, factor_split=factor_split, rank_cut=rank_cut, rank_cut_at=rank_cut_at, factor_decay=factor_decay,
        factor_lr_scale=factor_lr_scale, orthogonal_init=orthogonal_init or None, dense_warmup=dense_warmup,
        recipe=recipe).items()
        if value is not None})
    check_options(options)
    with console_runs.training_progress(steps, 0, quiet or json_output) as update:
        result = train(source, output, options, on_step=update)
    _finish_training(result, json_output)


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
    criterion: Annotated[str | None, typer.Option("--criterion", help="inrank, energy or energy-rest (default: the recipe's; "
        "a dense SOURCE is compressed at it when named, else at compress's default energy-rest).")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Criterion threshold (also compresses a dense SOURCE).")] = None,
    buffer: Annotated[int | None, typer.Option("--buffer", help="Spare factor columns per layer.")] = None,
    rank_warmup: Annotated[int | None, typer.Option("--rank-warmup", help="Steps before the first rank decision.")] = None,
    rank_every: Annotated[int | None, typer.Option("--rank-every", help="Steps between rank decisions.")] = None,
    max_rank: Annotated[int | None, typer.Option("--max-rank", help="Rank cap.")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="AdamW weight decay of matrices.")] = None,
    growth: GrowthOpt = None,
    on_growth: OnGrowthOpt = None,
    rank_signal: RankSignalOpt = None,
    factor_split: FactorSplitOpt = None,
    rank_cut: RankCutOpt = None,
    rank_cut_at: RankCutAtOpt = None,
    factor_decay: FactorDecayOpt = None,
    factor_lr_scale: FactorLrOpt = None,
    embedding_training: Annotated[str | None, typer.Option(
        "--embedding-training", help="A lowrank+rows token embedding of the artifact trains dense (every row) or "
                                     "as rows (a row per token of the text, and its low-rank part; default: the "
                                     "recipe's, rows for warm-start).")] = None,
    recipe: Annotated[str | None, RecipeOpt.__metadata__[0]] = None,
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
        threshold=threshold, buffer=buffer, rank_warmup=rank_warmup, rank_every=rank_every, max_rank=max_rank,
        weight_decay=weight_decay, growth=growth, on_growth=on_growth, rank_signal=rank_signal, factor_split=factor_split, rank_cut=rank_cut, rank_cut_at=rank_cut_at, factor_decay=factor_decay,
        factor_lr_scale=factor_lr_scale, embedding_training=embedding_training, recipe=recipe)
    with console_runs.training_progress(steps or 0, 0, quiet or json_output) as update:
        result = resume(source, output, overrides, init=init, init_seed=init_seed, no_init=no_init, on_step=update)
    _finish_training(result, json_output)
