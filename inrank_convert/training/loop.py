"""The training loop (docs/design.md §9): the session it runs on, one optimizer step, and the actions a
step may be due for (a rank decision, evaluation, a metrics record, a checkpoint, a stop).

Every start (train, resume from an artifact, a dense checkpoint or a run folder) ends here with a
ready ``Session``, so there is one loop, and an exact resume only has to restore the session.
The order of work within a step is part of the contract: the RNG draws, the collectives and the
metrics records must come in the same order in every process and in a resumed run.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from inrank_convert.artifact import ReferenceRecord, RuleRecord
from inrank_convert.core.distributed import World, any_true, barrier, broadcast_object, gather_objects, mean
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.core.tensors import COMPUTE_DTYPES
from inrank_convert.inputs.text import TokenBatches, tokenizer_fingerprint, validation_blocks
from inrank_convert.linalg.criteria import RankRule
from inrank_convert.training.checkpoint import (
    RNG_PREFIX,
    load_optimizer_tensors,
    optimizer_tensors,
    save_checkpoint,
)
from inrank_convert.training.metrics import MetricsLog, metrics_record
from inrank_convert.training.optimizer import (
    adopt_state,
    apply_frobenius_decay,
    build_optimizer,
    factor_learning_rate,
    is_factor,
    set_learning_rate,
)
from inrank_convert.training.options import TrainOptions, TrainResult, learning_rate
from inrank_convert.training.rank_control import RankController, grow_layer, low_rank_layers, resplit_layer
from inrank_convert.training.warm_start import switch_to_low_rank
from inrank_convert.weights.run_folder import step_folder, training_checkpoints

# --- the session: model, optimizer, data, rank control ----------------------------------------

@dataclass
class Session:
    """What a run holds while it trains: the model (and its DDP wrap), optimizer, data and rank
    controller, and the step they are at. ``save`` and ``restore`` make a resume exact."""

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
        self.optimizer = self.new_optimizer()
        self.batches = TokenBatches(self.tokens, self.block_size, opts.batch_size, opts.seed)
        torch.manual_seed(opts.seed * 7919 + 1 + self.world.rank)  # dropout: different in each process
        self.wrap()

    def new_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over what trains: everything, or with --freeze-dense only the factors (a dense
        warm-up trains everything until its switch)."""
        opts = self.options
        if opts.freeze_dense and self.controller is not None:
            for name, param in self.model.named_parameters():
                param.requires_grad_(is_factor(name))
        return build_optimizer(self.model, opts.lr, opts.weight_decay, opts.factor_decay, opts.factor_lr_scale)

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
        if self.controller is not None:
            tensors.update(self.controller.state_tensors())
        tensors[RNG_PREFIX + "data"] = self.batches.state()
        for rank, state in enumerate(gather_objects(torch.get_rng_state(), self.world)):
            tensors[f"{RNG_PREFIX}torch.{rank}"] = state
        if self.device.type == "cuda":
            for rank, state in enumerate(gather_objects(torch.cuda.get_rng_state(self.device), self.world)):
                tensors[f"{RNG_PREFIX}cuda.{rank}"] = state
        return tensors

    def restore(self, trainer_state: dict, tensors: dict[str, torch.Tensor]) -> None:
        load_optimizer_tensors(self.model, self.optimizer, tensors)
        if self.controller is not None:
            self.controller.load_tensors(tensors)
        self.batches.load_state(tensors[RNG_PREFIX + "data"])
        rank_key = f"{RNG_PREFIX}torch.{self.world.rank}"
        if rank_key in tensors:
            torch.set_rng_state(tensors[rank_key])
        cuda_key = f"{RNG_PREFIX}cuda.{self.world.rank}"
        if self.device.type == "cuda" and cuda_key in tensors:
            torch.cuda.set_rng_state(tensors[cuda_key], self.device)
        self.step = int(trainer_state["step"])

    def trainer_state(self) -> dict:
        # "mode" is how this checkpoint's model is stored: dense until a --dense-warmup switches.
        mode = "dense" if self.controller is None else self.options.mode
        return {"step": self.step, "mode": mode, "efficient": self.options.efficient,
                "options": self.options.to_json(), "world_size": self.world.size,
                "tokenizer": tokenizer_fingerprint(self.tokenizer),
                "config": self.model.config.to_dict(), "reference": None if self.reference is None else self.reference.to_json(),
                "rank_controller": self.controller.state_dict() if self.controller else None,
                "trainable_parameters": self.trainable_parameters(),
                # Which rows of a lowrank+rows embedding train, so that a resume trains the same ones.
                "rows_trained": getattr(self.model.get_input_embeddings(), "rows_trained", None)}

    def trainable_parameters(self) -> int:
        """The numbers the optimizer trains now (tied tensors once)."""
        return sum(param.numel() for param in self.model.parameters() if param.requires_grad)

    def save(self) -> Path:
        tensors = self.state_tensors()  # a collective: every process takes part
        folder = step_folder(self.run, self.step)
        if self.world.is_main:
            rule = RuleRecord(self.options.criterion, self.options.threshold)
            save_checkpoint(self.run, self.step, self.model, self.tokenizer, self.reference, rule,
                            self.trainer_state(), tensors, self.embedded_init)
        barrier(self.world)
        return folder


# --- forward passes and rank decisions -------------------------------------------------------

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


def decide_ranks(session: Session) -> None:
    """One rank decision: made on rank 0, applied identically everywhere."""
    growth = session.controller.decide(session.model) if session.world.is_main else None
    growth, ranks = broadcast_object((growth, dict(session.controller.ranks)), session.world)
    session.controller.ranks = ranks
    if not growth:
        return
    generator = torch.Generator().manual_seed(session.options.seed * 1_000_003 + session.step)
    layers = dict(low_rank_layers(session.model))
    policy = session.controller.policy
    for name in sorted(growth):
        if policy.on_growth == "resplit":
            # Balanced factors of the same product, and no state: the moments of the old basis
            # mean nothing in the new one, and new columns start from zero moments like the rest.
            resplit_layer(layers[name], session.optimizer)
        grow_layer(layers[name], growth[name], session.optimizer, generator, policy.growth,
                   policy.layer_max_rank(layers[name]))
        session.controller.remember(name, layers[name])
    session.wrap()


def enter_low_rank(session: Session) -> None:
    """The end of a --dense-warmup: the factorized layers' updates cut to their ranks (as compress
    would), a rank controller from there, the reference of the run's init, and a rebuilt optimizer
    (the dense parameters keep their moments, the factors start fresh). Deterministic, so every
    process does it alike."""
    opts = session.options
    init_folder = step_folder(session.run, 0)
    generator = torch.Generator().manual_seed(opts.seed * 1_000_003 + session.step)
    session.controller, session.reference = switch_to_low_rank(
        session.model, init_folder, opts.efficient, opts.policy(), RankRule(opts.criterion, opts.threshold),
        opts.factorize, generator, opts.factor_split)
    session.model.to(session.device)
    previous = session.optimizer
    session.optimizer = session.new_optimizer()
    adopt_state(session.optimizer, previous)
    session.wrap()


def enter_stage_two(session: Session) -> None:
    """InRank-Efficient's stage 2 (--stage2-at): every layer's factors re-split by SVD (the function
    unchanged, numerically-zero components dropped), and no rank decision after this step. The
    controller's ranks become the kept widths. Deterministic, so every process does it alike."""
    layers = dict(low_rank_layers(session.model))
    for name in sorted(layers):
        session.controller.ranks[name] = resplit_layer(layers[name], session.optimizer)
    session.wrap()


def cut_ranks(session: Session) -> None:
    """--rank-cut R from --rank-cut-at on: every layer ranked above R keeps the best R + buffer
    components of B @ A (fresh moments, as at stage 2) and no rank grows past R. Runs at every step
    from the cut on and cuts only what is above R, so a run resumed after the cut holds it too."""
    cut = session.options.rank_cut
    session.controller.policy.max_rank = cut
    above = sorted(name for name, rank in session.controller.ranks.items() if rank > cut)
    if not above:  # every step after the cut: nothing to walk
        return
    layers = dict(low_rank_layers(session.model))
    for name in above:
        resplit_layer(layers[name], session.optimizer, session.controller.width_for(layers[name], cut))
        session.controller.ranks[name] = cut
        session.controller.remember(name, layers[name])
    session.wrap()


# --- one step --------------------------------------------------------------------------------

def optimizer_step(session: Session, scaler: torch.amp.GradScaler | None) -> float:
    """One optimizer step on the next global batch: forward and backward over the micro-batches,
    clipping, AdamW at this step's learning rate. Returns the loss, averaged over the processes."""
    opts = session.options
    total = _accumulate_gradients(session, scaler)
    session.step += 1
    set_learning_rate(session.optimizer, learning_rate(opts, session.step))
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
    if opts.factor_decay == "frobenius":
        apply_frobenius_decay(session.model, factor_learning_rate(session.optimizer), opts.weight_decay)
    loss = float(mean(total / opts.grad_accum, session.world))
    if not math.isfinite(loss):
        saved = training_checkpoints(session.run)
        fix = f"lower {flag('--lr')}, or use {flag('--dtype')} float32"
        if saved:  # the run keeps what it saved: say how to go on from there
            fix += (f"; the run keeps step-{max(saved)}: continue it with 'inrank-convert resume {session.run} "
                    f"--lr {opts.lr / 10:g}'")
        raise UsageError(f"the loss became {loss} at step {session.step}", f"{flag('--lr')} {opts.lr}", fix)
    return loss


def _accumulate_gradients(session: Session, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """Backward over this process's share of the batch, in --grad-accum micro-batches; gradients are
    synchronized across processes on the last one only. Returns the sum of the micro-batch losses."""
    opts, world = session.options, session.world
    per_process = opts.batch_size // world.size
    micro = per_process // opts.grad_accum
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
    return total


# --- what a step is due for ------------------------------------------------------------------

@dataclass(frozen=True)
class Due:
    """The actions after an optimizer step, decided once (identically in every process)."""

    final: bool
    save: bool
    evaluate: bool
    stop: bool  # a stop was requested in some process
    log: bool


def due_actions(session: Session, stop_requested: bool) -> Due:
    opts, step = session.options, session.step
    final = step == opts.steps
    save = final or (opts.save_every is not None and step % opts.save_every == 0)
    eval_every = opts.eval_every
    evaluate = session.val_tokens is not None and (
        final or (eval_every is not None and step % eval_every == 0) or (eval_every is None and save))
    stop = any_true(stop_requested, session.world, session.device)  # a collective: all processes stop together
    log = step % opts.log_every == 0 or step == 1 or final or evaluate or stop
    return Due(final, save, evaluate, stop, log)


# --- the loop --------------------------------------------------------------------------------

def run_loop(session: Session, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``session`` up to --steps; a stop request (SIGINT, SIGTERM) saves a checkpoint and ends early."""
    opts = session.options
    start_step, started = session.step, time.perf_counter()
    scaler = torch.amp.GradScaler("cuda") if opts.dtype == "float16" else None
    log = MetricsLog(session, on_step)
    checkpoints: list[Path] = []
    loss = val_loss = None
    interrupted = False
    try:
        with _stop_requests() as stop:
            while session.step < opts.steps:
                loss = optimizer_step(session, scaler)
                switched = opts.mode == "inrank" and session.controller is None and opts.dense_warmup == session.step
                if switched:
                    enter_low_rank(session)
                if session.controller is not None and opts.rank_cut_at is not None and session.step >= opts.rank_cut_at:
                    cut_ranks(session)
                if session.controller is not None and not switched and session.controller.policy.due(session.step):
                    decide_ranks(session)
                if session.controller is not None and session.controller.policy.stage2_at == session.step:
                    enter_stage_two(session)
                log.steps += 1
                due = due_actions(session, stop["stop"])
                if due.evaluate:
                    val_loss = validation_loss(session)
                if due.log:
                    evaluated = val_loss if due.evaluate else None
                    log.write(metrics_record(session, loss, evaluated, log.tokens_per_second()))
                if due.save or due.stop:
                    checkpoints.append(session.save())
                if due.stop and not due.final:
                    interrupted = True
                    break
    finally:
        log.close()
    seconds = time.perf_counter() - started
    done = session.step - start_step
    return TrainResult(session.run, start_step, session.step, loss, val_loss, checkpoints, interrupted,
                       dict(session.controller.ranks) if session.controller else {}, seconds,
                       log.tokens_per_step * done / seconds if seconds > 0 else 0.0, session.world.rank,
                       session.trainable_parameters())
