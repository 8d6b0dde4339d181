"""Execute a plan: stream tensors one at a time, factorize each update, write the artifact.

``compress`` is the whole job; ``sources.open_inputs``, ``plan_compression`` and ``iter_compress``
are its steps, public so that ``--dry-run``, ``spectrum`` and training can reuse them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .artifact import ArtifactWriter, RuleRecord, SourceRecord, TensorEntry, TensorKind
from .artifact.storage import QUANTIZE_SCHEMES, element_bytes, round_trip, vector_overhead
from .distributed import check_device
from .errors import NonFiniteError, UsageError, flag
from .forms import Costs, choose_form, stored_error
from .outputs import check_output_free
from .plan import Plan, PlanOptions, TensorPlan, make_plan
from .sources import Inputs, open_inputs
from .spectrum import CRITERIA, ENGINES, frobenius_energy
from .tensors import dtype_name


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

    @property
    def ratio(self) -> float:
        return self.compressed_bytes / self.original_bytes if self.original_bytes else 0.0

    def to_json(self) -> dict:
        return {"output": str(self.output) if self.output else None, "source": self.source,
                "reference": self.reference_mode, "rule": self.rule, "original_bytes": self.original_bytes,
                "compressed_bytes": self.compressed_bytes, "ratio": self.ratio, "seconds": round(self.seconds, 3),
                "tied": self.tied, "notes": self.notes, "layers": [layer.to_json() for layer in self.layers]}


def check_options(options: PlanOptions) -> None:
    """Reject option values that cannot work, before any input is opened."""
    rule = options.rule
    if rule.fixed_rank is not None and rule.fixed_rank < 0:
        raise UsageError(f"rank must be 0 or more, got {rule.fixed_rank}", flag("--rank"), f"pass {flag('--rank')} 0 or a positive rank")
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
    check_device(options.device)


def storage_for(options: PlanOptions, entry: TensorPlan) -> str:
    """The precision factors and rows are stored at (format version 2): --quantize, else --dtype,
    else float32 when the rule is lossless (float64 for a float64 source: factors of a half-precision
    update rounded to half precision would not be exact), else bfloat16."""
    if options.quantize is not None:
        return options.quantize
    if options.factor_dtype is not None:
        return dtype_name(options.factor_dtype)
    if options.lossless:
        return "float64" if entry.dtype == torch.float64 else "float32"
    return "bfloat16"


def plan_compression(inputs: Inputs, options: PlanOptions) -> Plan:
    return make_plan(inputs.trained, inputs.reference, options, inputs.reference.aliases())


def _raise_non_finite(inputs: Inputs, name: str) -> None:
    """Name the checkpoint that holds NaN/Inf (a full check, run only once a cheap one failed)."""
    weight = inputs.trained.get(name)
    if not bool(torch.isfinite(weight).all()):
        raise NonFiniteError(f"tensor {name!r} holds NaN or Inf", str(inputs.trained.path),
                             "this checkpoint is broken (diverged training?): use an earlier one")
    reference = inputs.reference.get(name)
    where = getattr(getattr(inputs.reference, "checkpoint", None), "path", f"the {inputs.reference.mode} init")
    if reference is not None and not bool(torch.isfinite(reference).all()):
        raise NonFiniteError(f"init tensor {name!r} holds NaN or Inf", str(where), "pass a valid init")
    raise NonFiniteError(f"the update of {name!r} overflows float32", str(inputs.trained.path),
                         "the weights are too large to compare: check the checkpoint")


def check_finite_fast(tensor: torch.Tensor) -> bool:
    """One pass, no temporary mask: NaN or Inf anywhere makes the norm non-finite."""
    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return True
    return math.isfinite(frobenius_energy(tensor))


def load_update(inputs: Inputs, entry: TensorPlan, device: torch.device) -> tuple[torch.Tensor, float]:
    """delta = W - W_ref in float32 on ``device`` and its exact ||delta||_F^2.

    The trained and reference tensors are dropped as soon as they are subtracted, so at most
    one of them and the update are alive at once. bf16/fp16 inputs are subtracted in float32
    (bf16 rounding of W would add noise to the update's energy).
    """
    weight = inputs.trained.get(entry.name)
    delta = weight.to(device=device, dtype=torch.float32, copy=True)  # [rows, cols]
    del weight
    reference = inputs.reference.get(entry.name)
    if reference is not None:
        # A grown vocabulary: the reference's rows are the first ones; the new rows' update is themselves.
        delta[:reference.shape[0]].sub_(reference.to(device))
        del reference
    total = frobenius_energy(delta)
    if not math.isfinite(total):
        _raise_non_finite(inputs, entry.name)
    return delta, total


def planned_work(plan: Plan, inputs: Inputs, actions: tuple[str, ...] = ("factorize", "dense")
                 ) -> Iterator[tuple[int, TensorPlan]]:
    """(index, entry) of the plan entries to execute, in order. Before handing out an entry it
    asks the kernel to start reading the next one's tensors (posix_fadvise), so disk reads
    overlap the current SVD without mapping or copying anything early."""
    work = [entry for entry in plan.entries if entry.action in actions]
    for index, entry in enumerate(work):
        if index + 1 < len(work):
            following = work[index + 1]
            inputs.trained.prefetch(following.name)
            if following.action == "factorize":
                inputs.reference.prefetch(following.name)
        yield index, entry


def iter_compress(plan: Plan, inputs: Inputs, options: PlanOptions, writer: ArtifactWriter) -> Iterator[LayerResult]:
    """Execute the plan one tensor at a time, storing each result with ``writer``."""
    device = torch.device(options.device)
    for index, entry in planned_work(plan, inputs):
        yield _execute(entry, inputs, options, device, index, writer)


def _execute(entry: TensorPlan, inputs: Inputs, options: PlanOptions, device: torch.device, index: int,
             writer: ArtifactWriter) -> LayerResult:
    started = time.perf_counter()
    notes: list[str] = []
    if entry.action == "dense":
        weight = inputs.trained.get(entry.name)
        if not check_finite_fast(weight):
            _raise_non_finite(inputs, entry.name)
        stored = writer.add_dense(entry.name, weight, reference_rows=entry.reference_rows)
        return LayerResult(entry.name, stored, time.perf_counter() - started, [entry.reason])

    delta, total = load_update(inputs, entry, device)
    generator = torch.Generator(device=device).manual_seed(options.seed + index)
    storage = storage_for(options, entry)
    costs = Costs(element_bytes(storage), vector_overhead(storage), entry.nbytes)
    forced = None if entry.reference_rows is None else torch.arange(entry.reference_rows, entry.shape[0])
    form = choose_form(delta, total, options.rule, costs, options.engine, options.float64, generator, forced)
    notes = list(form.notes)
    engine = form.engine or None
    if form.kind == "zero":
        stored = writer.add_zero(entry.name, shape=entry.shape, dtype=entry.dtype, energy=form.energy, svd=engine)
    elif form.kind == "dense":
        # Re-read: a memory map, no copy.
        stored = writer.add_dense(entry.name, inputs.trained.get(entry.name), rank=form.rank or None, svd=engine,
                                  reference_rows=entry.reference_rows)
    else:
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


def compress(source: str | Path, output: str | Path, *, init: str | Path | None = None, init_seed: int | None = None,
             no_init: bool = False, embed_init: bool = False, options: PlanOptions | None = None,
             force: bool = False, on_plan: Callable[[Plan], None] | None = None,
             on_layer: Callable[[LayerResult], None] | None = None) -> CompressResult:
    """Compress ``source`` into the artifact folder ``output``.

    Everything is written into a temporary folder that is renamed into place at the end, so a
    failure or a kill leaves no output that looks valid; inputs are only ever read.
    """
    options = options or PlanOptions()
    check_options(options)
    check_output_free(Path(output), force)  # fail before any expensive input work
    started = time.perf_counter()
    inputs = open_inputs(source, init, init_seed, no_init, embed_init)
    try:
        plan = plan_compression(inputs, options)
        if on_plan is not None:
            on_plan(plan)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="inrank-hash") as hasher, \
                ArtifactWriter(output, force=force, inputs=inputs.paths, embed_reference=inputs.embed_init) as writer:
            # Hash the inputs while the SVDs run: hashing a large checkpoint costs a full read.
            source_hashes = hasher.submit(inputs.trained.file_hashes)
            reference_record = hasher.submit(inputs.reference.record)
            layers: list[LayerResult] = []
            for layer in iter_compress(plan, inputs, options, writer):
                layers.append(layer)
                if on_layer is not None:
                    on_layer(layer)
            for entry in plan.entries:
                if entry.action == "alias":
                    writer.add_alias(entry.name, entry.alias_of, shape=entry.shape, dtype=entry.dtype)
            rule = options.rule
            trained = inputs.trained
            manifest = writer.finish(
                source=SourceRecord(str(Path(trained.path).resolve()), trained.kind,
                                    str(inputs.run_folder.resolve()) if inputs.run_folder else None,
                                    source_hashes.result()),
                reference=reference_record.result(),
                rule=RuleRecord(rule.criterion, rule.threshold, rule.fixed_rank),
                original_bytes=plan.original_bytes,
                # Keep the source's tensor order, so a decompressed checkpoint lists names as the original did.
                order=[entry.name for entry in plan.entries],
                svd={"engine": options.engine, "device": options.device, "float64": options.float64,
                     "seed": options.seed},
                factor_dtype=dtype_name(options.factor_dtype) if options.factor_dtype else None,
                embeddings=options.embeddings, include=list(options.include), exclude=list(options.exclude))
            writer.copy_side_files(trained.config_dir)
        notes = sorted({note for layer in layers for note in layer.notes if "float64" in note})
        return CompressResult(Path(output), str(source), manifest.reference.mode, options.rule.describe(), layers,
                              plan.tied, plan.original_bytes, writer.bytes, time.perf_counter() - started, notes)
    finally:
        inputs.close()
