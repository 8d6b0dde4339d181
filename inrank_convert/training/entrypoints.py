"""Train a causal LM dense or with InRank (docs/design.md §9), and resume it exactly: the entry points.

One loop (training.loop) serves every start: ``train`` (from a config.json with a seed, or from a
model folder used as the init) and ``resume`` (from an artifact, from a dense checkpoint compressed
first, or from a run folder, continuing exactly where it stopped). In InRank mode every linear layer
is ``W = W_ref + B @ A`` (``W = B @ A`` with ``efficient``); the rank controller grows the factors
on its schedule, in optimizer steps. This module checks the inputs (all before anything is
written), builds the model and the session, and hands them to the loop.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from inrank_convert.artifact import INIT_FILE, ReferenceRecord, is_artifact, read_manifest
from inrank_convert.artifact.storage import NO_QUANTIZATION
from inrank_convert.compression.job import compress
from inrank_convert.compression.plan import PlanOptions
from inrank_convert.core.distributed import World, barrier, close_world, init_world, process_device
from inrank_convert.core.errors import CheckpointError, MismatchError, OutputError, UsageError, flag
from inrank_convert.core.hub import resolve_model
from inrank_convert.inputs.sources import is_run, open_checkpoint
from inrank_convert.inputs.text import (
    cached_tokens,
    check_block_fits,
    load_tokenizer,
    read_text,
    tokenizer_fingerprint,
)
from inrank_convert.linalg.criteria import DEFAULT_CRITERION, RankRule
from inrank_convert.model.architecture import meta_model, model_context, seeded_model
from inrank_convert.model.layers import RowsLowRankEmbedding, split_factors_in_place
from inrank_convert.runtime.modeling import load_compressed, load_dense, model_config
from inrank_convert.training.checkpoint import save_config, save_model_weights
from inrank_convert.training.loop import Session, run_loop
from inrank_convert.training.options import TrainOptions, TrainResult, check_options, check_rank_cut
from inrank_convert.training.rank_control import (
    RankController,
    check_initial_rank,
    factorize_model,
    grow_layer,
    low_rank_layers,
    orthogonalize_init,
)
from inrank_convert.training.warm_start import init_reference
from inrank_convert.weights.outputs import atomic_output_dir, check_output_free
from inrank_convert.weights.run_folder import (
    ensure_writable_run,
    has_training_checkpoint,
    latest_checkpoint,
    load_state,
    owned_run,
    read_init_recipe,
    run_cache,
    run_steps,
    start_run,
    step_folder,
    token_cache_dir,
    trim_metrics,
    write_init_recipe,
)

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
                            where, f"pass the {flag('--tokenizer')} the model was made for, or a config with a larger vocab_size")


def _block_size(options: TrainOptions, config) -> int:
    context = model_context(config)
    if options.block_size is None:
        return min(256, context or 256)
    if context is not None and options.block_size > context:
        raise MismatchError(f"{flag('--block-size')} {options.block_size} is longer than the model's context of {context} tokens",
                            flag("--block-size"), f"pass {flag('--block-size')} {context} or less")
    return options.block_size


# --- entry points ----------------------------------------------------------------------------

def _load_data(session_run: Path, options: TrainOptions, tokenizer, block_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    cache = token_cache_dir(session_run)
    tokens = cached_tokens(options.data, tokenizer, cache)
    check_block_fits(tokens, block_size, options.data)
    val = None
    if options.val_data:
        val = cached_tokens(options.val_data, tokenizer, cache)
        check_block_fits(val, block_size, options.val_data)
    return tokens, val


def _checked_start(run: Path, options: TrainOptions, tokenizer, config, where: str
                   ) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """What a new run checks before its folder is created: the tokenizer against the model, the block
    size, the text (tokenized: bad text fails here) and, for InRank, the initial rank. Returns
    (block size, training tokens, validation tokens or None)."""
    _check_tokenizer(tokenizer, config, where)
    block_size = _block_size(options, config)
    tokens, val = _load_data(run, options, tokenizer, block_size)
    if options.mode == "inrank":
        check_initial_rank(meta_model(config), options.factorize, options.initial_rank)
    return block_size, tokens, val


def _check_world(options: TrainOptions, world: World) -> None:
    if options.batch_size % (world.size * options.grad_accum):
        raise UsageError(f"{flag('--batch-size')} {options.batch_size} does not split over {world.size} processes x "
                         f"{flag('--grad-accum')} {options.grad_accum}", flag("--batch-size"),
                         f"pass a multiple of {world.size * options.grad_accum}")


def train(source: str | Path, run: str | Path, options: TrainOptions,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train from ``source`` (a config.json, or a model folder used as the init) into ``run``."""
    check_options(options)
    options = options.resolved(from_scratch=True)
    check_rank_cut(options)  # against the warm-up the recipe chose
    source = resolve_model(source)  # a hub id: its snapshot folder in the Hugging Face cache
    run = Path(run)
    world = init_world(options.device)
    try:
        with owned_run(run, world, (source, options.data, options.val_data, options.tokenizer)):
            _check_world(options, world)
            config, weights = _resolve_init(Path(source))
            tokenizer = load_tokenizer(weights or (Path(source) if Path(source).is_dir() else Path(source).parent),
                                       options.tokenizer)
            block_size, tokens, val = _checked_start(run, options, tokenizer, config, options.tokenizer or str(source))
            start_run(run, world)
            model = load_dense(weights, config) if weights is not None else seeded_model(config, options.seed)
            recipe = None if weights is not None else options.seed
            if options.orthogonal_init:
                orthogonalize_init(model, options.factorize, torch.Generator().manual_seed(options.seed * 1_000_003 + 7))
                recipe = None  # the seed no longer regenerates this init: step-0 holds it
            init_folder = step_folder(run, 0)
            if world.is_main:
                _save_init(model, tokenizer, init_folder, recipe)
            barrier(world)
            reference = controller = None
            if options.mode == "inrank" and options.dense_warmup is None:
                reference = init_reference(init_folder, options.efficient, recipe, model.state_dict())
                generator = torch.Generator().manual_seed(options.seed * 1_000_003)
                ranks = factorize_model(model, options.policy(), options.efficient, generator, options.factorize,
                                        options.initial_rank)
                controller = RankController(options.policy(), ranks)
            session = Session(run, options, world, process_device(options.device, world), model, tokenizer, tokens,
                              block_size, reference, controller=controller, val_tokens=val)
            session.setup()
            return run_loop(session, on_step)
    finally:
        close_world(world)


def _save_init(model: nn.Module, tokenizer, folder: Path, seed: int | None) -> None:
    with atomic_output_dir(folder) as temp:
        save_config(model, temp)
        save_model_weights(model, temp)
        tokenizer.save_pretrained(temp)
        if seed is not None:
            write_init_recipe(temp, seed)


def resume(source: str | Path, run: str | Path | None, overrides: dict, init: str | Path | None = None,
           init_seed: int | None = None, no_init: bool = False,
           on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Continue training from a run folder (exactly), an artifact, or a dense checkpoint.

    ``overrides`` are the options given on the command line (None values are ignored); a run
    folder's own options fill in the rest, otherwise the defaults do.
    """
    source = resolve_model(source)
    given = {k: v for k, v in overrides.items() if v is not None}
    if not source.exists():
        raise UsageError("no such run folder, artifact or checkpoint", str(source), "check the path")
    if is_run(source) or has_training_checkpoint(source):
        return _resume_run(source, Path(run) if run is not None else None, given, on_step)
    if run is None:
        raise UsageError("resuming from an artifact or a checkpoint needs a new run folder", str(source),
                         "pass -o RUN")
    options = replace(TrainOptions(mode="inrank"), **given)
    check_options(options)
    options = options.resolved(from_scratch=False)
    if options.mode != "inrank":
        raise UsageError("resume trains with InRank from an artifact or checkpoint", f"{flag('--mode')} dense",
                         "use 'train' with the model folder as the init for dense training")
    if is_artifact(source):
        if init is not None or init_seed is not None or no_init:
            raise UsageError(f"{flag('--init')}/{flag('--init-seed')}/{flag('--no-init')} apply to dense checkpoints; an artifact has its reference",
                             str(source), "drop the option")
        return _resume_artifact(source, Path(run), options, on_step)
    # The dense checkpoint is compressed as compress would: its default criterion unless one is named.
    rule = RankRule(given.get("criterion", DEFAULT_CRITERION), options.threshold)
    return _resume_dense(source, Path(run), options, rule, init, init_seed, no_init, on_step)


def _resume_dense(source: Path, run: Path, options: TrainOptions, rule: RankRule, init, init_seed, no_init,
                  on_step) -> TrainResult:
    """Compress the dense checkpoint (at ``rule``, into a temporary artifact), then resume from that
    artifact."""
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
        # The run is locked from here: the compression takes minutes, and no other writer may start it.
        with owned_run(run, world, (source, init, options.data, options.val_data, options.tokenizer)), \
                tempfile.TemporaryDirectory(prefix=".inrank-resume-", dir=_parent_for_temp(run)) as temp:
            artifact = Path(temp) / "artifact"
            if world.is_main:
                # Float factors: the run starts from them, and int8 rounding would only add noise.
                compress(source, artifact, init=init, init_seed=init_seed, no_init=no_init, embed_init=False,
                         options=PlanOptions(rule=rule, seed=options.seed, quantize=NO_QUANTIZATION))
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
        with owned_run(run, world, (artifact, source_hint, options.data, options.val_data, options.tokenizer)):
            _check_world(options, world)
            reference = read_manifest(artifact).reference
            if options.efficient and reference.mode != "zero":
                raise UsageError(f"{flag('--efficient')} drops the reference, but this artifact's factors are an update to a "
                                 f"{reference.mode} reference (dropping it would change the model)", str(artifact),
                                 f"resume without {flag('--efficient')}, or compress with {flag('--no-init')} for InRank-Efficient")
            config = model_config(artifact)
            folders = [artifact] + ([source_hint] if source_hint is not None and source_hint.is_dir() else [])
            tokenizer = load_tokenizer(folders, options.tokenizer)
            block_size, tokens, val = _checked_start(run, options, tokenizer, config, options.tokenizer or str(artifact))
            start_run(run, world)
            # Only the token embedding trains as rows: the rows rule (a row per token of the text, the rest
            # through the shared part) is about tokens. Another embedding stored as rows (GPT-2's wpe: rank 0
            # and the positions the threshold kept) would train only its stored rows, and a position whose
            # update was dropped could never learn again; it is small, so it trains dense.
            model = load_compressed(artifact, zero_as_lowrank=True,
                                    rows_as_factors="input" if options.embedding_training == "rows" else "none")
            embedding = model.get_input_embeddings()
            if isinstance(embedding, RowsLowRankEmbedding):
                # Every token the training text uses gets a trainable row of its own (zero where the
                # artifact stored none: the model is unchanged); the artifact's other rows stay fixed.
                embedding.train_rows_of(tokens[tokens < embedding.num_embeddings])
                embedding.split_for_adam()  # its shared part moves at the dense rate (see there)
            ranks = {name: layer.rank for name, layer in low_rank_layers(model)}
            controller = RankController(options.policy(), ranks)
            generator = torch.Generator().manual_seed(options.seed * 1_000_003)
            # Buffer columns that leave the function at step 0 the artifact's: --growth's when it keeps the
            # function (exact, lora), else exact; later growth follows --growth.
            first_growth = options.policy().growth if options.policy().growth in ("exact", "lora") else "exact"
            for name, layer in low_rank_layers(model):
                split_factors_in_place(layer, options.factor_split)  # before the buffer, as the switch does
                grow_layer(layer, controller.width_for(layer, ranks[name]), None, generator, first_growth)
            embedded = None
            if reference.mode == "embedded":
                # The run keeps its own copy of the init: the temporary artifact of a dense resume goes away.
                embedded = run_cache(run) / INIT_FILE
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
    options = replace(recorded, **given).resolved(from_scratch=False)
    if options.efficient != recorded.efficient:
        trained = "InRank-Efficient" if recorded.efficient else f"{recorded.mode} without {flag('--efficient')}"
        raise MismatchError(f"the run was trained {trained}", str(checkpoint),
                            f"drop {flag('--efficient')}: a run folder continues as it was trained")
    check_options(options)
    step = int(trainer_state["step"])
    if options.steps <= step:
        raise UsageError(f"the run is at step {step} already, and {flag('--steps')} {options.steps} asks for no more",
                         str(checkpoint), f"pass {flag('--steps')} larger than {step}")
    world = init_world(options.device)
    try:
        in_place = run is None or Path(run).absolute() == source.absolute()
        texts = (options.data, options.val_data, options.tokenizer)
        with owned_run(source if in_place else Path(run), world, texts if in_place else (source, *texts)):
            _check_world(options, world)
            config = model_config(checkpoint)
            recorded_config = trainer_state.get("config")
            if recorded_config is not None and _architecture(config.to_dict()) != _architecture(recorded_config):
                raise MismatchError("the checkpoint's config.json does not match the run's recorded config", str(checkpoint),
                                    "restore the config.json the run was trained with")
            tokenizer = load_tokenizer(checkpoint, options.tokenizer)
            if tokenizer_fingerprint(tokenizer) != trainer_state.get("tokenizer"):
                raise MismatchError("this tokenizer is not the one the run was trained with",
                                    options.tokenizer or str(checkpoint), f"drop {flag('--tokenizer')}, or pass the run's own")
            block_size = _block_size(options, config)
            target = source
            tokens, val = _load_data(source, options, tokenizer, block_size)  # bad text fails before anything is written
            if run is not None and Path(run).absolute() != source.absolute():
                target = Path(run)
                start_run(target, world, copy_from=(source, checkpoint))
            elif world.is_main:
                ensure_writable_run(target)
            barrier(world)
            if trainer_state["mode"] == "inrank":
                # A checkpoint stores an embedding in the form it trained in: rows and factors, or dense.
                model = load_compressed(checkpoint, zero_as_lowrank=True, rows_as_factors="all")
                embedding = model.get_input_embeddings()
                if isinstance(embedding, RowsLowRankEmbedding) and trainer_state.get("rows_trained") == "text":
                    embedding.train_rows_of(tokens[tokens < embedding.num_embeddings])  # as the run trained them
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
