"""A plan executed, tensor by tensor: each update streamed in (read-ahead overlaps the work),
factorized into its stored form (by the rank rule, a size target's allocation or the calibrated
whitening), its stored error measured, and the result handed to the artifact writer.

The same functions run in one process (``job``) and in each process of a torchrun job
(``torchrun``): a tensor's bits depend only on the tensor, its plan index and its hint chain.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from functools import partial

import torch

from inrank_convert.artifact import ArtifactWriter
from inrank_convert.artifact.bands import Bands
from inrank_convert.artifact.storage import (
    GROUPED_STORAGE,
    encode_factors,
    read_update,
    stored_update,
)
from inrank_convert.compression.calibration import CalibrationStats
from inrank_convert.compression.plan import Plan, PlanOptions, TensorPlan, costs_for, storage_for
from inrank_convert.compression.results import LayerResult
from inrank_convert.compression.targets import Assigned
from inrank_convert.compression.updates import (
    check_finite_fast,
    load_update,
    planned_entries,
    prefetching,
    raise_non_finite,
)
from inrank_convert.inputs.sources import Inputs
from inrank_convert.linalg.factorize import BasisHints
from inrank_convert.linalg.forms import choose_form
from inrank_convert.linalg.gram import native_bfloat16
from inrank_convert.linalg.stored_error import output_error, stored_error, svd_stored_error
from inrank_convert.linalg.whitening import whitened_svd


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
        yield execute_entry(entry, inputs, options, device, index, writer, assigned, stats, chains.hints(index))


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
REDUCED_PRODUCT_STORAGE = ("bfloat16", "int8", "int4", "mixed")


def product_dtype(storage: str, device: torch.device) -> torch.dtype | None:
    """The dtype the Gram engine may compute factors in for ``storage`` on ``device`` (see
    gram.REDUCED_PRODUCT_MIN_TAIL): bfloat16 where the factors are stored that coarsely and the
    hardware multiplies bfloat16 natively; None (float32) elsewhere."""
    return torch.bfloat16 if storage in REDUCED_PRODUCT_STORAGE and native_bfloat16(device) else None


def form_bands(name: str, assigned: Assigned | None, rank: int) -> Bands:
    """The bands a mixed-storage tensor of ``rank`` components is stored in: the budget's (which
    gives a low rank + rows form int4's)."""
    if assigned is None or assigned.bands is None:
        raise ValueError(f"{name}: mixed storage needs the bands a size budget chose")
    if sum(count for _, count in assigned.bands) != rank:
        raise ValueError(f"{name}: the budget's bands {assigned.bands} do not hold the form's rank {rank}")
    return assigned.bands


def execute_entry(entry: TensorPlan, inputs: Inputs, options: PlanOptions, device: torch.device, index: int,
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
        # A calibrated layer: its output error on the calibration text is recorded too, and int4 and
        # mixed round the factor that meets its input with error feedback.
        gram = stats.input_gram(entry.name) if stats is not None else None
        feedback = gram if storage in GROUPED_STORAGE else None
        bands = form_bands(entry.name, assigned, form.rank) if storage == "mixed" else None
        # (group-wise rounding is too coarse for the norms' second-order terms: measured; a calibrated
        # layer's output error needs the decoded factors anyway.)
        if form.svd_factors and form.rows is None and storage not in GROUPED_STORAGE and gram is None:
            B_q, A_q, scale = encode_factors(form.B, form.A, storage)
            error = svd_stored_error(total, form.B, form.A, B_q, A_q, form.product_error, scale)
        B_cpu, A_cpu, rows_cpu = form.B.cpu(), form.A.cpu(), None if form.rows is None else form.rows.cpu()
        encoded = outputs = None
        if error is None:
            # Measured on what the writer will store, encoded once (int4's error feedback is not cheap).
            encoded = stored_update(B_cpu, A_cpu, rows_cpu, storage, feedback, bands)
            B, A, rows = (None if part is None else part.to(delta.device)
                          for part in read_update(encoded, storage, A_cpu.shape[1]))
            error = stored_error(delta, total, B, A, rows, form.row_index)
            if gram is not None:
                outputs = output_error(delta, B, A, rows, form.row_index, gram.gram, gram.conv1d)
        stored = writer.add_lowrank(entry.name, B_cpu, A_cpu, shape=entry.shape, dtype=entry.dtype,
                                    energy=form.energy, svd=engine, storage=storage, error=error, rows=rows_cpu,
                                    row_index=None if form.row_index is None else form.row_index.cpu(),
                                    reference_rows=entry.reference_rows, encoded=encoded, bands=bands,
                                    output_error=outputs)
    del delta
    if inputs.embed_init and stored.uses_reference:
        writer.add_reference_tensor(entry.name, inputs.reference.get(entry.name))
    return LayerResult(entry.name, stored, time.perf_counter() - started, notes)
