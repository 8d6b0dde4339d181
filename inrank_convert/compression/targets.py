"""compress to a size target (``--target-ratio``, ``--target-size``): a first pass over the updates
that keeps only their spectra (and rows' energies), a bound on the header, and the allocation
(budget.py's greedy) of ranks and rows to every factorized tensor, which compress then executes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from inrank_convert.artifact import Manifest, RuleRecord, TensorEntry, manifest_metadata
from inrank_convert.artifact.bands import MIXED_GRIDS, Bands, vector_error
from inrank_convert.artifact.storage import int4_bands
from inrank_convert.compression.calibration import CalibrationStats
from inrank_convert.compression.plan import Plan, PlanOptions, TensorPlan, costs_for, storage_for
from inrank_convert.compression.updates import load_update, planned_work
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.core.tensors import SAFETENSORS_CODES
from inrank_convert.inputs.sources import Inputs
from inrank_convert.linalg.budget import Allocation, BandChain, TensorUnits, allocate, band_chain
from inrank_convert.linalg.criteria import DOMINANT_SHARE, RankRule, effective_threshold, rank_for_energy
from inrank_convert.linalg.forms import (
    MAX_ROW_FRACTION,
    Costs,
    rows_needed,
    split_residual,
)
from inrank_convert.linalg.gram import GramSpectrum
from inrank_convert.linalg.svd import exact_svd, singular_values
from inrank_convert.linalg.whitening import whitened_svd


@dataclass(frozen=True)
class Assigned:
    """What the budget gave one factorized tensor: whole, or ``rank`` components and (for the
    low rank + rows form) ``rows`` residual rows besides any forced ones (None: low rank only);
    ``whitened``: the components are those of the update whitened by the layer's input Gram."""

    dense: bool
    rank: int = 0
    rows: int | None = None
    whitened: bool = False  # the rank-``rank`` optimum of the output error on the calibration text
    bands: Bands | None = None  # mixed storage: the width of each component, ((bits, count), ...)


def chosen_bands(budget: dict[str, Assigned]) -> dict[str, Bands | None]:
    """Each tensor's bands in an allocation (None: not mixed, or kept whole): what header_bound takes."""
    return {name: given.bands for name, given in budget.items()}


def budget_ratio(target: int, plan: Plan) -> float:
    """The target as a fraction of the dense bytes, as the manifest records it (6 decimals)."""
    return round(target / plan.original_bytes, 6) if plan.original_bytes else 0.0


def target_bytes(options: PlanOptions, plan: Plan) -> int:
    """The byte target of the artifact's tensor file."""
    if options.target_size is not None:
        return int(options.target_size)
    return int(math.floor(float(options.target_ratio) * plan.original_bytes))


def header_bound(plan: Plan, options: PlanOptions, finish_arguments: dict, target: int,
                 bands: dict[str, Bands | None] | None = None, output_errors: Collection[str] = ()) -> int:
    """Bytes the artifact file's header (its length field, the safetensors JSON with the manifest,
    the alignment padding) can take at most, whatever ranks and rows the tensors get: the header of
    a manifest in which every factorized tensor takes its longest form (kind lowrank+rows, every
    stored tensor at full size, ten-character energy and error, the longest engine name, offsets
    as long as the target).

    It does not depend on the target below the dense bytes (the longest numbers are assumed), so
    the least target that works is one number. Under mixed storage every tensor is taken to have all
    four bands, or (``bands``, by name) only the widths an allocation gave it. The tensors named in
    ``output_errors`` (those with a calibration Gram) record an output error too, taken below 100."""
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
            storage = storage_for(options, entry)
            # mixed: every width's band, each count as long as the rank (its names and its JSON at their longest)
            widths = MIXED_GRIDS if bands is None or bands.get(entry.name) is None else dict(bands[entry.name])
            entry_bands = tuple((bits, rank) for bits in MIXED_GRIDS if bits in widths) if storage == "mixed" else None
            record = TensorEntry("lowrank+rows", entry.shape, entry.dtype, rank, 0.12345678, entry.nbytes,
                                 entry.nbytes, "exact-float64", rows=rows, storage=storage,
                                 error=0.12345678, reference_rows=entry.reference_rows, bands=entry_bands,
                                 output_error=99.12345678 if entry.name in output_errors else None)
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


TensorMode = Literal["lowrank", "rows"]


class Measured(NamedTuple):
    """One factorized tensor's units for the budget, the form its allocation takes (``lowrank`` or
    ``rows``: low rank + rows), the units of its whitened spectrum (with a calibration Gram), and
    under mixed storage the precision chains those units walk (None elsewhere)."""

    units: TensorUnits
    mode: TensorMode
    whitened: TensorUnits | None = None
    chain: BandChain | None = None
    whitened_chain: BandChain | None = None


def component_errors(feedback: bool = False) -> dict[int, float]:
    """bits -> the fraction of a component's energy that mixed storage's codes of that width leave
    as error, e for each of its two vectors (``vector_error``: Gaussian vectors; real singular
    vectors of the reference run's blocks measure the same): (1 + e)^2 - 1. With error feedback
    (``feedback``: a whitened component, its input-side factor rounded through the layer's Gram) the
    input-side vector's rounding is taken to cost the outputs nothing, e: measured at a 3% budget,
    counting it at 0, half or whole gave +0.87%, +0.96% and +1.08% on a run of the reference recipe, and 0 or
    whole +0.89% and +0.91% on a fine-tune delta at 1/16 of its bfloat16 bytes."""
    return {bits: (1.0 + vector_error(grid)) * (1.0 + (0.0 if feedback else vector_error(grid))) - 1.0
            for bits, grid in MIXED_GRIDS.items()}


def banded(units: TensorUnits, rows: int, cols: int, costs: Costs,
           feedback: bool = False) -> tuple[TensorUnits, BandChain]:
    """Mixed storage: a low-rank tensor's components walked as (component, precision) moves
    (``feedback``: whitened units, stored with error feedback)."""
    chain = band_chain(units.gains, {bits: costs.component_at(bits, rows, cols) for bits in MIXED_GRIDS},
                       component_errors(feedback), units.dense)
    return chain.units(units.dense, units.dense_gain), chain


def tensor_units(entry: TensorPlan, inputs: Inputs, options: PlanOptions, device: torch.device,
                 stats: CalibrationStats | None = None) -> Measured:
    """One factorized tensor's units for budget.allocate (its spectrum, or its dominant component
    and residual rows), the form its allocation takes (``lowrank`` or ``rows``: low rank + rows),
    and with calibration statistics the units of its whitened spectrum (None without a Gram).
    Under mixed storage a low-rank tensor's units are its ``band_chain`` (a component at one of
    8, 4, 3 or 2 bits); the rows form stores its component and rows as int4 does.

    Gains are relative energy (s_i^2 / ||delta||^2, so updates of any scale compare) weighted by
    the tensor's parameter count (rows x cols, so a fraction of a large tensor's error counts for
    more than the same fraction of a small one's). Measured on the reference run of docs/results.md at a 10% target:
    relative energy alone spends the bytes on the small block matrices (energy ~0.99 each) and
    starves the token embedding, +20.6% perplexity; weighted by size, +1.12% (the per-tensor
    threshold's result at the same size); absolute energy s_i^2, +34%.
    A tensor with a dominant component (holding DOMINANT_SHARE or more of its energy) is measured
    as the default rule (``energy-rest``, forms.py) measures it: the dominant component is one unit worth a whole
    tensor, and every unit after it is relative to the energy left after it, so that a drift
    shared by every row cannot stand for the rows' own updates; its dense gain is then twice.

    With calibration statistics, the rows of a token embedding or LM head are ranked by
    ``CalibrationStats.row_scores`` (what the outputs lose without them), and a low-rank layer
    whose input Gram was collected (every nn.Linear and Conv1D weight but the LM head) is also
    measured by its whitened spectrum: s_i^2 is the output error energy
    on the calibration text that component i removes, relative to the whole update's, weighted by
    the parameter count as above (see ``allocate_target`` for how the two are used).

    The rows form is taken where the default rule would take it: forced rows (a grown vocabulary),
    or a dominant component after which the residual's rows reach the rule's threshold in fewer
    bytes than more components (an embedding)."""
    delta, total = load_update(inputs, entry, device)
    rows, cols = entry.shape
    costs = costs_for(options, entry)
    forced_count = entry.new_rows
    # A component past the leading ones, a row; the leading components (int4's 8-bit ones) apart.
    component, row = costs.component(costs.lead, rows, cols), costs.row_set(1, cols)
    head = tuple(costs.component(index, rows, cols) for index in range(costs.lead))
    fixed = costs.row_set(forced_count, cols)
    weight = float(rows * cols)
    if total == 0.0:
        return Measured(TensorUnits((), 0, component, row, entry.nbytes, fixed, 0.0, dense_gain=0.0, head_costs=head),
                        "rows" if forced_count > 0 else "lowrank")
    # The whole spectrum from the small side's Gram (eigenvalues only), as the Gram engine reads it:
    # 1.3 s where svdvals took 4.2 s on a 32000 x 2048 update (one thread), the values within 6e-6 of
    # the largest; --float64 keeps svdvals.
    gram = None if options.float64 else GramSpectrum.of(delta, vectors=False)
    values = singular_values(delta, True) if gram is None else gram.values
    energies = values.double().pow(2).cpu()  # [min(rows, cols)]
    dominant = float(energies[0]) >= DOMINANT_SHARE * total
    rest = max(total - float(energies[0]), 1e-300) / weight if dominant else total / weight
    lead = [weight] if dominant else []
    dense_gain = 2.0 * weight if dominant else weight

    mixed = storage_for(options, entry) == "mixed"

    def components() -> Measured:
        gains = tuple(lead + (energies[len(lead):] / rest).tolist())
        plain = TensorUnits(gains, len(gains), component, row, entry.nbytes, dense_gain=dense_gain, head_costs=head)
        chain = None
        if mixed:
            plain, chain = banded(plain, rows, cols, costs)
        # The LM head keeps its plain spectrum: its whitened one measures the logits' squared error,
        # which the softmax does not weigh alike (on a LLaMA fine-tune with an untied head at 1/16 of
        # bfloat16, whitening it made calibration lose to plain, +8.66% against +7.88%; left plain,
        # +7.55%). Its Gram still ranks a head's or tied embedding's rows (``row_scores``).
        if stats is None or entry.name not in stats.grams or entry.name == stats.head:
            return Measured(plain, "lowrank", None, chain)
        whitened = whitened_svd(delta, stats.grams[entry.name].to(device), conv1d=stats.conv1d[entry.name],
                                name=entry.name)
        output_energies = whitened.S.pow(2).cpu()  # [min(rows, cols)] float64: output error energy per component
        scale = weight / max(float(output_energies.sum()), 1e-300)
        output = TensorUnits(tuple((output_energies * scale).tolist()), output_energies.numel(), component, row,
                             entry.nbytes, dense_gain=weight, head_costs=head)
        if not mixed:
            return Measured(plain, "lowrank", output)
        output, output_chain = banded(output, rows, cols, costs, feedback=True)
        return Measured(plain, "lowrank", output, chain, output_chain)

    if not dominant and forced_count == 0:
        return components()
    if dominant:
        # Only the leading right vector: from the Gram's eigenvectors, not a full SVD.
        V = exact_svd(delta, float64=True)[2][:1] if gram is None else gram.with_vectors(delta).right_vectors(delta, 1)
        V = V.to(delta.dtype)
    else:
        V = delta.new_zeros(0, cols)
    V, B, _, residual, forced = split_residual(delta, V, entry.forced_rows)
    residual = residual.cpu()  # [rows] float64
    # With calibration a token embedding's rows are worth what the outputs lose without them.
    ranking = None if stats is None else stats.row_scores(entry.name, delta, V, B, residual)
    free = torch.sort((residual if ranking is None else ranking)[~forced], descending=True).values
    if forced_count == 0:
        _, effective = effective_threshold(values, total, RankRule().threshold)
        count = rows_needed(residual, forced, effective * total - float(energies[0]))
        low_rank = rank_for_energy(values, total, effective) or values.numel()
        if count > MAX_ROW_FRACTION * rows or costs.lowrank(1, rows, cols) + costs.row_set(count, cols) \
                >= costs.lowrank(low_rank, rows, cols):
            return components()
    gains = tuple(lead + (free / rest).tolist())
    return Measured(TensorUnits(gains, len(lead), component, row, entry.nbytes, fixed,
                                float(residual[forced].sum()) / rest, dense_gain, head), "rows")


@dataclass
class Spectra:
    """The budget's first pass, done once: every factorized tensor's units and form, and the bytes
    every allocation pays (the tensors kept whole, the least each factorized tensor can take).
    Allocating any number of targets from it is cheap (no tensor is read again)."""

    names: list[str]  # the factorized tensors, in plan order
    measured: list[Measured]  # their units, forms, whitened units and (mixed storage) chains
    kept: int  # bytes of the tensors kept whole by the plan
    least: int  # bytes of the factorized tensors at their least (forced rows, or dense if smaller)
    mixed: bool = False  # mixed storage: every factorized tensor's components get bands

    def minimum(self, header: int) -> int:
        """The least artifact file any allocation gives, with a header of ``header`` bytes."""
        return header + self.kept + self.least


def measure_spectra(plan: Plan, inputs: Inputs, options: PlanOptions, stats: CalibrationStats | None = None,
                    on_tensor: Callable[[str], None] | None = None) -> Spectra:
    """Read every factorized update once and keep its units (plain or whitened spectrum, rows' energies)."""
    device = torch.device(options.device)
    factorized = [entry for entry in plan.entries if entry.action == "factorize"]
    measured: list[Measured] = []
    for _, entry in planned_work(plan, inputs, ("factorize",)):
        measured.append(tensor_units(entry, inputs, options, device, stats))
        if on_tensor is not None:
            on_tensor(entry.name)
    kept = sum(entry.nbytes for entry in plan.entries if entry.action == "dense")
    least = sum(min(costs_for(options, entry).row_set(entry.new_rows, entry.shape[1]), entry.nbytes)
                for entry in factorized)
    return Spectra([entry.name for entry in factorized], measured, kept, least, options.quantize == "mixed")


def check_target(spectra: Spectra, plan: Plan, options: PlanOptions, target: int, header: int) -> None:
    """Refuse a target below what the tensors kept whole and the header alone need (naming that minimum)."""
    minimum = spectra.minimum(header)
    if target < minimum:
        which = "--target-ratio" if options.target_ratio is not None else "--target-size"
        ratio = minimum / plan.original_bytes if plan.original_bytes else 0.0
        raise UsageError(f"a target of {target} bytes is below the {minimum} bytes ({ratio:.4%} of the dense "
                         f"{plan.original_bytes}) that the tensors kept whole and the header alone need",
                         flag(which), f"pass {flag('--target-ratio')} {math.ceil(ratio * 1e4) / 1e4:g} or more "
                         f"(or {flag('--target-size')} {minimum} or more)")


def allocate_target(spectra: Spectra, target: int, header: int) -> dict[str, Assigned]:
    """name -> what each factorized tensor gets, so that the artifact file (header included) is at
    most ``target`` bytes (``target`` at least ``spectra.minimum(header)``).

    With calibration, two steps. The plain spectra split the bytes between the layers that have an
    input Gram and the tensors that do not (embeddings); then the layers' share is allocated again
    among them by their whitened spectra. One greedy over both kinds of gain would compare a
    whitened relative energy (which reaches 0.99 in a few components, since a layer's inputs
    concentrate in a few directions) with an embedding's plain one: on the reference run of docs/results.md at a 10%
    target that starved the blocks, +2.16% perplexity against +1.12% without calibration (+0.48%
    in two steps); within the blocks alone the whitened allocation loses far less (+0.19% against
    +0.68% at 10% of the blocks' bytes). The first step sees a token embedding's rows ranked by
    ``CalibrationStats.row_scores``, whose gains keep the plain scale."""
    measured = spectra.measured
    allocations: list[Allocation] = allocate([found.units for found in measured], target - header - spectra.kept)
    whitened = [i for i, found in enumerate(measured) if found.whitened is not None and not allocations[i].dense]
    if whitened:
        share = sum(allocations[i].bytes for i in whitened)
        for i, given in zip(whitened, allocate([measured[i].whitened for i in whitened], share), strict=True):
            allocations[i] = given
    budget: dict[str, Assigned] = {}
    for i, (name, found, given) in enumerate(zip(spectra.names, measured, allocations, strict=True)):
        chain = found.whitened_chain if i in whitened else found.chain
        if given.dense:
            budget[name] = Assigned(True)
        elif chain is not None:
            bands = chain.bands[given.units]
            budget[name] = Assigned(False, sum(count for _, count in bands), None, i in whitened, bands)
        elif i in whitened:
            budget[name] = Assigned(False, given.units, None, whitened=True)
        else:
            rank, extra = given.split(found.units.lead)
            budget[name] = Assigned(False, rank, extra if found.mode == "rows" else None,
                                    bands=int4_bands(rank) if spectra.mixed else None)
    return budget
