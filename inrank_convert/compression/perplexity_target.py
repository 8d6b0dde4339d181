"""compress to a perplexity target (``--max-perplexity-increase P --eval-text TEXT``): the smallest
artifact whose perplexity on the eval text is within P percent of the dense model's.

The spectra are read once (compress.CompressionJob); each step of the search allocates a byte
target from them, writes a candidate artifact beside the output, loads it and measures it on the
same tokens and windows as the dense model. The search is a bisection on the logarithm of the
target between the least the tensors need and the dense bytes (or ``--target-ratio`` /
``--target-size`` when given beside it: the largest size accepted), until the bracket is within
``RELATIVE_TOLERANCE`` or ``MAX_STEPS`` candidates were measured. The smallest candidate within
the target becomes the output, with the search recorded in its manifest (``perplexity_target``).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from inrank_convert.artifact import artifact_bytes, read_manifest, rewrite_manifest
from inrank_convert.compression.calibrate_checkpoint import trained_config, trained_tokens
from inrank_convert.compression.job import (
    CalibrationRequest,
    CompressionJob,
    check_options,
    check_target_options,
)
from inrank_convert.compression.plan import PlanOptions
from inrank_convert.compression.results import CompressResult, LayerResult
from inrank_convert.compression.targets import check_target
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.inputs.text import read_text
from inrank_convert.runtime.evaluate import checkpoint_perplexity, window_length
from inrank_convert.weights.outputs import atomic_output_dir, claimed_output

RELATIVE_TOLERANCE = 0.02  # stop when the passing and failing targets are within 2% of each other
MAX_STEPS = 12


@dataclass
class SearchStep:
    """One candidate of the search: its byte target, its artifact's bytes and perplexity."""

    target_bytes: int
    bytes: int
    perplexity: float
    increase_percent: float
    within: bool

    def to_json(self) -> dict:
        return {"target_bytes": self.target_bytes, "bytes": self.bytes, "perplexity": self.perplexity,
                "increase_percent": self.increase_percent, "within": self.within}


@dataclass
class PerplexityTargetResult:
    compress: CompressResult
    max_increase_percent: float
    dense_perplexity: float
    perplexity: float
    increase_percent: float
    eval_tokens: int
    steps: list[SearchStep] = field(default_factory=list)

    @property
    def failed_below(self) -> int | None:
        """The largest target measured above the limit (None if none was)."""
        failed = [step.target_bytes for step in self.steps if not step.within]
        return max(failed) if failed else None

    def to_json(self) -> dict:
        return {**self.compress.to_json(), "max_increase_percent": self.max_increase_percent,
                "dense_perplexity": self.dense_perplexity, "perplexity": self.perplexity,
                "increase_percent": self.increase_percent, "eval_tokens": self.eval_tokens,
                "failed_below_bytes": self.failed_below, "steps": [step.to_json() for step in self.steps]}


def _short(value: float) -> float:
    """Six significant digits: what the manifest records (and what its header bound assumes)."""
    return float(f"{value:.6g}")


def search_record(max_increase: float, text_sha256: str, tokens: int, dense: float, found: float, target: int,
                  steps: int) -> dict:
    """The manifest's ``perplexity_target`` record."""
    return {"max_increase_percent": _short(max_increase), "eval_text_sha256": text_sha256, "eval_tokens": tokens,
            "dense_perplexity": _short(dense), "perplexity": _short(found),
            "increase_percent": _short(100.0 * (found / dense - 1.0)), "target_bytes": target, "steps": steps}


def _longest_record(max_increase: float, tokens: int, original_bytes: int) -> dict:
    """A record at least as long as any the search can write (it bounds the header)."""
    longest = -1.23456e-100  # the longest float six significant digits print as
    return {"max_increase_percent": _short(max_increase), "eval_text_sha256": "f" * 64, "eval_tokens": tokens,
            "dense_perplexity": longest, "perplexity": longest, "increase_percent": longest,
            "target_bytes": original_bytes, "steps": MAX_STEPS + 1}


def check_search_options(max_increase: float, options: PlanOptions) -> None:
    if not (math.isfinite(max_increase) and max_increase > 0.0):
        raise UsageError(f"the perplexity increase must be a positive percentage, got {max_increase:g}",
                         flag("--max-perplexity-increase"), f"e.g. {flag('--max-perplexity-increase')} 1 (one percent)")
    if options.rule.fixed_rank is not None:
        raise UsageError(f"{flag('--max-perplexity-increase')} allocates the ranks, but {flag('--rank')} fixes them",
                         flag("--rank"), "pass only one of them")


def compress_to_perplexity(source: str | Path, output: str | Path, *, max_increase: float, eval_text: str | Path,
                           eval_tokens: int | None = None, tokenizer: str | Path | None = None,
                           init: str | Path | None = None, init_seed: int | None = None, no_init: bool = False,
                           embed_init: bool = False, options: PlanOptions | None = None, force: bool = False,
                           calibration: CalibrationRequest | None = None,
                           on_stage: Callable[[str], None] | None = None,
                           on_step: Callable[[SearchStep], None] | None = None,
                           on_layer: Callable[[LayerResult], None] | None = None) -> PerplexityTargetResult:
    """The smallest artifact of ``source`` whose perplexity on ``eval_text`` is at most
    ``max_increase`` percent above the dense model's, written to ``output``."""
    options = options or PlanOptions()
    check_options(options)
    check_search_options(max_increase, options)
    check_target_options(options, embed_init, calibration, searched=True)
    output = Path(output)
    text = read_text(eval_text)  # missing, empty or binary text fails before any model is read
    text_sha256 = hashlib.sha256(text.encode()).hexdigest()
    device = options.device

    def stage(label: str) -> None:
        if on_stage is not None:
            on_stage(label)

    with claimed_output(output, force, (source, init)):  # checked and locked before any work
        with CompressionJob(source, init=init, init_seed=init_seed, no_init=no_init, embed_init=embed_init,
                            options=options, calibration=calibration, on_stage=on_stage) as job:
            config = trained_config(job.inputs, "the perplexity target", f"pass {flag('--target-ratio')}")
            tokens = trained_tokens(job.inputs, text, tokenizer, eval_tokens, f"{flag('--eval-text')} {eval_text}")
            context = window_length(config)
            stage("measuring the dense model")
            dense = checkpoint_perplexity(job.inputs.trained.path, tokens, context, device, config)
            limit = dense * (1.0 + max_increase / 100.0)
            longest = _longest_record(max_increase, tokens.numel(), job.plan.original_bytes)
            # --target-ratio / --target-size beside the perplexity target is the largest size accepted.
            ceiling = job.default_target()
            high = ceiling if ceiling is not None else job.plan.original_bytes
            low = job.minimum_bytes(longest)
            check_target(job.spectra(), job.plan, options, high, job.header(high, longest))
            steps: list[SearchStep] = []
            best: tuple[SearchStep, Path, CompressResult] | None = None
            search_root = Path(tempfile.mkdtemp(prefix=".inrank-search-", dir=output.absolute().parent))
            try:
                def measure(target: int) -> SearchStep:
                    nonlocal best
                    folder = search_root / f"candidate-{len(steps)}"
                    stage(f"candidate {len(steps) + 1}: {target} bytes")
                    result = job.write(folder, target, perplexity_target=longest, on_layer=on_layer)
                    found = checkpoint_perplexity(folder, tokens, context, device)
                    step = SearchStep(target, result.compressed_bytes, found, 100.0 * (found / dense - 1.0), found <= limit)
                    steps.append(step)
                    if on_step is not None:
                        on_step(step)
                    if step.within and (best is None or step.bytes < best[0].bytes):
                        if best is not None:
                            shutil.rmtree(best[1], ignore_errors=True)
                        best = (step, folder, result)
                    else:
                        shutil.rmtree(folder, ignore_errors=True)
                    return step

                passing = None
                while len(steps) < MAX_STEPS and (passing is None or passing / low > 1.0 + RELATIVE_TOLERANCE):
                    upper = passing if passing is not None else high
                    target = max(low, min(upper, int(math.sqrt(low * upper))))
                    if target in {step.target_bytes for step in steps}:
                        break
                    if measure(target).within:
                        passing = target
                    else:
                        low = target
                if best is None:
                    if high not in {step.target_bytes for step in steps}:
                        measure(high)
                    if best is None:
                        closest = min(steps, key=lambda step: step.perplexity)
                        which = "--target-ratio" if options.target_ratio is not None else "--target-size"
                        limit_note = f" within {flag(which)}'s {high} bytes" if ceiling is not None else ""
                        raise UsageError(f"no size{limit_note} keeps the perplexity within +{max_increase:g}%: the best "
                                         f"found is {closest.bytes} bytes at {closest.increase_percent:+.3f}% "
                                         f"({closest.perplexity:.4g} against the dense {dense:.4g})",
                                         f"{flag('--max-perplexity-increase')} {max_increase:g}",
                                         f"allow at least {math.ceil(closest.increase_percent * 100) / 100:g}%"
                                         + (f", or raise {flag(which)}" if ceiling is not None else ""))
                step, folder, result = best
                record = search_record(max_increase, text_sha256, tokens.numel(), dense, step.perplexity,
                                       step.target_bytes, len(steps))
                manifest = read_manifest(folder)
                manifest.perplexity_target = record
                rewrite_manifest(folder, manifest)
                with atomic_output_dir(output, force, job.inputs.paths) as temp:
                    for item in folder.iterdir():
                        os.replace(item, temp / item.name)
            finally:
                shutil.rmtree(search_root, ignore_errors=True)
    result.output = output
    result.manifest = read_manifest(output)
    result.compressed_bytes = artifact_bytes(output)
    return PerplexityTargetResult(result, max_increase, dense, step.perplexity, step.increase_percent,
                                  tokens.numel(), steps)
