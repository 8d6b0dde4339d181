"""A global size budget: how many singular components (and rows) each tensor gets so that the
stored bytes fit a budget and the relative error removed is as large as a greedy rule can make it.

Pure arithmetic on small lists: no tensors, no files. Each tensor is described by its *units*,
in the order they must be taken (a unit is only worth taking after the ones before it):

- a low-rank tensor: its singular components, gain s_i^2 / ||delta||_F^2 (relative energy, so
  layers of any size and scale compare), each costing (rows + cols) stored numbers (+ a scale);
- a low rank + rows tensor: its dominant component (``lead`` = 1), then the residual's rows by
  decreasing energy, each costing cols numbers + its index (+ a scale). Rows that must be stored
  anyway (a grown vocabulary's) are the tensor's ``fixed`` cost.

- a tensor whose components may each take one of several precisions (mixed storage): its
  ``band_chain``, a sequence of moves (take the next component at some width, or widen the first
  component of a band), each a unit with its own gain and cost.

Each tensor may instead be stored whole (``dense`` bytes, all its energy). Greedy: walk the upper
concave hull of every tensor's (bytes, gain) curve, the dense point included, and repeatedly take
the hull step with the most gain per byte that still fits; a step that does not fit is replaced by
as many of its units as fit, and that tensor gets nothing more. The gains of a tensor's units are
non-increasing for singular components, so the hull of a plain spectrum is the spectrum itself.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise


class BudgetTooSmall(ValueError):  # noqa: N818 - a condition, named as the caller reports it
    """The budget is below what the tensors need at the least (``minimum`` bytes)."""

    def __init__(self, budget: int, minimum: int):
        super().__init__(f"a budget of {budget} bytes is below the {minimum} bytes the tensors need at the least")
        self.budget = budget
        self.minimum = minimum


@dataclass(frozen=True)
class TensorUnits:
    """One tensor's units: ``gains[i]`` for unit i, costing ``lead_cost`` bytes for i < ``lead``
    (``head_costs[i]`` instead for the first of them: components stored at more bits) and
    ``unit_cost`` after; ``fixed`` bytes (and ``fixed_gain``) always paid unless stored dense;
    ``dense`` bytes for the whole tensor, which keeps ``dense_gain`` (1.0: all of its energy)."""

    gains: tuple[float, ...]
    lead: int
    lead_cost: int
    unit_cost: int
    dense: int
    fixed: int = 0
    fixed_gain: float = 0.0
    dense_gain: float = 1.0
    head_costs: tuple[int, ...] = ()

    def unit_cost_at(self, index: int) -> int:
        """Bytes of unit ``index``."""
        if index < self.lead:
            return self.head_costs[index] if index < len(self.head_costs) else self.lead_cost
        return self.unit_cost

    def cost(self, count: int) -> int:
        """Bytes of the first ``count`` units, the fixed part included."""
        return self.fixed + sum(self.unit_cost_at(index) for index in range(count))

    @property
    def minimum(self) -> int:
        return min(self.fixed, self.dense)


@dataclass(frozen=True)
class Allocation:
    """What a tensor gets: its first ``units`` units, or the whole tensor (``dense``)."""

    units: int
    dense: bool
    bytes: int
    gain: float

    def split(self, lead: int) -> tuple[int, int]:
        """(low-rank components, rows) of the units taken, for a tensor whose first ``lead`` units are components."""
        rank = min(self.units, lead)
        return rank, self.units - rank


def _curve(tensor: TensorUnits) -> tuple[list[int], list[float], int]:
    """Points (bytes, gain) after 0, 1, ... units, while cheaper than dense; then the dense point.
    Returns (xs, ys, count of unit points)."""
    xs = [tensor.fixed]
    ys = [tensor.fixed_gain]
    unit_costs = (tensor.unit_cost_at(index) for index in range(len(tensor.gains)))
    for total, spent in zip(accumulate(tensor.gains), accumulate(unit_costs), strict=True):
        x = tensor.fixed + spent
        if x >= tensor.dense:
            break
        xs.append(x)
        ys.append(tensor.fixed_gain + total)
    points = len(xs)
    xs.append(tensor.dense)
    ys.append(max(tensor.dense_gain, ys[-1]))
    return xs, ys, points


def _hull(xs: list[int], ys: list[float]) -> list[int]:
    """Indices of the upper concave hull of the points (xs strictly increasing), first to last."""
    hull: list[int] = []
    for index in range(len(xs)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is under the chord a -> index: drop it.
            if (ys[b] - ys[a]) * (xs[index] - xs[a]) <= (ys[index] - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        hull.append(index)
    return hull


def minimum_bytes(tensors: list[TensorUnits]) -> int:
    """The fewest bytes the tensors can be stored in (each at its fixed part, or dense if smaller)."""
    return sum(tensor.minimum for tensor in tensors)


def allocate(tensors: list[TensorUnits], budget: int) -> list[Allocation]:
    """Per tensor, the units it gets (or dense) so that the bytes sum to at most ``budget``.

    Raises BudgetTooSmall when even the minimum does not fit.
    """
    minimum = minimum_bytes(tensors)
    if budget < minimum:
        raise BudgetTooSmall(budget, minimum)
    curves = [_curve(tensor) for tensor in tensors]
    hulls = [_hull(xs, ys) for xs, ys, _ in curves]
    # Every tensor starts at its cheapest point: the fixed part, or dense when that is cheaper.
    state = [0 if tensor.fixed < tensor.dense else len(curves[i][0]) - 1 for i, tensor in enumerate(tensors)]
    position = [0 if state[i] == 0 else len(hulls[i]) - 1 for i in range(len(tensors))]
    left = budget - sum(curves[i][0][state[i]] for i in range(len(tensors)))

    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        hull = hulls[i]
        if position[i] + 1 >= len(hull):
            return
        xs, ys, _ = curves[i]
        a, b = hull[position[i]], hull[position[i] + 1]
        gain = ys[b] - ys[a]
        if gain > 0.0:
            heapq.heappush(heap, (-gain / (xs[b] - xs[a]), i, position[i]))

    for i in range(len(tensors)):
        push(i)
    while heap:
        _, i, at = heapq.heappop(heap)
        xs, ys, points = curves[i]
        a, b = hulls[i][at], hulls[i][at + 1]
        step = xs[b] - xs[a]
        if step <= left:
            left -= step
            state[i], position[i] = b, at + 1
            push(i)
            continue
        # The whole step does not fit: as many of its units as do (never the dense jump), then stop.
        end = a
        while end + 1 < points and xs[end + 1] - xs[a] <= left:
            end += 1
        left -= xs[end] - xs[a]
        state[i] = end
    allocations = []
    for i in range(len(tensors)):
        xs, ys, points = curves[i]
        dense = state[i] == points
        allocations.append(Allocation(0 if dense else state[i], dense, xs[state[i]], ys[state[i]]))
    return allocations


Bands = tuple[tuple[int, int], ...]  # ((bits, components), ...) widest first


@dataclass(frozen=True)
class BandChain:
    """One tensor's precision choices as ``allocate`` takes them: move i gains ``gains[i]`` for
    ``costs[i]`` bytes, and after the first n moves the tensor's components are ``bands[n]``."""

    gains: tuple[float, ...]
    costs: tuple[int, ...]
    bands: tuple[Bands, ...]

    def units(self, dense: int, dense_gain: float = 1.0) -> TensorUnits:
        return TensorUnits(self.gains, len(self.gains), 0, 0, dense, dense_gain=dense_gain, head_costs=self.costs)


def band_chain(gains: Sequence[float], component_bytes: Mapping[int, int], errors: Mapping[int, float],
               limit: int) -> BandChain:
    """The greedy path through one tensor's (component, precision) choices, at most ``limit`` bytes.

    ``gains[i]``: what component i removes stored exactly (non-increasing: a spectrum);
    ``component_bytes[b]`` / ``errors[b]``: the bytes of one component at b bits and the fraction of
    its energy that b-bit codes leave as error. Components are taken in order and their widths never
    grow along it (the bands are widest first), so two moves are open at each step: take the next
    component at a width no wider than the last one's, or widen the first component of a band by
    one width (its largest, so the one that gains most). The move with the most gain per byte is
    taken, until the limit (a tensor's dense bytes) or every component at the widest."""
    widths = sorted(component_bytes, reverse=True)  # widest first
    counts = dict.fromkeys(widths, 0)
    move_gains: list[float] = []
    move_costs: list[int] = []
    chain: list[Bands] = [()]
    spent, taken = 0, 0
    while True:
        best: tuple[float, float, int, int, int] | None = None  # (gain per byte, gain, cost, from, to)
        narrowest = min((bits for bits in widths if counts[bits]), default=widths[0])
        if taken < len(gains):
            for bits in widths:
                if bits <= narrowest:
                    gain, cost = gains[taken] * (1.0 - errors[bits]), component_bytes[bits]
                    if best is None or gain / cost > best[0]:
                        best = (gain / cost, gain, cost, 0, bits)
        before = 0  # components in wider bands: the index of this band's first
        for wider, bits in pairwise(widths):
            before += counts[wider]
            if counts[bits]:
                gain = gains[before] * (errors[bits] - errors[wider])
                cost = component_bytes[wider] - component_bytes[bits]
                if cost > 0 and (best is None or gain / cost > best[0]):
                    best = (gain / cost, gain, cost, bits, wider)
        if best is None or best[1] <= 0.0 or spent + best[2] > limit:
            break
        _, gain, cost, narrow, wide = best
        if narrow:
            counts[narrow] -= 1
        else:
            taken += 1
        counts[wide] += 1
        spent += cost
        move_gains.append(gain)
        move_costs.append(cost)
        chain.append(tuple((bits, counts[bits]) for bits in widths if counts[bits]))
    return BandChain(tuple(move_gains), tuple(move_costs), tuple(chain))
