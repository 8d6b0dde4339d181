"""``sweep CKPT --data TEXT``: the whole size/perplexity trade-off of one checkpoint in one table.

Every setting is compressed into a temporary artifact, loaded and measured on the same tokens and
windows as the dense model, then deleted: per-tensor thresholds (``-t``), global size budgets
(``--target-ratio``), each in bfloat16 (``--quantize none``) and in int8 (compress's default storage),
optionally in int4 (``--quantize int4``) and, budgets only, in mixed precision (``--quantize mixed``:
the budget chooses each component's bits, so it has no per-tensor threshold), and the budgets again
calibrated (``--calibrate``) when a calibration text is given. The calibration runs once; each
size budget's spectra are read once per storage and reused for every ratio. A row's numbers are
those ``compress`` with the same flags followed by ``report --data`` give.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from inrank_convert.artifact import artifact_bytes, read_manifest
from inrank_convert.artifact.storage import NO_QUANTIZATION
from inrank_convert.compression.calibrate_checkpoint import trained_config, trained_tokens
from inrank_convert.compression.job import CalibrationRequest, CompressionJob, check_options
from inrank_convert.compression.plan import LOSSY_FLOAT_STORAGE, PlanOptions
from inrank_convert.core.distributed import check_device
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.inputs.text import read_text
from inrank_convert.linalg.criteria import RankRule
from inrank_convert.runtime.evaluate import checkpoint_perplexity, window_length

DEFAULT_THRESHOLDS = (0.8, 0.9, 0.95, 0.99)
DEFAULT_RATIOS = (0.03, 0.05, 0.1, 0.2)
STORAGES = (NO_QUANTIZATION, "int8")  # bfloat16 factors (--quantize none), then int8 (compress's default)


@dataclass(frozen=True)
class SweepSetting:
    """One compress setting: a per-tensor threshold, or a size budget (maybe calibrated), in a storage."""

    kind: str  # "threshold" | "budget"
    value: float  # the threshold, or the target ratio
    quantize: str = NO_QUANTIZATION  # compress --quantize: none (bfloat16), int8, int4 or mixed
    calibrated: bool = False

    @property
    def label(self) -> str:
        base = f"-t {self.value:g}" if self.kind == "threshold" else f"--target-ratio {self.value:g}"
        return base + f" --quantize {self.quantize}" + (" --calibrate" if self.calibrated else "")

    @property
    def series(self) -> str:
        """The curve this setting belongs to in the plot."""
        base = "per-tensor threshold" if self.kind == "threshold" else \
            "budget, calibrated" if self.calibrated else "budget"
        return f"{base}, {LOSSY_FLOAT_STORAGE if self.quantize == NO_QUANTIZATION else self.quantize}"


@dataclass
class SweepRow:
    setting: SweepSetting
    bytes: int
    ratio: float
    perplexity: float
    increase_percent: float

    def to_json(self) -> dict:
        return {"setting": self.setting.label, "series": self.setting.series, "kind": self.setting.kind,
                "value": self.setting.value, "quantize": self.setting.quantize, "calibrated": self.setting.calibrated,
                "bytes": self.bytes, "ratio": self.ratio, "perplexity": self.perplexity,
                "increase_percent": self.increase_percent}


@dataclass
class SweepResult:
    source: str
    data: str
    tokens: int
    window: int
    dense_bytes: int
    dense_perplexity: float
    rows: list[SweepRow] = field(default_factory=list)
    calibration: dict | None = None

    def to_json(self) -> dict:
        return {"source": self.source, "data": self.data, "tokens": self.tokens, "window": self.window,
                "dense_bytes": self.dense_bytes, "dense_perplexity": self.dense_perplexity,
                "calibration": self.calibration, "rows": [row.to_json() for row in self.rows]}


def sweep_settings(thresholds: Sequence[float], ratios: Sequence[float], calibrated: bool,
                   storages: Sequence[str] = STORAGES) -> list[SweepSetting]:
    # mixed needs a size budget to choose its bits by: no threshold rows.
    settings = [SweepSetting("threshold", t, q) for q in storages if q != "mixed" for t in thresholds]
    settings += [SweepSetting("budget", r, q) for q in storages for r in ratios]
    if calibrated:
        settings += [SweepSetting("budget", r, q, True) for q in storages for r in ratios]
    return settings


def _check_values(values: Sequence[float], name: str) -> None:
    for value in values:
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise UsageError(f"every {flag(name)} value must be in (0, 1], got {value:g}", flag(name),
                             f"e.g. {flag(name)} 0.9")


def sweep(source: str | Path, data: str | Path, *, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
          ratios: Sequence[float] = DEFAULT_RATIOS, storages: Sequence[str] = STORAGES,
          calibration: CalibrationRequest | None = None, max_tokens: int | None = None,
          tokenizer: str | Path | None = None, init: str | Path | None = None, init_seed: int | None = None,
          no_init: bool = False, options: PlanOptions | None = None,
          on_row: Callable[[SweepRow], None] | None = None,
          on_stage: Callable[[str], None] | None = None) -> SweepResult:
    """Compress ``source`` at every setting and measure each artifact's perplexity on ``data``."""
    base = options or PlanOptions()
    check_device(base.device)
    _check_values(thresholds, "--thresholds")
    _check_values(ratios, "--ratios")
    if not thresholds and not ratios:
        raise UsageError("nothing to sweep: no thresholds and no ratios", flag("--ratios"),
                         f"pass {flag('--thresholds')} or {flag('--ratios')} values")
    text = read_text(data)  # missing, empty or binary text fails before any model is read
    settings = sweep_settings(thresholds, ratios if ratios else (), calibration is not None and bool(ratios), storages)

    def stage(label: str) -> None:
        if on_stage is not None:
            on_stage(label)

    def options_for(setting: SweepSetting) -> PlanOptions:
        if setting.kind == "threshold":
            chosen = replace(base, rule=RankRule(base.rule.criterion, setting.value), quantize=setting.quantize)
        else:
            chosen = replace(base, target_ratio=setting.value, quantize=setting.quantize)
        check_options(chosen)
        return chosen

    for setting in settings:
        options_for(setting)  # every setting valid before any work
    workdir = Path(tempfile.mkdtemp(prefix="inrank-sweep-"))
    jobs: dict[tuple, CompressionJob] = {}
    try:
        def job_for(setting: SweepSetting, chosen: PlanOptions) -> CompressionJob:
            # A size budget's spectra depend on the storage (the bytes of a unit) and the calibration,
            # not on the ratio: one job per (storage, calibrated) serves every ratio.
            key = ("budget", setting.quantize, setting.calibrated) if setting.kind == "budget" else \
                ("threshold", setting.quantize, setting.value)
            if key not in jobs:
                stats = next((job.stats for job in jobs.values() if job.stats is not None), None)
                jobs[key] = CompressionJob(source, init=init, init_seed=init_seed, no_init=no_init, options=chosen,
                                           calibration=calibration if setting.calibrated else None,
                                           stats=stats if setting.calibrated else None, on_stage=on_stage)
            return jobs[key]

        first = job_for(settings[0], options_for(settings[0]))
        config = trained_config(first.inputs, "sweep", "compress it first and sweep the artifact")
        tokens = trained_tokens(first.inputs, text, tokenizer, max_tokens, str(data))
        window = window_length(config)
        stage("measuring the dense model")
        dense = checkpoint_perplexity(first.inputs.trained.path, tokens, window, base.device, config)
        result = SweepResult(str(source), str(data), int(tokens.numel()), window, first.plan.original_bytes, dense)
        for index, setting in enumerate(settings):
            chosen = options_for(setting)
            job = job_for(setting, chosen)
            if setting.kind == "threshold":
                target = None
            else:
                job.options = chosen  # same spectra: only the ratio differs
                target = job.default_target()
            stage(f"{setting.label}")
            folder = workdir / f"setting-{index}"
            job.write(folder, target)
            if job.stats is not None and result.calibration is None:
                result.calibration = read_manifest(folder).calibration
            found = checkpoint_perplexity(folder, tokens, window, base.device)
            size = artifact_bytes(folder)
            row = SweepRow(setting, size, size / result.dense_bytes, found, 100.0 * (found / dense - 1.0))
            result.rows.append(row)
            if on_row is not None:
                on_row(row)
            shutil.rmtree(folder, ignore_errors=True)
            if setting.kind == "threshold":
                jobs.pop(("threshold", setting.quantize, setting.value)).close()
        return result
    finally:
        for job in jobs.values():
            job.close()
        shutil.rmtree(workdir, ignore_errors=True)
