"""``spectrum``: the singular values of every update and the rank each threshold would give."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from inrank_convert.compression.job import plan_compression
from inrank_convert.compression.plan import Plan, PlanOptions
from inrank_convert.compression.updates import load_update, planned_work
from inrank_convert.core.distributed import check_device
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.inputs.sources import open_inputs
from inrank_convert.linalg.criteria import DEFAULT_CRITERION, RankRule, choose_rank, numerical_args
from inrank_convert.linalg.svd import singular_values

SPECTRUM_VALUES_KEPT = 64


@dataclass
class LayerSpectrum:
    name: str
    shape: tuple[int, ...]
    total_energy: float
    singular_values: list[float]  # the leading SPECTRUM_VALUES_KEPT values
    ranks: dict[float, int]  # threshold -> rank under the chosen criterion

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "frobenius_norm": self.total_energy ** 0.5,
                "full_rank": min(self.shape), "ranks": {f"{t:g}": r for t, r in self.ranks.items()},
                "singular_values": self.singular_values}


@dataclass
class SpectrumResult:
    source: str
    reference_mode: str
    criterion: str
    thresholds: list[float]
    layers: list[LayerSpectrum]

    def to_json(self) -> dict:
        return {"source": self.source, "reference": self.reference_mode, "criterion": self.criterion,
                "thresholds": self.thresholds, "layers": [layer.to_json() for layer in self.layers]}


def parse_thresholds(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise UsageError(f"cannot parse thresholds {text!r}", flag("--thresholds"), f"e.g. {flag('--thresholds')} 0.5,0.8,0.9,0.99") from err
    bad = [v for v in values if not 0.0 < v <= 1.0]
    if not values or bad:
        raise UsageError("thresholds must lie in (0, 1]", flag("--thresholds"), f"e.g. {flag('--thresholds')} 0.5,0.8,0.9,0.99")
    return values


def spectrum_report(source: str | Path, thresholds: list[float], criterion: str = DEFAULT_CRITERION, *,
                    init: str | Path | None = None, init_seed: int | None = None, no_init: bool = False,
                    options: PlanOptions | None = None, on_plan: Callable[[Plan], None] | None = None,
                    on_layer: Callable[[str], None] | None = None) -> SpectrumResult:
    """Exact singular values of every factorizable update (streamed one tensor at a time)."""
    options = options or PlanOptions()
    check_device(options.device)
    inputs = open_inputs(source, init, init_seed, no_init)
    try:
        plan = plan_compression(inputs, options)
        if on_plan is not None:
            on_plan(plan)
        layers = []
        device = torch.device(options.device)
        for _, entry in planned_work(plan, inputs, actions=("factorize",)):
            delta, total = load_update(inputs, entry, device)  # [rows, cols]
            values = singular_values(delta, options.float64).float().cpu()
            # The rank compress keeps for a low-rank form (energy-rest: a dominant component raises the rule).
            # At t = 1 the numerical rank, with the eps of the SVD compress runs (float64 with --float64).
            numerical = numerical_args(delta.shape, torch.float64 if options.float64 else torch.float32)
            ranks = {t: choose_rank(values, total, RankRule(criterion, t), **numerical) for t in thresholds}
            layers.append(LayerSpectrum(entry.name, entry.shape, total, values[:SPECTRUM_VALUES_KEPT].tolist(), ranks))
            if on_layer is not None:
                on_layer(entry.name)
        return SpectrumResult(str(source), inputs.reference.mode, criterion, thresholds, layers)
    finally:
        inputs.close()
