"""Train a causal LM dense or with InRank (DESIGN §5), and resume it exactly.

One loop serves every start: ``train`` (from a config.json with a seed, or from a model folder
used as the init) and ``resume`` (from an artifact, from a dense checkpoint compressed first, or
from a run folder, continuing exactly where it stopped). In InRank mode every linear layer is
``W = W_ref + B @ A`` (``W = B @ A`` with ``efficient``); the rank controller grows the factors
on its schedule, in optimizer steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import model_context, seeded_model
from .artifact import (
    INIT_FILE,
    ReferenceRecord,
    RuleRecord,
    atomic_output_dir,
    check_output_free,
    is_artifact,
    read_manifest,
)
from .checkpoints import run_steps
from .compress import compress
from .data import (
    TokenBatches,
    cached_tokens,
    check_block_fits,
    load_tokenizer,
    read_text,
    tokenizer_fingerprint,
    validation_blocks,
)
from .distributed import (
    World,
    any_true,
    barrier,
    broadcast_object,
    close_world,
    gather_objects,
    init_world,
    mean,
    process_device,
)
from .errors import CheckpointError, MismatchError, OutputError, UsageError
from .modeling import load_compressed, load_dense, model_config
from .plan import PlanOptions
from .rank_control import RankController, RankPolicy, factorize_model, grow_layer, low_rank_layers
from .reference import INIT_RECIPE_FILE, CheckpointReference, read_init_recipe, seed_reference
from .sources import is_run, open_checkpoint
from .spectrum import CRITERIA, RankRule
from .tensors import COMPUTE_DTYPES, sha256_tensor
from .train_state import (
    METRICS_FILE,
    RNG_PREFIX,
    is_training_checkpoint,
    latest_checkpoint,
    load_optimizer_tensors,
    load_state,
    optimizer_tensors,
    save_checkpoint,
    save_model_weights,
    step_folder,
    trim_metrics,
)

MODES = ("dense", "inrank")


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
    criterion: str = "inrank"
    threshold: float = 0.9
    buffer: int = 100
    rank_warmup: int = 200
    rank_every: int = 25
    max_rank: int | None = None

    def policy(self) -> RankPolicy:
        return RankPolicy(self.criterion, self.threshold, self.buffer, self.rank_warmup, self.rank_every, self.max_rank)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> TrainOptions:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


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

    @property
    def total_rank(self) -> int:
        return sum(self.ranks.values())

    def to_json(self) -> dict:
        return {"run": str(self.run), "start_step": self.start_step, "step": self.step, "loss": self.loss,
                "val_loss": self.val_loss, "checkpoints": [str(p) for p in self.checkpoints],
                "interrupted": self.interrupted, "total_rank": self.total_rank, "ranks": self.ranks,
                "seconds": round(self.seconds, 3), "tokens_per_second": round(self.tokens_per_second, 1)}


def check_options(options: TrainOptions) -> None:
    def bad(what: str, option: str, fix: str):
        raise UsageError(what, option, fix)

    if options.steps <= 0:
        bad("--steps must be a positive number of optimizer steps", f"--steps {options.steps}", "e.g. --steps 1000")
    if not options.data:
        bad("no training text given", "--data", "pass --data FILE (a text file or a folder of them)")
    if options.mode not in MODES:
        bad(f"unknown mode {options.mode!r}", "--mode", "choose dense or inrank")
    if options.efficient and options.mode != "inrank":
        bad("--efficient is an InRank option", "--mode dense", "pass --mode inrank with --efficient")
    if options.dtype not in COMPUTE_DTYPES:
        bad(f"unknown dtype {options.dtype!r}", "--dtype", f"choose one of {', '.join(COMPUTE_DTYPES)}")
    if options.criterion not in CRITERIA:
        bad(f"unknown criterion {options.criterion!r}", "--criterion", f"choose one of {', '.join(CRITERIA)}")
    if not 0.0 < options.threshold <= 1.0:
        bad("--threshold must be in (0, 1]", f"--threshold {options.threshold}", "e.g. --threshold 0.9")
    for name in ("batch_size", "grad_accum", "log_every", "eval_blocks", "rank_every", "buffer"):
        if getattr(options, name) < 1:
            bad(f"--{name.replace('_', '-')} must be at least 1", f"--{name.replace('_', '-')} {getattr(options, name)}",
                "pass a positive number")
    for name in ("save_every", "eval_every", "max_rank", "block_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
            bad(f"--{name.replace('_', '-')} must be at least 1", f"--{name.replace('_', '-')} {value}", "pass a positive number")
    if options.rank_warmup < 0 or (options.warmup is not None and options.warmup < 0):
        bad("warmup steps cannot be negative", "--warmup/--rank-warmup", "pass 0 or more")
    if options.lr <= 0 or options.grad_clip < 0 or options.weight_decay < 0:
        bad("--lr must be positive, --grad-clip and --weight-decay not negative", f"--lr {options.lr}", "check the values")
    if options.batch_size % options.grad_accum:
        bad("--batch-size must be a multiple of --grad-accum", f"--batch-size {options.batch_size} --grad-accum "
            f"{options.grad_accum}", "e.g. --batch-size 16 --grad-accum 4")
    device = options.device
    if not (device == "cpu" or device.startswith("cuda")):
        bad(f"unknown device {device!r}", "--device", "use cpu or cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        bad("CUDA is not available on this machine", f"--device {device}", "use --device cpu")
    if options.dtype == "float16" and not device.startswith("cuda"):
        bad("float16 autocast needs CUDA", "--dtype float16", "use --dtype bfloat16 or float32 on the CPU")


def learning_rate(options: TrainOptions, step: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based): linear warmup, then cosine to min_lr."""
    warmup = options.warmup if options.warmup is not None else min(100, options.steps // 10)
    min_lr = options.min_lr if options.min_lr is not None else options.lr / 10
    if warmup and step <= warmup:
        return options.lr * step / warmup
    progress = (step - warmup) / max(1, options.steps - warmup)
    return min_lr + 0.5 * (options.lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# --- building the model ----------------------------------------------------------------------

def _resolve_init(source: Path):
    """(config, init weights folder or None) of ``train``'s CONFIG_OR_INIT."""
    from transformers import AutoConfig

    source = Path(source)
    if not source.exists():
        raise UsageError("no such config or model folder", str(source), "pass a config.json or a model folder")
    config_path = source if source.is_file() else source / "config.json"
    if not config_path.is_file():
        raise UsageError("no config.json", str(source), "pass a config.json file, or a folder that holds one")
    try:
        config = AutoConfig.from_pretrained(str(config_path))
    except (ValueError, KeyError, OSError) as err:
        raise UsageError(f"cannot build a config ({_first_line(err, config_path)})", str(config_path),
                         "pass a transformers config.json with a model_type transformers knows") from err
    weights = None
    if source.is_dir():
        try:
            open_checkpoint(source).close()
            weights = source
        except CheckpointError:  # a folder with a config and no weights: train from the seed
            weights = None
    return config, weights


def _first_line(err: BaseException, path: Path) -> str:
    """The error's first line without the path (the message names it once, after the colon)."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text.replace(str(path), "the file").strip() or type(err).__name__


def _check_tokenizer(tokenizer, config, where: str) -> None:
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise MismatchError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size {vocab}",
                            where, "pass the --tokenizer the model was made for, or a config with a larger vocab_size")


def _block_size(options: TrainOptions, config) -> int:
    context = model_context(config)
    if options.block_size is None:
        return min(256, context or 256)
    if context is not None and options.block_size > context:
        raise MismatchError(f"--block-size {options.block_size} is longer than the model's context of {context} tokens",
                            "--block-size", f"pass --block-size {context} or less")
    return options.block_size


def _writable_run(run: Path) -> None:
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".inrank-write-test-{int(time.time() * 1e6)}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise OutputError(f"cannot write the run folder ({err.strerror})", str(run), "choose a writable -o location") from err


def _check_new_run(run: Path) -> None:
    """Refuse an occupied -o. Every process checks before any creates it: a refusal on rank 0 alone
    would leave the others waiting at the next collective."""
    if run.exists() and not run.is_dir():
        raise OutputError("the run folder path is a file, not a folder", str(run), "choose another -o")
    if run.exists() and any(run.iterdir()):
        raise OutputError("the run folder exists and is not empty", str(run),
                          f"continue it with 'inrank-convert resume {run} ...', or choose another -o")


def _start_run(run: Path, world: World, copy_from: tuple[Path, Path] | None = None) -> None:
    """Create the new run folder (on rank 0), optionally as a copy of (source run, checkpoint)."""
    _check_new_run(run)
    barrier(world)
    if world.is_main:
        _writable_run(run)
        if copy_from is not None:
            _copy_run(*copy_from, run)
    barrier(world)


# --- the session: model, optimizer, data, rank control ----------------------------------------

@dataclass
class Session:
    run: Path
    options: TrainOptions
    world: World
    device: torch.device
    model: nn.Module
    tokenizer: object
    tokens: torch.Tensor
    block_size: int
    reference: ReferenceRecord | None  # the artifact reference of InRank checkpoints (None: dense run)
    embedded_init: Path | None = None
    controller: RankController | None = None
    step: int = 0
    optimizer: torch.optim.Optimizer | None = None
    batches: TokenBatches | None = None
    val_tokens: torch.Tensor | None = None
    wrapped: nn.Module | None = None

    def setup(self) -> None:
        opts = self.options
        self.model.to(self.device)
        self.model.train()
        if opts.freeze_dense:
            for name, param in self.model.named_parameters():
                param.requires_grad_(name.endswith((".lora_A", ".lora_B")))
        decay, no_decay = [], []
        for _, param in self.model.named_parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=opts.lr, betas=(0.9, 0.95))
        self.batches = TokenBatches(self.tokens, self.block_size, opts.batch_size, opts.seed)
        torch.manual_seed(opts.seed * 7919 + 1 + self.world.rank)  # dropout: different in each process
        self.wrap()

    def wrap(self) -> None:
        """(Re-)wrap for DistributedDataParallel; needed again whenever the factors grow."""
        if not self.world.enabled:
            self.wrapped = self.model
            return
        from torch.nn.parallel import DistributedDataParallel

        self.wrapped = None
        ids = [self.device.index] if self.device.type == "cuda" else None
        # The frozen references are identical in every process: broadcasting them each step is waste.
        self.wrapped = DistributedDataParallel(self.model, device_ids=ids, forward_sync_buffers=False)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = optimizer_tensors(self.model, self.optimizer)
        tensors[RNG_PREFIX + "data"] = self.batches.state()
        for rank, state in enumerate(gather_objects(torch.get_rng_state(), self.world)):
            tensors[f"{RNG_PREFIX}torch.{rank}"] = state
        if self.device.type == "cuda":
            for rank, state in enumerate(gather_objects(torch.cuda.get_rng_state(self.device), self.world)):
                tensors[f"{RNG_PREFIX}cuda.{rank}"] = state
        return tensors

    def restore(self, trainer_state: dict, tensors: dict[str, torch.Tensor]) -> None:
        load_optimizer_tensors(self.model, self.optimizer, tensors)
        self.batches.load_state(tensors[RNG_PREFIX + "data"])
        rank_key = f"{RNG_PREFIX}torch.{self.world.rank}"
        if rank_key in tensors:
            torch.set_rng_state(tensors[rank_key])
        cuda_key = f"{RNG_PREFIX}cuda.{self.world.rank}"
        if self.device.type == "cuda" and cuda_key in tensors:
            torch.cuda.set_rng_state(tensors[cuda_key], self.device)
        self.step = int(trainer_state["step"])

    def trainer_state(self) -> dict:
        return {"step": self.step, "mode": self.options.mode, "efficient": self.options.efficient,
                "options": self.options.to_json(), "world_size": self.world.size,
                "tokenizer": tokenizer_fingerprint(self.tokenizer),
                "config": self.model.config.to_dict(), "reference": None if self.reference is None else self.reference.to_json(),
                "rank_controller": self.controller.state_dict() if self.controller else None}

    def save(self) -> Path:
        tensors = self.state_tensors()  # a collective: every process takes part
        folder = step_folder(self.run, self.step)
        if self.world.is_main:
            rule = RuleRecord(self.options.criterion, self.options.threshold)
            save_checkpoint(self.run, self.step, self.model, self.tokenizer, self.reference, rule,
                            self.trainer_state(), tensors, self.embedded_init)
        barrier(self.world)
        return folder


# --- the loop --------------------------------------------------------------------------------

@contextmanager
def _stop_requests():
    """Ctrl-C (SIGINT) and SIGTERM set a flag; the loop saves a checkpoint and stops."""
    requested = {"stop": False}

    def handler(signum, frame):
        requested["stop"] = True

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no signal handling
        pass
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _autocast(options: TrainOptions, device: torch.device):
    dtype = COMPUTE_DTYPES[options.dtype]
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def batch_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of [n, block + 1] token ids."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # [n, block, vocab]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def validation_loss(session: Session) -> float | None:
    if session.val_tokens is None:
        return None
    model, opts = session.model, session.options
    blocks = validation_blocks(session.val_tokens, session.block_size, opts.eval_blocks).to(session.device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for chunk in blocks.split(max(1, opts.batch_size)):
            with _autocast(opts, session.device):
                total += float(batch_loss(model, chunk)) * chunk.shape[0]
            count += chunk.shape[0]
    finally:
        model.train(was_training)
    return total / max(1, count)


def _grow(session: Session) -> None:
    """One rank decision: made on rank 0, applied identically everywhere."""
    growth = session.controller.decide(session.model) if session.world.is_main else None
    growth, ranks = broadcast_object((growth, dict(session.controller.ranks)), session.world)
    session.controller.ranks = ranks
    if not growth:
        return
    generator = torch.Generator().manual_seed(session.options.seed * 1_000_003 + session.step)
    layers = dict(low_rank_layers(session.model))
    for name in sorted(growth):
        grow_layer(layers[name], growth[name], session.optimizer, generator)
    session.wrap()


def run_loop(session: Session, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    opts, world = session.options, session.world
    start_step, started = session.step, time.perf_counter()
    per_process = opts.batch_size // world.size
    micro = per_process // opts.grad_accum
    tokens_per_step = opts.batch_size * session.block_size
    scaler = torch.amp.GradScaler("cuda") if opts.dtype == "float16" else None
    metrics = (session.run / METRICS_FILE).open("a") if world.is_main else None
    checkpoints: list[Path] = []
    loss_value = val_loss = None
    window_started, window_steps = time.perf_counter(), 0
    interrupted = False
    try:
        with _stop_requests() as stop:
            while session.step < opts.steps:
                batch = session.batches.next_batch()  # [global batch, block + 1], same in every process
                local = batch[world.rank * per_process:(world.rank + 1) * per_process].to(session.device)
                session.optimizer.zero_grad(set_to_none=True)
                total = torch.zeros((), device=session.device)
                for index, piece in enumerate(local.split(micro)):
                    last = index == opts.grad_accum - 1
                    sync = nullcontext() if last or not world.enabled else session.wrapped.no_sync()
                    with sync:
                        with _autocast(opts, session.device):
                            loss = batch_loss(session.wrapped, piece)
                        scaled = loss / opts.grad_accum
                        (scaler.scale(scaled) if scaler else scaled).backward()
                    total += loss.detach()
                session.step += 1
                lr = learning_rate(opts, session.step)
                for group in session.optimizer.param_groups:
                    group["lr"] = lr
                if scaler:
                    scaler.unscale_(session.optimizer)
                if opts.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for g in session.optimizer.param_groups for p in g["params"]],
                                                   opts.grad_clip)
                if scaler:
                    scaler.step(session.optimizer)
                    scaler.update()
                else:
                    session.optimizer.step()
                loss_value = float(mean(total / opts.grad_accum, world))
                if not math.isfinite(loss_value):
                    raise UsageError(f"the loss became {loss_value} at step {session.step}", f"--lr {opts.lr}",
                                     "lower --lr, or use --dtype float32")
                if session.controller is not None and session.controller.policy.due(session.step):
                    _grow(session)
                window_steps += 1
                final = session.step == opts.steps
                save_now = final or (opts.save_every is not None and session.step % opts.save_every == 0)
                eval_every = opts.eval_every
                evaluate = session.val_tokens is not None and (
                    final or (eval_every is not None and session.step % eval_every == 0)
                    or (eval_every is None and save_now))
                stop_now = any_true(stop["stop"], world, session.device)
                if evaluate:
                    val_loss = validation_loss(session)
                if session.step % opts.log_every == 0 or session.step == 1 or final or evaluate or stop_now:
                    elapsed = time.perf_counter() - window_started
                    record = {"step": session.step, "loss": loss_value, "lr": lr,
                              "tokens_per_second": round(tokens_per_step * window_steps / max(elapsed, 1e-9), 1)}
                    if evaluate:
                        record["val_loss"] = val_loss
                    if session.controller is not None:
                        record["ranks"] = dict(session.controller.ranks)
                        record["total_rank"] = session.controller.total_rank
                    if metrics is not None:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                    if on_step is not None and world.is_main:
                        on_step(record)
                    window_started, window_steps = time.perf_counter(), 0
                if save_now or stop_now:
                    checkpoints.append(session.save())
                if stop_now and not final:
                    interrupted = True
                    break
    finally:
        if metrics is not None:
            metrics.close()
    seconds = time.perf_counter() - started
    done = session.step - start_step
    return TrainResult(session.run, start_step, session.step, loss_value, val_loss, checkpoints, interrupted,
                       dict(session.controller.ranks) if session.controller else {}, seconds,
                       tokens_per_step * done / seconds if seconds > 0 else 0.0, world.rank)


# --- entry points ----------------------------------------------------------------------------

def token_cache_dir(run: Path) -> Path:
    """Where token caches live: $INRANK_CONVERT_CACHE, else ~/.cache/inrank-convert/tokens (shared by
    runs, so a text is tokenized once per tokenizer), else the run folder when home is not writable."""
    configured = os.environ.get("INRANK_CONVERT_CACHE")
    if configured:
        return Path(configured)
    home = Path.home() / ".cache" / "inrank-convert" / "tokens"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return run / "cache"


def _load_data(session_run: Path, options: TrainOptions, tokenizer, block_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    cache = token_cache_dir(session_run)
    tokens = cached_tokens(options.data, tokenizer, cache)
    check_block_fits(tokens, block_size, options.data)
    val = None
    if options.val_data:
        val = cached_tokens(options.val_data, tokenizer, cache)
        check_block_fits(val, block_size, options.val_data)
    return tokens, val


def _check_world(options: TrainOptions, world: World) -> None:
    if options.batch_size % (world.size * options.grad_accum):
        raise UsageError(f"--batch-size {options.batch_size} does not split over {world.size} processes x "
                         f"--grad-accum {options.grad_accum}", "--batch-size",
                         f"pass a multiple of {world.size * options.grad_accum}")


def train(source: str | Path, run: str | Path, options: TrainOptions,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train from ``source`` (a config.json, or a model folder used as the init) into ``run``."""
    check_options(options)
    run = Path(run)
    world = init_world(options.device)
    try:
        _check_world(options, world)
        config, weights = _resolve_init(Path(source))
        tokenizer = load_tokenizer(weights or (Path(source) if Path(source).is_dir() else Path(source).parent),
                                   options.tokenizer)
        _check_tokenizer(tokenizer, config, options.tokenizer or str(source))
        block_size = _block_size(options, config)
        tokens, val = _load_data(run, options, tokenizer, block_size)  # bad text fails before anything is written
        _start_run(run, world)
        model = load_dense(weights, config) if weights is not None else seeded_model(config, options.seed)
        init_folder = step_folder(run, 0)
        if world.is_main:
            _save_init(model, tokenizer, init_folder, None if weights is not None else options.seed)
        barrier(world)
        reference = controller = None
        if options.mode == "inrank":
            reference = _init_reference(init_folder, weights is None, options, model)
            generator = torch.Generator().manual_seed(options.seed * 1_000_003)
            ranks = factorize_model(model, options.policy(), options.efficient, generator)
            controller = RankController(options.policy(), ranks)
        session = Session(run, options, world, process_device(options.device, world), model, tokenizer, tokens,
                          block_size, reference, controller=controller, val_tokens=val)
        session.setup()
        return run_loop(session, on_step)
    finally:
        close_world(world)


def _save_init(model: nn.Module, tokenizer, folder: Path, seed: int | None) -> None:
    with atomic_output_dir(folder) as temp:
        model.config.save_pretrained(temp)
        save_model_weights(model, temp)
        tokenizer.save_pretrained(temp)
        if seed is not None:
            # compress reads this recipe and stores no init tensors: the init is from_config under this seed.
            (temp / INIT_RECIPE_FILE).write_text(json.dumps({"seed": seed}) + "\n")


def _init_reference(init_folder: Path, seeded: bool, options: TrainOptions, model: nn.Module) -> ReferenceRecord:
    if options.efficient:
        return ReferenceRecord("zero")
    if seeded:
        config = json.loads((init_folder / "config.json").read_text())
        reference = seed_reference(config, options.seed)
        hashes = reference.hashes()
        # The recipe must regenerate exactly the init we train from; if not, refer to step-0 by path.
        if all(hashes.get(name) == sha256_tensor(tensor) for name, tensor in model.state_dict().items()):
            return reference.record()
    checkpoint = open_checkpoint(init_folder)
    try:
        return CheckpointReference(checkpoint).record()
    finally:
        checkpoint.close()


def resume(source: str | Path, run: str | Path | None, overrides: dict, init: str | Path | None = None,
           init_seed: int | None = None, no_init: bool = False,
           on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Continue training from a run folder (exactly), an artifact, or a dense checkpoint.

    ``overrides`` are the options given on the command line (None values are ignored); a run
    folder's own options fill in the rest, otherwise the defaults do.
    """
    source = Path(source)
    given = {k: v for k, v in overrides.items() if v is not None}
    if not source.exists():
        raise UsageError("no such run folder, artifact or checkpoint", str(source), "check the path")
    if is_run(source) or (source.is_dir() and any(is_training_checkpoint(p) for p in source.glob("step-*"))):
        return _resume_run(source, Path(run) if run is not None else None, given, on_step)
    if run is None:
        raise UsageError("resuming from an artifact or a checkpoint needs a new run folder", str(source),
                         "pass -o RUN")
    options = replace(TrainOptions(mode="inrank"), **given)
    check_options(options)
    if options.mode != "inrank":
        raise UsageError("resume trains with InRank from an artifact or checkpoint", "--mode dense",
                         "use 'train' with the model folder as the init for dense training")
    if is_artifact(source):
        if init is not None or init_seed is not None or no_init:
            raise UsageError("--init/--init-seed/--no-init apply to dense checkpoints; an artifact has its reference",
                             str(source), "drop the option")
        return _resume_artifact(source, Path(run), options, on_step)
    return _resume_dense(source, Path(run), options, init, init_seed, no_init, on_step)


def _resume_dense(source: Path, run: Path, options: TrainOptions, init, init_seed, no_init, on_step) -> TrainResult:
    """Compress the dense checkpoint (at --criterion/--threshold, into a temporary artifact), then
    resume from that artifact."""
    check_output_free(run, force=False)
    for text in (options.data, options.val_data):
        if text:
            read_text(text)  # a missing, empty or binary file fails before minutes of compression
    if init is None and init_seed is None and not no_init and is_run(source.absolute().parent):
        # A step folder of a run: its update is measured against the run's init, as compress RUN does.
        first = run_steps(source.absolute().parent)[0][1]
        if first != source.absolute():
            init, init_seed = first, read_init_recipe(first)
    world = init_world(options.device)
    try:
        with tempfile.TemporaryDirectory(prefix=".inrank-resume-", dir=_parent_for_temp(run)) as temp:
            artifact = Path(temp) / "artifact"
            if world.is_main:
                compress(source, artifact, init=init, init_seed=init_seed, no_init=no_init, embed_init=False,
                         options=PlanOptions(rule=RankRule(options.criterion, options.threshold), seed=options.seed))
            barrier(world)
            return _resume_artifact(artifact, run, options, on_step, world, source_hint=source)
    finally:
        close_world(world)


def _parent_for_temp(run: Path) -> Path:
    parent = Path(run).absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot write the run folder ({err.strerror})", str(run), "choose a writable -o location") from err
    return parent


def _resume_artifact(artifact: Path, run: Path, options: TrainOptions, on_step, world: World | None = None,
                     source_hint: Path | None = None) -> TrainResult:
    own_world = world is None
    world = world or init_world(options.device)
    try:
        _check_world(options, world)
        reference = read_manifest(artifact).reference
        if options.efficient and reference.mode != "zero":
            raise UsageError(f"--efficient drops the reference, but this artifact's factors are an update to a "
                             f"{reference.mode} reference (dropping it would change the model)", str(artifact),
                             "resume without --efficient, or compress with --no-init for InRank-Efficient")
        config = model_config(artifact)
        folders = [artifact] + ([source_hint] if source_hint is not None and source_hint.is_dir() else [])
        tokenizer = load_tokenizer(folders, options.tokenizer)
        _check_tokenizer(tokenizer, config, options.tokenizer or str(artifact))
        block_size = _block_size(options, config)
        tokens, val = _load_data(run, options, tokenizer, block_size)  # bad text fails before anything is written
        _start_run(run, world)
        model = load_compressed(artifact, zero_as_lowrank=True)
        ranks = {name: layer.rank for name, layer in low_rank_layers(model)}
        controller = RankController(options.policy(), ranks)
        generator = torch.Generator().manual_seed(options.seed * 1_000_003)
        for name, layer in low_rank_layers(model):
            # Buffer columns: B zero, A random, so the function at step 0 is the artifact's.
            grow_layer(layer, controller.width_for(layer, ranks[name]), None, generator)
        embedded = None
        if reference.mode == "embedded":
            # The run keeps its own copy of the init: the temporary artifact of a dense resume goes away.
            embedded = run / "cache" / INIT_FILE
            if world.is_main:
                embedded.parent.mkdir(exist_ok=True)
                shutil.copyfile(artifact / INIT_FILE, embedded)
            barrier(world)
        session = Session(run, options, world, process_device(options.device, world), model, tokenizer, tokens,
                          block_size, reference, embedded_init=embedded, controller=controller, val_tokens=val)
        session.setup()
        session.save()  # step-0: where this run starts (compress RUN measures the resumed training from it)
        return run_loop(session, on_step)
    finally:
        if own_world:
            close_world(world)


def _resume_run(source: Path, run: Path | None, given: dict, on_step) -> TrainResult:
    """Continue a run folder from its last complete checkpoint, exactly."""
    checkpoint = latest_checkpoint(source)
    trainer_state, tensors = load_state(checkpoint)
    recorded = TrainOptions.from_json(trainer_state["options"])
    options = replace(recorded, **given)
    if options.efficient != recorded.efficient:
        trained = "InRank-Efficient" if recorded.efficient else f"{recorded.mode} without --efficient"
        raise MismatchError(f"the run was trained {trained}", str(checkpoint),
                            "drop --efficient: a run folder continues as it was trained")
    check_options(options)
    step = int(trainer_state["step"])
    if options.steps <= step:
        raise UsageError(f"the run is at step {step} already, and --steps {options.steps} asks for no more",
                         str(checkpoint), f"pass --steps larger than {step}")
    world = init_world(options.device)
    try:
        _check_world(options, world)
        config = model_config(checkpoint)
        recorded_config = trainer_state.get("config")
        if recorded_config is not None and _architecture(config.to_dict()) != _architecture(recorded_config):
            raise MismatchError("the checkpoint's config.json does not match the run's recorded config", str(checkpoint),
                                "restore the config.json the run was trained with")
        tokenizer = load_tokenizer(checkpoint, options.tokenizer)
        if tokenizer_fingerprint(tokenizer) != trainer_state.get("tokenizer"):
            raise MismatchError("this tokenizer is not the one the run was trained with",
                                options.tokenizer or str(checkpoint), "drop --tokenizer, or pass the run's own")
        block_size = _block_size(options, config)
        target = source
        tokens, val = _load_data(source, options, tokenizer, block_size)  # bad text fails before anything is written
        if run is not None and Path(run).absolute() != source.absolute():
            target = Path(run)
            _start_run(target, world, copy_from=(source, checkpoint))
        elif world.is_main:
            _writable_run(target)
        barrier(world)
        if trainer_state["mode"] == "inrank":
            model = load_compressed(checkpoint, zero_as_lowrank=True)
            controller = RankController.from_state_dict(trainer_state["rank_controller"])
            controller.policy = options.policy()
        else:
            model, controller = load_dense(checkpoint, config), None
        recorded_reference = trainer_state.get("reference")
        reference = None if recorded_reference is None else ReferenceRecord.from_json(recorded_reference)
        embedded = checkpoint / INIT_FILE if (checkpoint / INIT_FILE).is_file() else None
        if world.is_main:
            trim_metrics(target, step, source)
        barrier(world)
        session = Session(target, options, world, process_device(options.device, world), model, tokenizer, tokens,
                          block_size, reference, embedded_init=embedded, controller=controller, val_tokens=val)
        session.setup()
        session.restore(trainer_state, tensors)
        return run_loop(session, on_step)
    finally:
        close_world(world)


def _architecture(config: dict) -> dict:
    """The config keys that decide the weights (not bookkeeping such as versions or dtype)."""
    ignored = {"transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path", "use_cache"}
    normalized = json.loads(json.dumps(config))  # JSON turns int keys (id2label) into strings
    return {k: v for k, v in normalized.items() if k not in ignored}


def _copy_run(source: Path, checkpoint: Path, target: Path) -> None:
    """Fill ``target`` with a copy of the source run up to ``checkpoint`` (init and checkpoint)."""
    steps = run_steps(source)
    if steps and steps[0][1] != checkpoint:
        shutil.copytree(steps[0][1], target / steps[0][1].name)
    shutil.copytree(checkpoint, target / checkpoint.name)
