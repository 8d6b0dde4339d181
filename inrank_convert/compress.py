"""Execute a plan: stream tensors one at a time, factorize each update, write the artifact.

``compress`` is the whole job; ``sources.open_inputs``, ``plan_compression`` and ``iter_compress``
are its steps, public so that ``--dry-run``, ``spectrum`` and training can reuse them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .artifact import (
    ArtifactWriter,
    Manifest,
    RuleRecord,
    SourceRecord,
    TensorEntry,
    TensorKind,
    manifest_metadata,
)
from .artifact.storage import QUANTIZE_SCHEMES, element_bytes, round_trip, vector_overhead
from .budget import Allocation, TensorUnits, allocate
from .distributed import check_device
from .errors import NonFiniteError, UsageError, flag
from .forms import (
    DOMINANT_SHARE,
    MAX_ROW_FRACTION,
    Costs,
    choose_form,
    effective_threshold,
    row_energies,
    stored_error,
)
from .outputs import check_output_free
from .plan import Plan, PlanOptions, TensorPlan, make_plan
from .sources import Inputs, open_inputs
from .spectrum import CRITERIA, ENGINES, RankRule, exact_svd, frobenius_energy, rank_for_energy
from .tensors import SAFETENSORS_CODES, dtype_name


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


def iter_compress(plan: Plan, inputs: Inputs, options: PlanOptions, writer: ArtifactWriter,
                  budget: dict[str, Assigned] | None = None) -> Iterator[LayerResult]:
    """Execute the plan one tensor at a time, storing each result with ``writer``; ``budget``:
    the size each factorized tensor was allocated (a global target), instead of the rank rule."""
    device = torch.device(options.device)
    for index, entry in planned_work(plan, inputs):
        assigned = None if budget is None else budget.get(entry.name)
        yield _execute(entry, inputs, options, device, index, writer, assigned)


def _execute(entry: TensorPlan, inputs: Inputs, options: PlanOptions, device: torch.device, index: int,
             writer: ArtifactWriter, assigned: Assigned | None = None) -> LayerResult:
    started = time.perf_counter()
    notes: list[str] = []
    if entry.action == "dense" or (assigned is not None and assigned.dense):
        weight = inputs.trained.get(entry.name)
        if not check_finite_fast(weight):
            _raise_non_finite(inputs, entry.name)
        stored = writer.add_dense(entry.name, weight, reference_rows=entry.reference_rows)
        reason = entry.reason if entry.action == "dense" else "the budget keeps it whole"
        return LayerResult(entry.name, stored, time.perf_counter() - started, [reason])

    delta, total = load_update(inputs, entry, device)
    generator = torch.Generator(device=device).manual_seed(options.seed + index)
    storage = storage_for(options, entry)
    costs = Costs(element_bytes(storage), vector_overhead(storage), entry.nbytes)
    forced = None if entry.reference_rows is None else torch.arange(entry.reference_rows, entry.shape[0])
    form = choose_form(delta, total, options.rule, costs, options.engine, options.float64, generator, forced,
                       None if assigned is None else (assigned.rank, assigned.rows))
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
    if options.has_target and embed_init:
        which = "--target-ratio" if options.target_ratio is not None else "--target-size"
        raise UsageError(f"{flag('--embed-init')} stores every factorized tensor's init whole, so {flag(which)} "
                         "could not shrink the artifact", flag("--embed-init"),
                         f"drop {flag('--embed-init')} (pass {flag('--init')} or {flag('--init-seed')})")
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
            trained = inputs.trained
            rule = options.rule
            rule_record = RuleRecord(rule.criterion, rule.threshold, rule.fixed_rank)
            budget = None
            if options.has_target:
                target = target_bytes(options, plan)
                rule_record = RuleRecord("budget", budget_ratio(target, plan), None, target)

            def finish_arguments() -> dict:
                return dict(
                    source=SourceRecord(str(Path(trained.path).resolve()), trained.kind,
                                        str(inputs.run_folder.resolve()) if inputs.run_folder else None,
                                        source_hashes.result()),
                    reference=reference_record.result(), rule=rule_record, original_bytes=plan.original_bytes,
                    svd={"engine": options.engine, "device": options.device, "float64": options.float64,
                         "seed": options.seed},
                    factor_dtype=dtype_name(options.factor_dtype) if options.factor_dtype else None,
                    embeddings=options.embeddings, include=list(options.include), exclude=list(options.exclude))

            if options.has_target:
                budget = plan_budget(plan, inputs, options, target, header_bound(plan, options, finish_arguments(), target))
            layers: list[LayerResult] = []
            for layer in iter_compress(plan, inputs, options, writer, budget):
                layers.append(layer)
                if on_layer is not None:
                    on_layer(layer)
            for entry in plan.entries:
                if entry.action == "alias":
                    writer.add_alias(entry.name, entry.alias_of, shape=entry.shape, dtype=entry.dtype)
            # Keep the source's tensor order, so a decompressed checkpoint lists names as the original did.
            manifest = writer.finish(order=[entry.name for entry in plan.entries], **finish_arguments())
            writer.copy_side_files(trained.config_dir)
        notes = sorted({note for layer in layers for note in layer.notes if "float64" in note})
        return CompressResult(Path(output), str(source), manifest.reference.mode, rule_record.describe(), layers,
                              plan.tied, plan.original_bytes, writer.bytes, time.perf_counter() - started, notes)
    finally:
        inputs.close()


# --------------------------------------------------------------------------- a global size budget


@dataclass(frozen=True)
class Assigned:
    """What the budget gave one factorized tensor: whole, or ``rank`` components and (for the
    low rank + rows form) ``rows`` residual rows besides any forced ones (None: low rank only)."""

    dense: bool
    rank: int = 0
    rows: int | None = None


def budget_ratio(target: int, plan: Plan) -> float:
    """The target as a fraction of the dense bytes, as the manifest records it (6 decimals)."""
    return round(target / plan.original_bytes, 6) if plan.original_bytes else 0.0


def target_bytes(options: PlanOptions, plan: Plan) -> int:
    """The byte target of the artifact's tensor file."""
    if options.target_size is not None:
        return int(options.target_size)
    return int(math.floor(float(options.target_ratio) * plan.original_bytes))


def _forced_count(entry: TensorPlan) -> int:
    return 0 if entry.reference_rows is None else entry.shape[0] - entry.reference_rows


def _costs(options: PlanOptions, entry: TensorPlan) -> Costs:
    storage = storage_for(options, entry)
    return Costs(element_bytes(storage), vector_overhead(storage), entry.nbytes)


def header_bound(plan: Plan, options: PlanOptions, finish_arguments: dict, target: int) -> int:
    """Bytes the artifact file's header (its length field, the safetensors JSON with the manifest,
    the alignment padding) can take at most, whatever ranks and rows the tensors get: the header of
    a manifest in which every factorized tensor takes its longest form (kind lowrank+rows, every
    stored tensor at full size, ten-character energy and error, the longest engine name, offsets
    as long as the target).

    It does not depend on the target below the dense bytes (the longest numbers are assumed), so
    the least target that works is one number."""
    entries: dict[str, TensorEntry] = {}
    stored: dict[str, dict] = {}
    wide = 10 ** len(str(max(target, plan.original_bytes))) - 1
    offset = [wide, wide]
    ratio = budget_ratio(target, plan)
    longest_ratio = 0.123456 if ratio < 1.0 else ratio  # round(x, 6) below 1 prints in at most 8 characters
    longest_code = max(SAFETENSORS_CODES.values(), key=len)
    for entry in plan.entries:
        if entry.action == "alias":
            entries[entry.name] = TensorEntry("alias", entry.shape, entry.dtype, of=entry.alias_of)
            continue
        if entry.action == "dense":
            record = TensorEntry("dense", entry.shape, entry.dtype, None, 1.0, entry.nbytes, entry.nbytes, None,
                                 reference_rows=entry.reference_rows)
            stored[entry.name] = {"dtype": longest_code, "shape": list(entry.shape), "data_offsets": offset}
        else:
            rows, cols = entry.shape
            rank = min(rows, cols)
            record = TensorEntry("lowrank+rows", entry.shape, entry.dtype, rank, 0.12345678, entry.nbytes,
                                 entry.nbytes, "exact-float64", rows=rows, storage=storage_for(options, entry),
                                 error=0.12345678, reference_rows=entry.reference_rows)
            for name in record.stored_names(entry.name):
                shape = [max(rows, cols), max(rows, cols)]
                stored[name] = {"dtype": longest_code, "shape": shape, "data_offsets": offset}
        entries[entry.name] = record
    arguments = dict(finish_arguments)
    arguments.pop("rule")
    rule = RuleRecord("budget", longest_ratio, None, wide)
    manifest = Manifest(arguments.pop("source"), arguments.pop("reference"), rule, entries,
                        arguments.pop("original_bytes"), **arguments)
    manifest.checksums = {name: "f" * 64 for name in stored}
    header = {"__metadata__": manifest_metadata(manifest), **stored}
    encoded = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + encoded + 7


def tensor_units(entry: TensorPlan, inputs: Inputs, options: PlanOptions, device: torch.device
                 ) -> tuple[TensorUnits, bool]:
    """One factorized tensor's units for budget.allocate (its spectrum, or its dominant component
    and residual rows), and whether it takes the low rank + rows form.

    Gains are relative energy (s_i^2 / ||delta||^2, so updates of any scale compare) weighted by
    the tensor's parameter count (rows x cols, so a fraction of a large tensor's error counts for
    more than the same fraction of a small one's). Measured on the README's run at a 10% target:
    relative energy alone spends the bytes on the small block matrices (energy ~0.99 each) and
    starves the token embedding, +20.6% perplexity; weighted by size, +1.12% (the per-tensor
    threshold's result at the same size); absolute energy s_i^2, +34%.
    A tensor with a dominant component (holding DOMINANT_SHARE or more of its energy) is measured
    as the default rule measures it (forms.py): the dominant component is one unit worth a whole
    tensor, and every unit after it is relative to the energy left after it, so that a drift
    shared by every row cannot stand for the rows' own updates; its dense gain is then twice.

    The rows form is taken where the default rule would take it: forced rows (a grown vocabulary),
    or a dominant component after which the residual's rows reach the rule's threshold in fewer
    bytes than more components (an embedding)."""
    delta, total = load_update(inputs, entry, device)
    rows, cols = entry.shape
    costs = _costs(options, entry)
    forced_count = _forced_count(entry)
    component, row = costs.lowrank(1, rows, cols), costs.row_set(1, cols)
    fixed = costs.row_set(forced_count, cols)
    if total == 0.0:
        return TensorUnits((), 0, component, row, entry.nbytes, fixed, 0.0, dense_gain=0.0), forced_count > 0
    work = delta.double() if options.float64 else delta
    try:
        values = torch.linalg.svdvals(work)
    except RuntimeError:  # no convergence: the float64 retry of exact_svd
        values = torch.linalg.svdvals(work.double())
    energies = values.double().pow(2).cpu()  # [min(rows, cols)]
    dominant = float(energies[0]) >= DOMINANT_SHARE * total
    weight = float(rows * cols)
    rest = max(total - float(energies[0]), 1e-300) / weight if dominant else total / weight
    lead = [weight] if dominant else []
    dense_gain = 2.0 * weight if dominant else weight

    def components() -> tuple[TensorUnits, bool]:
        gains = tuple(lead + (energies[len(lead):] / rest).tolist())
        return TensorUnits(gains, len(gains), component, row, entry.nbytes, dense_gain=dense_gain), False

    if not dominant and forced_count == 0:
        return components()
    if dominant:
        _, _, Vh, _ = exact_svd(delta, float64=options.float64)
        V = Vh[:1].to(delta.dtype)
    else:
        V = delta.new_zeros(0, cols)
    B = delta @ V.T  # [rows, r]
    residual = (row_energies(delta) - B.double().pow(2).sum(dim=1)).clamp_min(0.0).cpu()  # [rows]
    forced = torch.zeros(rows, dtype=torch.bool)
    forced[rows - forced_count:] = True
    free = torch.sort(residual[~forced], descending=True).values
    if forced_count == 0:
        _, effective = effective_threshold(values, total, RankRule().threshold)
        need = effective * total - float(energies[0])
        cumulative = torch.cumsum(free, dim=0)
        hits = torch.nonzero(cumulative >= need * (1.0 - 1e-12))
        count = int(hits[0, 0]) + 1 if hits.numel() else free.numel()
        low_rank = rank_for_energy(values, total, effective) or values.numel()
        if count > MAX_ROW_FRACTION * rows or costs.lowrank(1, rows, cols) + costs.row_set(count, cols) \
                >= costs.lowrank(low_rank, rows, cols):
            return components()
    gains = tuple(lead + (free / rest).tolist())
    return TensorUnits(gains, len(lead), component, row, entry.nbytes, fixed, float(residual[forced].sum()) / rest,
                       dense_gain), True


def plan_budget(plan: Plan, inputs: Inputs, options: PlanOptions, target: int, header: int) -> dict[str, Assigned]:
    """The spectra pass and the allocation: name -> what each factorized tensor gets, so that the
    artifact file (header included) is at most ``target`` bytes."""
    kept = sum(entry.nbytes for entry in plan.entries if entry.action == "dense")
    factorized = [entry for entry in plan.entries if entry.action == "factorize"]
    least = sum(min(_costs(options, entry).row_set(_forced_count(entry), entry.shape[1]), entry.nbytes)
                for entry in factorized)
    minimum = header + kept + least
    if target < minimum:
        which = "--target-ratio" if options.target_ratio is not None else "--target-size"
        ratio = minimum / plan.original_bytes if plan.original_bytes else 0.0
        raise UsageError(f"a target of {target} bytes is below the {minimum} bytes ({ratio:.4%} of the dense "
                         f"{plan.original_bytes}) that the tensors kept whole and the header alone need",
                         flag(which), f"pass {flag('--target-ratio')} {math.ceil(ratio * 1e4) / 1e4:g} or more "
                         f"(or {flag('--target-size')} {minimum} or more)")
    device = torch.device(options.device)
    units: list[TensorUnits] = []
    rows_form: list[bool] = []
    for _, entry in planned_work(plan, inputs, ("factorize",)):
        found, with_rows = tensor_units(entry, inputs, options, device)
        units.append(found)
        rows_form.append(with_rows)
    allocations: list[Allocation] = allocate(units, target - header - kept)
    budget: dict[str, Assigned] = {}
    for entry, found, with_rows, given in zip(factorized, units, rows_form, allocations, strict=True):
        if given.dense:
            budget[entry.name] = Assigned(True)
        else:
            rank, extra = given.split(found.lead)
            budget[entry.name] = Assigned(False, rank, extra if with_rows else None)
    return budget
