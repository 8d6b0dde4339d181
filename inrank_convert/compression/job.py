"""Execute a plan: stream tensors one at a time, factorize each update, write the artifact.

``compress`` is the whole job; ``sources.open_inputs``, ``plan_compression`` and ``iter_compress``
are its steps, public so that ``--dry-run``, ``spectrum`` and training can reuse them. Reading an
update is updates.py's; a size target's allocation is targets.py's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from inrank_convert.artifact import (
    ArtifactWriter,
    Manifest,
    RuleRecord,
    SourceRecord,
    TensorEntry,
    TensorKind,
)
from inrank_convert.artifact.storage import QUANTIZE_SCHEMES, encode_factors, round_trip
from inrank_convert.compression.calibrate_checkpoint import calibrate_checkpoint
from inrank_convert.compression.calibration import DEFAULT_CALIBRATION_TOKENS, CalibrationStats
from inrank_convert.compression.plan import Plan, PlanOptions, TensorPlan, costs_for, make_plan, storage_for
from inrank_convert.compression.targets import (
    Assigned,
    Spectra,
    allocate_target,
    budget_ratio,
    check_target,
    header_bound,
    measure_spectra,
    target_bytes,
)
from inrank_convert.compression.updates import (
    check_finite_fast,
    load_update,
    planned_entries,
    prefetching,
    raise_non_finite,
)
from inrank_convert.core.distributed import check_device
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.core.tensors import dtype_name
from inrank_convert.inputs.sources import Inputs, open_inputs
from inrank_convert.linalg.criteria import CRITERIA
from inrank_convert.linalg.factorize import ENGINES, BasisHints
from inrank_convert.linalg.forms import BREAKEVEN_MARK, choose_form
from inrank_convert.linalg.gram import native_bfloat16
from inrank_convert.linalg.stored_error import stored_error, svd_stored_error
from inrank_convert.linalg.whitening import DEFAULT_DAMPING, whitened_svd
from inrank_convert.model.architecture import check_seed
from inrank_convert.weights.hash_cache import usable_cores
from inrank_convert.weights.outputs import check_output_free, check_output_outside


@dataclass
class LayerResult:
    """What compress stored for one tensor: its manifest entry, and how it got there."""

    name: str
    entry: TensorEntry
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> TensorKind:
        return self.entry.kind

    @property
    def shape(self) -> tuple[int, ...]:
        return self.entry.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.entry.dtype

    @property
    def rank(self) -> int | None:
        return self.entry.rank

    @property
    def energy(self) -> float:
        """Fraction of the update's squared Frobenius norm kept."""
        return self.entry.energy

    @property
    def bytes(self) -> int:
        return self.entry.bytes

    @property
    def original_bytes(self) -> int:
        return self.entry.original_bytes

    @property
    def engine(self) -> str:
        return self.entry.svd or ""

    def to_json(self) -> dict:
        return {"name": self.name, **self.entry.to_json()}


@dataclass
class CompressResult:
    output: Path | None
    source: str
    reference_mode: str
    rule: str
    layers: list[LayerResult]
    tied: dict[str, str]
    original_bytes: int
    compressed_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    manifest: Manifest | None = None

    @property
    def ratio(self) -> float:
        return self.compressed_bytes / self.original_bytes if self.original_bytes else 0.0

    def to_json(self) -> dict:
        records = {} if self.manifest is None else \
            {key: value for key, value in (("calibration", self.manifest.calibration),
                                           ("perplexity_target", self.manifest.perplexity_target)) if value is not None}
        return {**records, "output": str(self.output) if self.output else None, "source": self.source,
                "reference": self.reference_mode, "rule": self.rule, "original_bytes": self.original_bytes,
                "compressed_bytes": self.compressed_bytes, "ratio": self.ratio, "seconds": round(self.seconds, 3),
                "tied": self.tied, "notes": self.notes, "layers": [layer.to_json() for layer in self.layers]}


def check_options(options: PlanOptions) -> None:
    """Reject option values that cannot work, before any input is opened."""
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
    if options.quantize is not None and options.quantize not in QUANTIZE_SCHEMES:
        raise UsageError(f"unknown quantization scheme {options.quantize!r}", flag("--quantize"),
                         f"choose one of {', '.join(QUANTIZE_SCHEMES)}")
    if options.quantize is not None and options.lossless:
        raise UsageError(f"{flag('--quantize')} {options.quantize} rounds the factors, but {flag('--threshold')} 1.0 asks "
                         "for an exact artifact", flag("--quantize"),
                         f"drop {flag('--quantize')}, or lower {flag('--threshold')} (e.g. 0.99)")
    if options.quantize is not None and options.factor_dtype is not None:
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


def plan_compression(inputs: Inputs, options: PlanOptions) -> Plan:
    return make_plan(inputs.trained, inputs.reference, options, inputs.reference.aliases())


def iter_compress(plan: Plan, inputs: Inputs, options: PlanOptions, writer: ArtifactWriter,
                  budget: dict[str, Assigned] | None = None, stats: CalibrationStats | None = None
                  ) -> Iterator[LayerResult]:
    """Execute the plan one tensor at a time, storing each result with ``writer``; ``budget``:
    the size each factorized tensor was allocated (a global target), instead of the rank rule;
    ``stats``: the calibration whose Grams whiten the tensors the budget marked ``whitened``."""
    device = torch.device(options.device)
    work = planned_entries(plan)
    chains = HintChains(work)
    for index, entry in prefetching(inputs, work):
        assigned = None if budget is None else budget.get(entry.name)
        yield _execute(entry, inputs, options, device, index, writer, assigned, stats, chains.hints(index))


# The adaptive engine starts an update with the basis size the last update of its shape ended with,
# but only within a chain of HINT_CHAIN same-shape updates in plan order: a tensor's bits then depend
# on its chain alone, never on which process computed it (torchrun shares out whole chains).
HINT_CHAIN = 4


class HintChains:
    """The basis hints of one compress (or of one process's share), chain by chain."""

    def __init__(self, work: Sequence[tuple[int, TensorPlan]]):
        self.chain: dict[int, tuple[tuple[int, ...], int]] = {}  # plan index -> (shape, chain number)
        counts: dict[tuple[int, ...], int] = {}
        for index, entry in work:
            if entry.action == "factorize":
                shape = tuple(entry.shape)
                self.chain[index] = (shape, counts.get(shape, 0) // HINT_CHAIN)
                counts[shape] = counts.get(shape, 0) + 1
        self._hints: dict[tuple[tuple[int, ...], int], BasisHints] = {}

    def hints(self, index: int) -> BasisHints | None:
        key = self.chain.get(index)
        return None if key is None else self._hints.setdefault(key, {})


# Storage at least as coarse as bfloat16: a bfloat16 factor product rounds no coarser than it.
REDUCED_PRODUCT_STORAGE = ("bfloat16", "int8")


def product_dtype(storage: str, device: torch.device) -> torch.dtype | None:
    """The dtype the Gram engine may compute factors in for ``storage`` on ``device`` (see
    spectrum.REDUCED_PRODUCT_MIN_TAIL): bfloat16 where the factors are stored that coarsely and the
    hardware multiplies bfloat16 natively; None (float32) elsewhere."""
    return torch.bfloat16 if storage in REDUCED_PRODUCT_STORAGE and native_bfloat16(device) else None


def _execute(entry: TensorPlan, inputs: Inputs, options: PlanOptions, device: torch.device, index: int,
             writer: ArtifactWriter, assigned: Assigned | None = None,
             stats: CalibrationStats | None = None, hints: BasisHints | None = None) -> LayerResult:
    started = time.perf_counter()
    if entry.action == "dense" or (assigned is not None and assigned.dense):
        weight = inputs.trained.get(entry.name)
        if not check_finite_fast(weight):
            raise_non_finite(inputs, entry.name)
        stored = writer.add_dense(entry.name, weight, reference_rows=entry.reference_rows)
        reason = entry.reason if entry.action == "dense" else "the budget keeps it whole"
        return LayerResult(entry.name, stored, time.perf_counter() - started, [reason])

    delta, total = load_update(inputs, entry, device)
    generator = torch.Generator(device=device).manual_seed(options.seed + index)
    storage = storage_for(options, entry)
    if assigned is not None and assigned.whitened:
        if stats is None:
            raise ValueError(f"{entry.name} was allocated a whitened rank without calibration statistics")
        form = whitened_svd(delta, stats.grams[entry.name].to(device), conv1d=stats.conv1d[entry.name],
                            name=entry.name).form(assigned.rank)
    else:
        row_scores = None if stats is None or assigned is None else partial(stats.row_scores, entry.name)
        form = choose_form(delta, total, options.rule, costs_for(options, entry), options.engine, options.float64,
                           generator, entry.forced_rows,
                           None if assigned is None else (assigned.rank, assigned.rows), row_scores, hints=hints,
                           products=product_dtype(storage, device))
    notes = list(form.notes)
    engine = form.engine or None
    if form.kind == "zero":
        stored = writer.add_zero(entry.name, shape=entry.shape, dtype=entry.dtype, energy=form.energy, svd=engine)
    elif form.kind == "dense":
        # Re-read: a memory map, no copy.
        stored = writer.add_dense(entry.name, inputs.trained.get(entry.name), rank=form.rank or None, svd=engine,
                                  reference_rows=entry.reference_rows)
    else:
        # The stored error from the factors as they will be stored (no float32 copy of them) where
        # norms suffice, else measured on what a reader decodes.
        error = None
        if form.svd_factors and form.rows is None:
            B_q, A_q, scale = encode_factors(form.B, form.A, storage)
            error = svd_stored_error(total, form.B, form.A, B_q, A_q, form.product_error, scale)
        if error is None:
            B, A, rows = round_trip(form.B, form.A, form.rows, storage)
            error = stored_error(delta, total, B.to(delta.device), A.to(delta.device),
                                 None if rows is None else rows.to(delta.device), form.row_index)
        stored = writer.add_lowrank(entry.name, form.B.cpu(), form.A.cpu(), shape=entry.shape, dtype=entry.dtype,
                                    energy=form.energy, svd=engine, storage=storage, error=error,
                                    rows=None if form.rows is None else form.rows.cpu(),
                                    row_index=None if form.row_index is None else form.row_index.cpu(),
                                    reference_rows=entry.reference_rows)
    del delta
    if inputs.embed_init and stored.uses_reference:
        writer.add_reference_tensor(entry.name, inputs.reference.get(entry.name))
    return LayerResult(entry.name, stored, time.perf_counter() - started, notes)


@dataclass(frozen=True)
class CalibrationRequest:
    """``--calibrate TEXT``: the text, how many of its tokens, and the tokenizer (default: the model's)."""

    text: Path
    tokens: int = DEFAULT_CALIBRATION_TOKENS
    tokenizer: Path | None = None


def check_target_options(options: PlanOptions, embed_init: bool, calibration: CalibrationRequest | None,
                         searched: bool = False) -> None:
    """Options that only a size target (or a perplexity target, ``searched``) makes sense with."""
    which = "--max-perplexity-increase" if searched else \
        "--target-ratio" if options.target_ratio is not None else "--target-size"
    if (options.has_target or searched) and embed_init:
        raise UsageError(f"{flag('--embed-init')} stores every factorized tensor's init whole, so {flag(which)} "
                         "could not shrink the artifact", flag("--embed-init"),
                         f"drop {flag('--embed-init')} (pass {flag('--init')} or {flag('--init-seed')})")
    if calibration is not None and not (options.has_target or searched):
        # A whitened spectrum is far more concentrated than the plain one: a per-tensor energy
        # threshold on it keeps far too few ranks (+44% perplexity at t = 0.9 in issue 11's run).
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
        # The source's and the reference's hashes, each job on its own thread (a checkpoint's
        # shards on more): a full read of each file the hash cache does not remember.
        self._hasher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="inrank-hash")
        try:
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

    def calibration_record(self) -> dict | None:
        if self.stats is None:
            return None
        return {**self.stats.to_json(), "damping": DEFAULT_DAMPING}

    def default_target(self) -> int | None:
        """The byte target --target-ratio / --target-size ask for (None: the rank rule)."""
        return target_bytes(self.options, self.plan) if self.options.has_target else None

    def header(self, target: int, perplexity_target: dict | None = None) -> int:
        """The bound on the artifact file's header at ``target`` (see targets.header_bound)."""
        return header_bound(self.plan, self.options, self._finish_arguments(target, perplexity_target), target)

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

    def execute(self, writer: ArtifactWriter, budget: dict[str, Assigned] | None) -> Iterator[LayerResult]:
        """The plan's tensors stored into ``writer`` in plan order, here in this process (under
        torchrun, distributed_compress shares them out over the processes instead)."""
        return iter_compress(self.plan, self.inputs, self.options, writer, budget, self.stats)

    def write(self, output: str | Path, target: int | None = None, *, force: bool = False,
              on_layer: Callable[[LayerResult], None] | None = None,
              perplexity_target: dict | None = None) -> CompressResult:
        """Execute the plan into the artifact folder ``output`` (temp folder, then rename), at most
        ``target`` bytes (allocated from the spectra) or by the rank rule when ``target`` is None.
        ``perplexity_target`` is the record that --max-perplexity-increase will fill in (its
        longest form bounds the header)."""
        started = time.perf_counter()
        options, plan, inputs = self.options, self.plan, self.inputs
        budget = None
        if target is not None:
            spectra = self.spectra()
            header = self.header(target, perplexity_target)
            check_target(spectra, plan, options, target, header)
            budget = allocate_target(spectra, target, header)
        # Background spooling: the factors and the source's tensors are never changed once added.
        with ArtifactWriter(output, force=force, inputs=inputs.paths, embed_reference=inputs.embed_init,
                            background=True) as writer:
            layers: list[LayerResult] = []
            for layer in self.execute(writer, budget):
                layers.append(layer)
                if on_layer is not None:
                    on_layer(layer)
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
    check_output_outside(Path(output), (source, init))  # fail before any expensive input work
    check_output_free(Path(output), force)
    with CompressionJob(source, init=init, init_seed=init_seed, no_init=no_init, embed_init=embed_init,
                        options=options, calibration=calibration, on_plan=on_plan, on_stage=on_stage) as job:
        return job.write(output, job.default_target(), force=force, on_layer=on_layer)
