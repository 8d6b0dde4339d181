"""The compress job: options checked, inputs opened and planned, calibrated when asked, and the plan
executed into an artifact folder (temp folder, then rename).

``compress`` is the whole job; ``inputs.sources.open_inputs``, ``plan_compression`` and
``execution.iter_compress`` are its steps, public so that ``--dry-run``, ``spectrum`` and training
can reuse them. Reading an update is ``updates``'; a size target's allocation is ``targets``'.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from inrank_convert.artifact import (
    ArtifactWriter,
    RecordingWriter,
    RuleRecord,
    SourceRecord,
)
from inrank_convert.artifact.bands import Bands
from inrank_convert.artifact.manifest import creation_time
from inrank_convert.artifact.storage import QUANTIZE_CHOICES, QUANTIZE_SCHEMES
from inrank_convert.compression.calibrate_checkpoint import calibrate_checkpoint, distill_checkpoint
from inrank_convert.compression.calibration import DEFAULT_CALIBRATION_TOKENS, CalibrationStats
from inrank_convert.compression.distill import DistillRecord, check_distill_options, longest_record
from inrank_convert.compression.execution import iter_compress
from inrank_convert.compression.plan import Plan, PlanOptions, make_plan
from inrank_convert.compression.results import CompressResult, LayerResult
from inrank_convert.compression.targets import (
    Assigned,
    Spectra,
    allocate_target,
    budget_ratio,
    check_target,
    chosen_bands,
    header_bound,
    measure_spectra,
    target_bytes,
)
from inrank_convert.core.distributed import check_device
from inrank_convert.core.errors import CheckpointError, UsageError, flag
from inrank_convert.core.tensors import dtype_name
from inrank_convert.inputs.sources import Inputs, open_inputs
from inrank_convert.linalg.criteria import CRITERIA
from inrank_convert.linalg.factorize import ENGINES
from inrank_convert.linalg.forms import BREAKEVEN_MARK
from inrank_convert.linalg.whitening import DEFAULT_DAMPING
from inrank_convert.model.architecture import check_seed, config_from_dict
from inrank_convert.runtime.modeling import model_misfit
from inrank_convert.weights.checkpoints import Checkpoint
from inrank_convert.weights.hash_cache import usable_cores
from inrank_convert.weights.outputs import claimed_output


def check_options(options: PlanOptions) -> None:
    """Reject option values that cannot work, before any input is opened."""
    creation_time()  # a malformed $SOURCE_DATE_EPOCH fails here, not after the work
    rule = options.rule
    if rule.fixed_rank is not None and rule.fixed_rank < 1:
        # Rank 0 would store every changed tensor as "unchanged" and fail its own verify.
        raise UsageError(f"rank must be 1 or more, got {rule.fixed_rank}", flag("--rank"),
                         f"pass {flag('--rank')} 1 or more; {flag('--exclude')} keeps a tensor as it is")
    check_seed(options.seed, "--seed")
    if not (0.0 < rule.threshold <= 1.0):
        raise UsageError(f"threshold must be in (0, 1], got {rule.threshold:g}", flag("--threshold"),
                         f"e.g. {flag('--threshold')} 0.9 keeps 90% of each update's energy")
    if rule.criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {rule.criterion!r}", flag("--criterion"), f"choose one of {', '.join(CRITERIA)}")
    if options.engine not in ENGINES:
        raise UsageError(f"unknown SVD engine {options.engine!r}", flag("--svd"), f"choose one of {', '.join(ENGINES)}")
    if options.engine == "randomized" and rule.criterion == "inrank" and rule.fixed_rank is None:
        raise UsageError("the inrank criterion needs the full spectrum, which the randomized SVD does not compute",
                         f"{flag('--svd')} randomized {flag('--criterion')} inrank", f"use {flag('--svd')} exact or auto, or {flag('--criterion')} energy")
    if options.quantize is not None and options.quantize not in QUANTIZE_CHOICES:
        raise UsageError(f"unknown quantization scheme {options.quantize!r}", flag("--quantize"),
                         f"choose one of {', '.join(QUANTIZE_CHOICES)}")
    if options.quantize in QUANTIZE_SCHEMES and options.lossless:
        raise UsageError(f"{flag('--quantize')} {options.quantize} rounds the factors, but {flag('--threshold')} 1.0 asks "
                         "for an exact artifact", flag("--quantize"),
                         f"drop {flag('--quantize')}, or lower {flag('--threshold')} (e.g. 0.99)")
    if options.quantize in QUANTIZE_SCHEMES and options.factor_dtype is not None:
        raise UsageError(f"{flag('--quantize')} and {flag('--dtype')} both set how factors are stored", flag("--dtype"),
                         "pass only one of them")
    if options.target_ratio is not None and options.target_size is not None:
        raise UsageError(f"{flag('--target-ratio')} and {flag('--target-size')} both set the artifact's size",
                         flag("--target-size"), "pass only one of them")
    if options.target_ratio is not None and not (0.0 < options.target_ratio <= 1.0):
        raise UsageError(f"target ratio must be in (0, 1], got {options.target_ratio:g}", flag("--target-ratio"),
                         f"e.g. {flag('--target-ratio')} 0.1 keeps the artifact within 10% of the dense bytes")
    if options.target_size is not None and options.target_size <= 0:
        raise UsageError(f"target size must be a positive number of bytes, got {options.target_size}",
                         flag("--target-size"), f"e.g. {flag('--target-size')} 50000000")
    if options.has_target and rule.fixed_rank is not None:
        which = "--target-ratio" if options.target_ratio is not None else "--target-size"
        raise UsageError(f"{flag(which)} allocates the ranks, but {flag('--rank')} fixes them", flag("--rank"),
                         "pass only one of them")
    check_device(options.device)


def check_config_fits(trained: Checkpoint) -> None:
    """The config.json beside the trained weights is copied into the artifact, and every reader
    builds the model from it: refuse one that is not JSON, or whose model the weights do not fit
    (a wrong size, another architecture), now rather than in the first verify. A config of a model
    type transformers does not know is copied as it is (no model to check against)."""
    config = trained.config()  # unparsable JSON: CheckpointError naming the file
    if config is None:
        return
    where = str(trained.config_dir / "config.json")
    fix = "fix config.json beside the trained weights (it must describe this very model), or remove it"
    try:
        model_config = config_from_dict(config)
        if model_config is None:
            return
        problem = model_misfit(model_config, {name: info.shape for name, info in trained.infos().items()})
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # transformers refuses the values
        raise CheckpointError(f"config.json describes no model transformers can build ({str(err).splitlines()[0]})",
                              where, fix) from err
    if problem is not None:
        raise CheckpointError(f"config.json does not describe the trained weights: {problem}", where, fix)


def plan_compression(inputs: Inputs, options: PlanOptions) -> Plan:
    return make_plan(inputs.trained, inputs.reference, options, inputs.reference.aliases())


@dataclass(frozen=True)
class CalibrationRequest:
    """``--calibrate TEXT``: the text, how many of its tokens, the tokenizer (default: the model's)
    and ``--distill-scales N``'s steps (None: no distillation)."""

    text: Path
    tokens: int = DEFAULT_CALIBRATION_TOKENS
    tokenizer: Path | None = None
    distill_steps: int | None = None


def check_target_options(options: PlanOptions, embed_init: bool, calibration: CalibrationRequest | None,
                         searched: bool = False) -> None:
    """Options that only a size target (or a perplexity target, ``searched``) makes sense with."""
    which = "--max-perplexity-increase" if searched else \
        "--target-ratio" if options.target_ratio is not None else "--target-size"
    if (options.has_target or searched) and embed_init:
        raise UsageError(f"{flag('--embed-init')} stores every factorized tensor's init whole, so {flag(which)} "
                         "could not shrink the artifact", flag("--embed-init"),
                         f"drop {flag('--embed-init')} (pass {flag('--init')} or {flag('--init-seed')})")
    if options.quantize == "mixed" and not (options.has_target or searched):
        raise UsageError(f"{flag('--quantize')} mixed lets a size budget choose each component's bits, but no "
                         "target was given", flag("--quantize"),
                         f"add {flag('--target-ratio')} F, {flag('--target-size')} BYTES or "
                         f"{flag('--max-perplexity-increase')} P, or pick {flag('--quantize')} int4")
    if calibration is not None and calibration.distill_steps is not None:
        check_distill_options(options, calibration.distill_steps, searched)
    if calibration is not None and not (options.has_target or searched):
        # A whitened spectrum is far more concentrated than the plain one: a per-tensor energy
        # threshold on it keeps far too few ranks (+44% perplexity at t = 0.9, measured on a 4x128 GPT-2).
        raise UsageError(f"{flag('--calibrate')} needs a size or perplexity target: an energy threshold means "
                         "something else on a whitened spectrum", flag("--calibrate"),
                         f"add {flag('--target-ratio')} F, {flag('--target-size')} BYTES or "
                         f"{flag('--max-perplexity-increase')} P")


class CompressionJob:
    """One compress, opened: its inputs and plan, the calibration statistics (``--calibrate``, or
    ``stats`` already collected on the same source) and,
    for a size target, the spectra (read once, on first use). ``write`` executes the plan into an
    artifact folder, at a byte target or by the rank rule; it can be called again at another
    target without reading any update for the spectra again (the perplexity target's search)."""

    def __init__(self, source: str | Path, *, init: str | Path | None = None, init_seed: int | None = None,
                 no_init: bool = False, embed_init: bool = False, options: PlanOptions | None = None,
                 calibration: CalibrationRequest | None = None, on_plan: Callable[[Plan], None] | None = None,
                 on_stage: Callable[[str], None] | None = None, stats: CalibrationStats | None = None):
        self.source = source
        self.options = options or PlanOptions()
        self.inputs = open_inputs(source, init, init_seed, no_init, embed_init)
        self._on_stage = on_stage
        self._spectra: Spectra | None = None
        self.calibration_seconds = 0.0
        self.calibration = calibration
        self.distill: DistillRecord | None = None  # --distill-scales: what the last write's distillation did
        # The source's and the reference's hashes, each job on its own thread (a checkpoint's
        # shards on more): a full read of each file the hash cache does not remember.
        self._hasher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="inrank-hash")
        try:
            check_config_fits(self.inputs.trained)
            self.plan = plan_compression(self.inputs, self.options)
            if on_plan is not None:
                on_plan(self.plan)
            self._source_hashes = self._hasher.submit(self.inputs.trained.file_hashes)
            self._reference_record = self._hasher.submit(self.inputs.reference.record)
            if self._hash_first():
                self._source_hashes.result()
                self._reference_record.result()
            self.stats: CalibrationStats | None = stats  # given: another job's calibration of the same source
            if calibration is not None and stats is None:
                self._stage("calibrating")
                started = time.perf_counter()
                names = {entry.name for entry in self.plan.entries if entry.action == "factorize"}
                self.stats = calibrate_checkpoint(self.inputs, calibration.text, names, max_tokens=calibration.tokens,
                                                  tokenizer=calibration.tokenizer, device=self.options.device)
                self.calibration_seconds = time.perf_counter() - started
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> CompressionJob:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._hasher.shutdown(wait=True, cancel_futures=True)
        self.inputs.close()

    def _hash_first(self) -> bool:
        """Whether to wait for the hashes before any torch work, rather than run them beside it.

        Beside it they are free where torch leaves a core idle (one thread per process: torchrun,
        OMP_NUM_THREADS=1). Where torch uses every core, a hash thread beside its threads stalls
        them (GPT-2 small's pair on 2 cores: 1.8-2.2 s against 0.93 s with nothing to hash), and
        giving torch one thread fewer while hashing made a tensor's bits depend on when the hashes
        finished (torch's kernels round differently with another thread count): so the files are
        hashed first, in parallel, and the compress itself runs at torch's thread count throughout
        (same bits on every run)."""
        # Files the hash cache remembers make the wait a few stats.
        return self.options.device.startswith("cpu") and torch.get_num_threads() >= usable_cores()

    def _stage(self, label: str) -> None:
        if self._on_stage is not None:
            self._on_stage(label)

    def spectra(self) -> Spectra:
        if self._spectra is None:
            self._stage("measuring spectra")
            self._spectra = measure_spectra(self.plan, self.inputs, self.options, self.stats)
        return self._spectra

    @property
    def distill_steps(self) -> int:
        return 0 if self.calibration is None else self.calibration.distill_steps or 0

    def calibration_record(self) -> dict | None:
        """The manifest's ``calibration``; with --distill-scales its ``distill``: the last write's,
        or (before one, for the header's bound) a record as long as any can be."""
        if self.stats is None:
            return None
        record = {**self.stats.to_json(), "damping": DEFAULT_DAMPING}
        if self.distill is not None:
            record["distill"] = self.distill.to_json()
        elif self.distill_steps:
            record["distill"] = longest_record(self.distill_steps, self.calibration.tokens, len(self.plan.entries))
        return record

    def default_target(self) -> int | None:
        """The byte target --target-ratio / --target-size ask for (None: the rank rule)."""
        return target_bytes(self.options, self.plan) if self.options.has_target else None

    def header(self, target: int, perplexity_target: dict | None = None,
               bands: dict[str, Bands | None] | None = None) -> int:
        """The bound on the artifact file's header at ``target`` (see targets.header_bound)."""
        return header_bound(self.plan, self.options, self._finish_arguments(target, perplexity_target), target,
                            bands, () if self.stats is None else self.stats.grams.keys())

    def allocate(self, target: int, perplexity_target: dict | None = None) -> dict[str, Assigned]:
        """What each factorized tensor gets at ``target`` bytes. Under mixed storage the header bound
        of any bands (four band tensors a tensor) is loose by about 2% of a 3% artifact, so the
        allocation is made again under the bound of the bands it chose, and kept if those of the
        new one fit that bound too."""
        spectra = self.spectra()
        header = self.header(target, perplexity_target)
        check_target(spectra, self.plan, self.options, target, header)
        budget = allocate_target(spectra, target, header)
        if not spectra.mixed:
            return budget
        chosen = self.header(target, perplexity_target, chosen_bands(budget))
        tighter = allocate_target(spectra, target, chosen)
        if self.header(target, perplexity_target, chosen_bands(tighter)) <= chosen:
            return tighter
        return budget

    def minimum_bytes(self, perplexity_target: dict | None = None) -> int:
        """The least target any allocation meets (the tensors kept whole, the least of the others, the header)."""
        target = self.plan.original_bytes
        return self.spectra().minimum(self.header(target, perplexity_target))

    def _finish_arguments(self, target: int | None, perplexity_target: dict | None = None) -> dict:
        options, plan, inputs, trained = self.options, self.plan, self.inputs, self.inputs.trained
        rule = options.rule
        rule_record = RuleRecord(rule.criterion, rule.threshold, rule.fixed_rank) if target is None \
            else RuleRecord("budget", budget_ratio(target, plan), None, target)
        hashes, reference = self._source_hashes.result(), self._reference_record.result()
        return dict(
            source=SourceRecord(str(Path(trained.path).resolve()), trained.kind,
                                str(inputs.run_folder.resolve()) if inputs.run_folder else None, hashes),
            reference=reference, rule=rule_record, original_bytes=plan.original_bytes,
            svd={"engine": options.engine, "device": options.device, "float64": options.float64, "seed": options.seed},
            factor_dtype=dtype_name(options.factor_dtype) if options.factor_dtype else None,
            embeddings=options.embeddings, include=list(options.include), exclude=list(options.exclude),
            calibration=self.calibration_record(), perplexity_target=perplexity_target)

    def _store(self, writer: ArtifactWriter, budget: dict[str, Assigned] | None,
               on_layer: Callable[[LayerResult], None] | None) -> list[LayerResult]:
        """The plan's tensors stored into ``writer``; with --distill-scales, recorded first, their
        scales distilled, then written (nothing reaches the folder before the scales are final)."""
        recorder = RecordingWriter() if self.distill_steps else writer
        layers: list[LayerResult] = []
        for layer in self.execute(recorder, budget):
            layers.append(layer)
            if on_layer is not None:
                on_layer(layer)
        if recorder is not writer:
            recorded = recorder.take()
            self._stage("distilling scales")
            request = self.calibration
            self.distill = distill_checkpoint(self.inputs, request.text, recorded, steps=request.distill_steps,
                                              max_tokens=request.tokens, tokenizer=request.tokenizer,
                                              device=self.options.device, stats=self.stats)
            for item in recorded:  # the entries are the layers' own: a kept distillation's errors show there too
                writer.add_stored(item, self.inputs.trained.get, self.inputs.reference.get)
        return layers

    def execute(self, writer: ArtifactWriter, budget: dict[str, Assigned] | None) -> Iterator[LayerResult]:
        """The plan's tensors stored into ``writer`` in plan order, here in this process (under
        torchrun, compression.torchrun shares them out over the processes instead)."""
        return iter_compress(self.plan, self.inputs, self.options, writer, budget, self.stats)

    def write(self, output: str | Path, target: int | None = None, *, force: bool = False,
              on_layer: Callable[[LayerResult], None] | None = None,
              perplexity_target: dict | None = None) -> CompressResult:
        """Execute the plan into the artifact folder ``output`` (temp folder, then rename), at most
        ``target`` bytes (allocated from the spectra) or by the rank rule when ``target`` is None.
        ``perplexity_target`` is the record that --max-perplexity-increase will fill in (its
        longest form bounds the header)."""
        started = time.perf_counter()
        plan, inputs = self.plan, self.inputs
        budget = None
        if target is not None:
            budget = self.allocate(target, perplexity_target)
        # Background spooling: the factors and the source's tensors are never changed once added.
        with ArtifactWriter(output, force=force, inputs=inputs.paths, embed_reference=inputs.embed_init,
                            background=True) as writer:
            layers = self._store(writer, budget, on_layer)
            for entry in plan.entries:
                if entry.action == "alias":
                    writer.add_alias(entry.name, entry.alias_of, shape=entry.shape, dtype=entry.dtype)
            arguments = self._finish_arguments(target, perplexity_target)
            # Keep the source's tensor order, so a decompressed checkpoint lists names as the original did.
            manifest = writer.finish(order=[entry.name for entry in plan.entries], **arguments)
            writer.copy_side_files(inputs.trained.config_dir)
        notes = sorted({note for layer in layers for note in layer.notes
                        if "float64" in note or "Cholesky" in note or "eigendecomposition" in note})
        # A rank the rule needs near (or past) the dense break-even: a noise-like update, said per tensor.
        notes += [f"{layer.name}: {note}" for layer in layers for note in layer.notes if note.startswith(BREAKEVEN_MARK)]
        return CompressResult(Path(output), str(self.source), manifest.reference.mode, arguments["rule"].describe(),
                              layers, plan.tied, plan.original_bytes, writer.bytes,
                              time.perf_counter() - started + self.calibration_seconds, notes, manifest)


def compress(source: str | Path, output: str | Path, *, init: str | Path | None = None, init_seed: int | None = None,
             no_init: bool = False, embed_init: bool = False, options: PlanOptions | None = None,
             force: bool = False, calibration: CalibrationRequest | None = None,
             on_plan: Callable[[Plan], None] | None = None,
             on_layer: Callable[[LayerResult], None] | None = None,
             on_stage: Callable[[str], None] | None = None) -> CompressResult:
    """Compress ``source`` into the artifact folder ``output``.

    Everything is written into a temporary folder that is renamed into place at the end, so a
    failure or a kill leaves no output that looks valid; inputs are only ever read.
    """
    options = options or PlanOptions()
    check_options(options)
    check_target_options(options, embed_init, calibration)
    # Where the output goes is checked, and it is locked, before any expensive input work.
    with claimed_output(Path(output), force, (source, init)):
        with CompressionJob(source, init=init, init_seed=init_seed, no_init=no_init, embed_init=embed_init,
                            options=options, calibration=calibration, on_plan=on_plan, on_stage=on_stage) as job:
            return job.write(output, job.default_target(), force=force, on_layer=on_layer)
