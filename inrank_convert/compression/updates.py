"""The update of one planned tensor, streamed from the inputs: ``delta = W - W_ref`` in float32 and
its exact energy, with a clear error for NaN/Inf; and the plan's work in order, with read-ahead.
compress, its size-target pass (targets.py) and ``spectrum`` all read updates through here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from inrank_convert.compression.plan import Plan, TensorPlan
from inrank_convert.core.errors import NonFiniteError
from inrank_convert.core.tensors import is_finite
from inrank_convert.inputs.sources import Inputs
from inrank_convert.linalg.criteria import frobenius_energy


def raise_non_finite(inputs: Inputs, name: str) -> None:
    """Name the checkpoint that holds NaN/Inf (a full check, run only once a cheap one failed)."""
    weight = inputs.trained.get(name)
    if not is_finite(weight):
        raise NonFiniteError(f"tensor {name!r} holds NaN or Inf", str(inputs.trained.path),
                             "this checkpoint is broken (diverged training?): use an earlier one")
    reference = inputs.reference.get(name)
    where = getattr(getattr(inputs.reference, "checkpoint", None), "path", f"the {inputs.reference.mode} init")
    if reference is not None and not is_finite(reference):
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
        raise_non_finite(inputs, entry.name)
    return delta, total


def planned_entries(plan: Plan, actions: tuple[str, ...] = ("factorize", "dense")) -> list[tuple[int, TensorPlan]]:
    """(index, entry) of the plan entries to execute, in order. The index seeds the tensor's random
    generator (seed + index), so a tensor's result does not depend on who computes it, or when."""
    return list(enumerate(entry for entry in plan.entries if entry.action in actions))


def prefetch(inputs: Inputs, entry: TensorPlan) -> None:
    """Ask the kernel to start reading ``entry``'s tensors (posix_fadvise): no mapping, no copy."""
    inputs.trained.prefetch(entry.name)
    if entry.action == "factorize":
        inputs.reference.prefetch(entry.name)


def planned_work(plan: Plan, inputs: Inputs, actions: tuple[str, ...] = ("factorize", "dense")
                 ) -> Iterator[tuple[int, TensorPlan]]:
    """``planned_entries``, handed out one at a time (``prefetching``)."""
    return prefetching(inputs, planned_entries(plan, actions))


def prefetching(inputs: Inputs, work: list[tuple[int, TensorPlan]]) -> Iterator[tuple[int, TensorPlan]]:
    """``work`` one entry at a time; before each it prefetches the next one's tensors, so disk
    reads overlap the current SVD."""
    for position, (index, entry) in enumerate(work):
        if position + 1 < len(work):
            prefetch(inputs, work[position + 1][1])
        yield index, entry
