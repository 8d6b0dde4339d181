"""What a training run is asked and what it reports: ``TrainOptions`` (stored in every checkpoint,
so a resumed run reuses them), their validation, the learning-rate schedule they define, and
``TrainResult``.

Kept apart from the loop: the CLI builds and checks options before any training starts, and the
schedule has one definition that the loop, the metrics and the tests share.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from inrank_convert.artifact.manifest import creation_time
from inrank_convert.core.distributed import check_device
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.core.tensors import COMPUTE_DTYPES
from inrank_convert.linalg.criteria import CRITERIA
from inrank_convert.model.architecture import check_seed
from inrank_convert.model.layers import FACTOR_SPLITS
from inrank_convert.training.optimizer import FACTOR_DECAYS
from inrank_convert.training.rank_control import (
    FACTORIZE_CHOICES,
    GROWTH_MODES,
    ON_GROWTH,
    RANK_SIGNALS,
    RankPolicy,
)

MODES = ("dense", "inrank")
WARM_START_THRESHOLD = 0.9
EMBEDDING_TRAINING = ("dense", "rows")


# A recipe fills in the InRank options a run leaves unset (None); what it sets is measured in
# docs/results.md#inrank-training-against-dense. "reference" is the InRank reference's mechanics.
RECIPES = {
    "warm-start": {"criterion": "energy", "threshold": WARM_START_THRESHOLD, "growth": "lora",
                   "embedding_training": "rows"},
    "reference": {"criterion": "inrank", "threshold": 0.9, "growth": None, "embedding_training": "dense"},
}
# The warm-start recipe's dense steps, at most a fifth of the run: 200 of 1,000 came within 10% of dense
# at 29.6% / 28.6% mean rank on two seeds, where 100 (a tenth) ended 15.5% behind (docs/results.md).
WARM_START_STEPS = 200
WARM_START_FRACTION = 5

# What a run recorded before the recipe options existed behaved like this.
BEFORE_RECIPE_OPTIONS = {"growth": None, "on_growth": "pad", "factor_decay": "factors", "factor_lr_scale": 1.0,
                         "orthogonal_init": False, "dense_warmup": None, "embedding_training": "dense",
                         "recipe": "reference", "rank_signal": "product"}


@dataclass
class TrainOptions:
    """Everything that decides a run. Stored in every checkpoint; a resumed run reuses it."""

    data: str = ""
    steps: int = 0  # total optimizer steps of the run
    val_data: str | None = None
    mode: str = "dense"
    efficient: bool = False
    freeze_dense: bool = False
    lr: float = 1e-3
    min_lr: float | None = None  # default lr / 10
    warmup: int | None = None  # default min(100, steps // 10)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    batch_size: int = 16  # sequences per optimizer step, over all processes
    block_size: int | None = None  # default min(256, the model's context)
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # autocast dtype; parameters and optimizer state stay float32
    save_every: int | None = None  # default: only at the end
    eval_every: int | None = None  # default: at each save and at the end (with val_data)
    eval_blocks: int = 32
    log_every: int = 10
    tokenizer: str | None = None
    criterion: str | None = None  # default: the recipe's
    threshold: float | None = None  # default: the recipe's
    buffer: int = 100
    rank_warmup: int = 200
    rank_every: int = 25
    max_rank: int | None = None
    factorize: str = "mlp"  # which linear layers InRank factorizes: mlp (the reference's), attention, all
    initial_rank: int | None = None  # default: 2, the reference's (clipped to a layer's full rank)
    stage2_at: int | None = None  # freeze ranks and re-split the factors by SVD at this step
    growth: str | None = None  # new factor columns: exact (function unchanged) or random (the reference's);
    # default: random with --efficient (the reference's InRank-Efficient), exact otherwise
    on_growth: str = "pad"  # at a growth: pad (moments padded with zeros) or resplit (balanced SVD re-split, fresh moments)
    factor_decay: str = "factors"  # --weight-decay on factors: per factor (AdamW's) or frobenius (on B @ A)
    factor_lr_scale: float = 1.0  # the factors' learning rate is lr * this
    orthogonal_init: bool = False  # the factorized layers' init W_0 replaced by an orthogonal one of the same norm
    dense_warmup: int | None = None  # train dense this many steps, then factorize (compress) and go on low rank
    embedding_training: str | None = None  # resume: a lowrank+rows embedding trains dense or as rows and factors
    recipe: str = "warm-start"  # fills in what is left unset: warm-start or reference (RECIPES)
    rank_signal: str = "product"  # what grows a rank: B @ A's spectrum, or also the update since the last decision
    factor_split: str = "balanced"  # how the switch and a resume split the factors they start from (FACTOR_SPLITS)
    rank_cut: int | None = None  # from rank_cut_at on, every factorized layer held at this rank (the rest cut off)
    rank_cut_at: int | None = None

    def resolved(self, from_scratch: bool) -> TrainOptions:
        """The options with what is unset filled in by the recipe (the reference's for dense runs).
        ``from_scratch`` (``train``): the warm-start recipe's dense warm-up applies, min(200, steps // 5)
        steps; a run that starts from an artifact is low rank already. ``dense_warmup`` 0 means none."""
        if self.mode != "inrank":  # a dense run records a rule only (its checkpoints name it)
            return replace(self, criterion=self.criterion or "inrank", threshold=self.threshold or 0.9)
        recipe = self.recipe if self.recipe in RECIPES else "reference"
        changes = {name: value for name, value in RECIPES[recipe].items() if getattr(self, name) is None}
        if self.dense_warmup is None and recipe == "warm-start" and from_scratch:
            changes["dense_warmup"] = min(WARM_START_STEPS, self.steps // WARM_START_FRACTION)
        if (changes.get("dense_warmup", self.dense_warmup) or 0) == 0:
            changes["dense_warmup"] = None
        return replace(self, **changes)

    def policy(self) -> RankPolicy:
        growth = self.growth or ("random" if self.efficient else "exact")
        return RankPolicy(self.criterion, self.threshold, self.buffer, self.rank_warmup, self.rank_every, self.max_rank,
                          self.stage2_at, growth, self.on_growth, self.rank_signal)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> TrainOptions:
        """The options a checkpoint recorded. A run that predates an option continues as it was
        trained: the option takes the value that reproduces the old behaviour, not today's default."""
        known = {f.name for f in fields(cls)}
        recorded = {k: v for k, v in values.items() if k in known}
        before = BEFORE_RECIPE_OPTIONS if recorded.get("mode") == "inrank" else {}
        return cls(**{**before, **recorded})


@dataclass
class TrainResult:
    run: Path
    start_step: int
    step: int
    loss: float | None
    val_loss: float | None
    checkpoints: list[Path]
    interrupted: bool
    ranks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    process_rank: int = 0  # under torchrun, only process 0 reports
    trainable_parameters: int = 0  # what the optimizer trained at the end

    @property
    def total_rank(self) -> int:
        return sum(self.ranks.values())

    def to_json(self) -> dict:
        return {"run": str(self.run), "start_step": self.start_step, "step": self.step, "loss": self.loss,
                "val_loss": self.val_loss, "checkpoints": [str(p) for p in self.checkpoints],
                "interrupted": self.interrupted, "total_rank": self.total_rank, "ranks": self.ranks,
                "seconds": round(self.seconds, 3), "tokens_per_second": round(self.tokens_per_second, 1),
                "trainable_parameters": self.trainable_parameters}


def _refuse(what: str, option: str, fix: str):
    """Bad options: one line for the user (what, where, how to fix)."""
    raise UsageError(what, option, fix)


def check_options(options: TrainOptions) -> None:
    if options.recipe not in RECIPES:
        _refuse(f"unknown {flag('--recipe')} {options.recipe!r}", flag("--recipe"),
                f"choose {' or '.join(RECIPES)}")
    given = options
    options = options.resolved(from_scratch=False)  # criterion and threshold as the run will use them

    creation_time()  # checkpoints record it: a malformed $SOURCE_DATE_EPOCH fails before training

    if options.steps <= 0:
        _refuse(f"{flag('--steps')} must be a positive number of optimizer steps", f"{flag('--steps')} {options.steps}", f"e.g. {flag('--steps')} 1000")
    if not options.data:
        _refuse("no training text given", flag("--data"), f"pass {flag('--data')} FILE (a text file or a folder of them)")
    if options.mode not in MODES:
        _refuse(f"unknown mode {options.mode!r}", flag("--mode"), "choose dense or inrank")
    if options.efficient and options.mode != "inrank":
        _refuse(f"{flag('--efficient')} is an InRank option", f"{flag('--mode')} dense", f"pass {flag('--mode')} inrank with {flag('--efficient')}")
    defaults = {f.name: f.default for f in fields(TrainOptions)}
    inrank_names = ("recipe", "factorize", "initial_rank", "stage2_at", "growth", "on_growth", "factor_decay",
                    "factor_lr_scale", "orthogonal_init", "dense_warmup", "embedding_training", "rank_signal", "factor_split",
                    "rank_cut", "rank_cut_at")
    inrank_only = [(name, f"--{name.replace('_', '-')}") for name in inrank_names
                   if getattr(given, name) != defaults[name]]
    if inrank_only and options.mode != "inrank":
        name, flag_name = inrank_only[0]
        _refuse(f"{flag(flag_name)} is an InRank option", f"{flag('--mode')} {options.mode}",
                f"pass {flag('--mode')} inrank with {flag(flag_name)}")
    # Options that take one of a few names: (value, its flag, the names, what each means).
    choices = [
        (options.factorize, "--factorize", FACTORIZE_CHOICES, "the InRank reference factorizes mlp"),
        (options.growth, "--growth", GROWTH_MODES,
         "exact and lora leave the function unchanged; random is the InRank reference's"),
        (options.on_growth, "--on-growth", ON_GROWTH,
         "pad keeps the moments; resplit re-splits the factors and starts their moments afresh"),
        (options.embedding_training, "--embedding-training", EMBEDDING_TRAINING,
         "dense trains every row; rows trains the stored rows and the low-rank part"),
        (options.factor_decay, "--factor-decay", FACTOR_DECAYS, "factors: AdamW decays A and B; frobenius: B @ A"),
        (options.rank_signal, "--rank-signal", RANK_SIGNALS,
         "product: B @ A's spectrum; update: also the update since the last decision"),
        (options.factor_split, "--factor-split", FACTOR_SPLITS,
         "balanced: sqrt(S) on each side; dense-rate: A's rows at norm sqrt(in / k)"),
    ]
    for value, option, names, meaning in choices:
        if value is not None and value not in names:
            _refuse(f"unknown {flag(option)} {value!r}", flag(option), f"choose one of {', '.join(names)} ({meaning})")
    if options.factor_decay == "frobenius" and options.weight_decay == 0:
        _refuse(f"{flag('--factor-decay')} frobenius decays B @ A by {flag('--weight-decay')}, which is 0",
                f"{flag('--factor-decay')} frobenius", f"pass {flag('--weight-decay')} (e.g. 0.1) as well")
    if not (math.isfinite(options.factor_lr_scale) and options.factor_lr_scale > 0):
        _refuse(f"{flag('--factor-lr-scale')} must be a positive number", f"{flag('--factor-lr-scale')} {options.factor_lr_scale}",
                "e.g. 0.5 (the factors learn at half --lr)")
    if options.dense_warmup is not None and not 0 <= options.dense_warmup < options.steps:
        _refuse(f"{flag('--dense-warmup')} must end before the run does (0 to {flag('--steps')} - 1 = {options.steps - 1})",
                f"{flag('--dense-warmup')} {options.dense_warmup}", f"pass fewer steps than {flag('--steps')} {options.steps}")
    if options.dense_warmup is not None and options.stage2_at is not None and options.stage2_at <= options.dense_warmup:
        _refuse(f"{flag('--stage2-at')} comes before the switch to low rank", f"{flag('--stage2-at')} {options.stage2_at}",
                f"pass a step after {flag('--dense-warmup')} {options.dense_warmup}")
    check_rank_cut(options)
    if options.initial_rank is not None and options.initial_rank < 0:
        _refuse(f"{flag('--initial-rank')} cannot be negative", f"{flag('--initial-rank')} {options.initial_rank}",
                "pass 0 or more (the reference starts at 2)")
    if options.stage2_at is not None and not 1 <= options.stage2_at <= options.steps:
        _refuse(f"{flag('--stage2-at')} must be a step of the run (1 to {flag('--steps')} {options.steps})",
                f"{flag('--stage2-at')} {options.stage2_at}", f"pass a step between 1 and {options.steps}")
    if options.dtype not in COMPUTE_DTYPES:
        _refuse(f"unknown dtype {options.dtype!r}", flag("--dtype"), f"choose one of {', '.join(COMPUTE_DTYPES)}")
    if options.criterion not in CRITERIA:
        _refuse(f"unknown criterion {options.criterion!r}", flag("--criterion"), f"choose one of {', '.join(CRITERIA)}")
    if not 0.0 < options.threshold <= 1.0:
        _refuse(f"{flag('--threshold')} must be in (0, 1]", f"{flag('--threshold')} {options.threshold}", f"e.g. {flag('--threshold')} 0.9")
    for name in ("batch_size", "grad_accum", "log_every", "eval_blocks", "rank_every", "buffer"):
        if getattr(options, name) < 1:
                _refuse(f"--{name.replace('_', '-')} must be at least 1", f"--{name.replace('_', '-')} {getattr(options, name)}",
                "pass a positive number")
    for name in ("save_every", "eval_every", "max_rank", "block_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
                _refuse(f"--{name.replace('_', '-')} must be at least 1", f"--{name.replace('_', '-')} {value}", "pass a positive number")
    if options.rank_warmup < 0 or (options.warmup is not None and options.warmup < 0):
        _refuse("warmup steps cannot be negative", f"{flag('--warmup')}/{flag('--rank-warmup')}", "pass 0 or more")
    if not (math.isfinite(options.lr) and options.lr > 0):
        _refuse(f"{flag('--lr')} must be a positive number", f"{flag('--lr')} {options.lr}", f"e.g. {flag('--lr')} 1e-3")
    if options.min_lr is not None and not (math.isfinite(options.min_lr) and options.min_lr >= 0):
        _refuse(f"{flag('--min-lr')} must be 0 or more", f"{flag('--min-lr')} {options.min_lr}",
                f"pass 0 or more; the default is {flag('--lr')} / 10")
    for name, option in (("grad_clip", "--grad-clip"), ("weight_decay", "--weight-decay")):
        value = getattr(options, name)
        if not (math.isfinite(value) and value >= 0):
                _refuse(f"{flag(option)} must be 0 or more", f"{flag(option)} {value}", "pass 0 or more; 0 turns it off")
    check_seed(options.seed, "--seed")
    if options.batch_size % options.grad_accum:
        _refuse(f"{flag('--batch-size')} must be a multiple of {flag('--grad-accum')}", f"{flag('--batch-size')} {options.batch_size} {flag('--grad-accum')} "
                f"{options.grad_accum}", f"e.g. {flag('--batch-size')} 16 {flag('--grad-accum')} 4")
    device = options.device
    check_device(device)
    if options.dtype == "float16" and not device.startswith("cuda"):
        _refuse("float16 autocast needs CUDA", f"{flag('--dtype')} float16", f"use {flag('--dtype')} bfloat16 or float32 on the CPU")


def check_rank_cut(options: TrainOptions) -> None:
    """--rank-cut R and --rank-cut-at STEP come together; the cut is after the switch (checked again
    once the recipe has set the dense warm-up), within the run, and at most --max-rank."""
    if (options.rank_cut is None) != (options.rank_cut_at is None):
        given, missing = ("--rank-cut", "--rank-cut-at") if options.rank_cut_at is None else ("--rank-cut-at", "--rank-cut")
        _refuse(f"{flag(given)} needs {flag(missing)}", flag(given), f"pass both, e.g. {flag('--rank-cut')} 8 {flag('--rank-cut-at')} 600")
    if options.rank_cut is None:
        return
    start = options.dense_warmup or 0
    if not start < options.rank_cut_at <= options.steps:
        _refuse(f"{flag('--rank-cut-at')} must be a step of the run after the switch to low rank ({start + 1} to {options.steps})",
                f"{flag('--rank-cut-at')} {options.rank_cut_at}", f"pass a step between {start + 1} and {options.steps}")
    if options.rank_cut < 1 or (options.max_rank is not None and options.rank_cut > options.max_rank):
        _refuse(f"{flag('--rank-cut')} must be from 1 to {flag('--max-rank')}", f"{flag('--rank-cut')} {options.rank_cut}",
                "pass a rank at least 1 and at most the cap")


def learning_rate(options: TrainOptions, step: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based): linear warmup, then cosine to min_lr."""
    warmup = options.warmup if options.warmup is not None else min(100, options.steps // 10)
    min_lr = options.min_lr if options.min_lr is not None else options.lr / 10
    if warmup and step <= warmup:
        return options.lr * step / warmup
    progress = (step - warmup) / max(1, options.steps - warmup)
    return min_lr + 0.5 * (options.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
