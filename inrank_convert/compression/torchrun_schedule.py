"""The schedule of a torchrun compress, as pure functions: which options a torchrun job can run,
what each tensor's factorization costs, and which process computes which tensor (``share_out``).
``torchrun`` carries it out.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from inrank_convert.compression.execution import HintChains
from inrank_convert.compression.job import CalibrationRequest
from inrank_convert.compression.plan import Plan, PlanOptions, TensorPlan
from inrank_convert.core.distributed import env_world
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.core.tensors import dtype_name
from inrank_convert.inputs.sources import Inputs
from inrank_convert.weights.hash_cache import remembered

PER_TENSOR_COST = 1.5e7  # svd_cost's units (~2 ms): reading, subtracting, choosing the form, measuring the error
HASH_COST_PER_BYTE = 10.0  # svd_cost's units per byte of sha256 (see hashing_cost)


def check_one_process(options: PlanOptions, calibration: CalibrationRequest | None = None,
                      searched: bool = False) -> None:
    """Refuse, under torchrun, what compress runs in one process only: a size or perplexity
    target and calibration choose every tensor's rank together, from all the spectra at once."""
    world = env_world()
    if not world.enabled:
        return
    which = ("--max-perplexity-increase" if searched else "--calibrate" if calibration is not None
             else "--target-ratio" if options.target_ratio is not None
             else "--target-size" if options.target_size is not None else None)
    if which is not None:
        raise UsageError(f"{flag(which)} chooses every tensor's rank together, which compress does in one process only",
                         f"torchrun with {world.size} processes",
                         "run it without torchrun: python -m inrank_convert compress ...")


def svd_cost(entry: TensorPlan) -> float:
    """The work of factorizing ``entry``, in units of about 0.14 ns of one CPU thread: for an
    m x n update (k = min(m, n)), m n k for the Gram product or the SVD's reductions, plus k^3
    for the small dense solve (far fewer flops per second), plus PER_TENSOR_COST for the work
    around it. Fitted on GPT-2 small's exact SVDs (one thread): 768x768 0.13 s, 768x2304 0.27 s,
    768x3072 0.33 s, 50257x768 3.8 s, each within 10%; tiny tensors take 2-7 ms."""
    rows, cols = entry.shape[0], math.prod(entry.shape[1:])
    k = min(rows, cols)
    return float(rows) * cols * k + float(k) ** 3 + PER_TENSOR_COST


def hashing_cost(inputs: Inputs, device: str) -> float:
    """Rank 0 hashes the input files (for the manifest) in a thread beside its SVDs; on CPUs that
    takes a share of its core, in svd_cost's units: sha256 ran at 1.4 ns a byte here, an SVD at
    0.14 ns a unit, so a byte counts as HASH_COST_PER_BYTE units. On GPUs it costs the SVDs nothing,
    and a file the hash cache remembers costs nothing anywhere."""
    if not device.startswith("cpu"):
        return 0.0
    files = [file for file in inputs.hashed_files() if remembered(file) is None]
    return HASH_COST_PER_BYTE * sum(Path(file).stat().st_size for file in files)


def share_out(work: list[tuple[int, TensorPlan]], size: int, head_start: float = 0.0) -> dict[int, int]:
    """Plan index -> the rank that computes it. The tensors to factorize go, a hint chain at a time
    (``execution.HintChains``: up to HINT_CHAIN same-shape updates that hand on the adaptive engine's
    basis size, so they must be computed together, in plan order), largest first to the least
    loaded rank (LPT: the busiest rank ends at most one chain's work above the mean); rank 0 starts
    with ``head_start`` (its hashing). The tensors stored whole go to rank 0, which copies them into
    the file without computing."""
    owners = {index: 0 for index, entry in work if entry.action != "factorize"}
    chains = HintChains(work).chain
    members: dict[tuple, list[int]] = {}
    costs: dict[tuple, float] = {}
    for index, entry in work:
        if entry.action == "factorize":
            members.setdefault(chains[index], []).append(index)
            costs[chains[index]] = costs.get(chains[index], 0.0) + svd_cost(entry)
    loads = [0.0] * size
    loads[0] = head_start
    for chain in sorted(members, key=lambda key: (-costs[key], members[key][0])):
        rank = min(range(size), key=lambda candidate: (loads[candidate], candidate))
        for index in members[chain]:
            owners[index] = rank
        loads[rank] += costs[chain]
    return owners


def plan_digest(plan: Plan) -> str:
    """What every process must agree on: each tensor's name, action, shape and dtype."""
    listing = [(entry.name, entry.action, list(entry.shape), dtype_name(entry.dtype)) for entry in plan.entries]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
