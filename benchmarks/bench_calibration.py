"""Benchmark 7: what calibration costs (issue 11): the time of ``compress --calibrate`` spent on
calibration (reading and tokenizing the text, loading the model, one forward over 65,536 tokens
collecting every layer's input Gram) against the time of ``compress`` without it, at the same
``--target-ratio 0.1``, on a GPT-2-small-shaped pair (benchmark 1's: init + planted rank-32
updates, 124M parameters, context 1024). Target: calibration <= 1x compress.

The calibration text is Tiny Shakespeare under the GPT-2 tokenizer (copied beside the trained
model, as a Hugging Face folder has it). What calibration buys is measured by benchmark 6
(``compression``) on a real run. Skipped without ../shared/data.
"""

from __future__ import annotations

import shutil
import time

from .bench_compress import build_pair
from .bench_compression import TEXT, TOKENIZER
from .common import BenchResult, fmt_seconds, log, scratch_dir, warm_page_cache

NAME = "calibration"
TARGET_RATIO = 1.0
CALIB_TOKENS = 65_536
BUDGET = 0.1


def skip_reason() -> str | None:
    needed = [TOKENIZER / "vocab.json", TOKENIZER / "merges.txt", TEXT]
    missing = [str(path) for path in needed if not path.is_file()]
    return f"needs ../shared/data: {', '.join(missing)} not found" if missing else None


def run() -> list[BenchResult]:
    from inrank_convert import PlanOptions
    from inrank_convert.compression.job import CalibrationRequest, CompressionJob, compress

    with scratch_dir("inrank-bench-calibration-") as root:
        init_dir, trained_dir, parameters = build_pair(root)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(TOKENIZER / name, trained_dir / name)
        warm_page_cache(*init_dir.glob("*.safetensors"), *trained_dir.glob("*.safetensors"))
        options = PlanOptions(target_ratio=BUDGET, quantize="none")  # the documented figures: bfloat16
        started = time.perf_counter()
        plain = compress(trained_dir, root / "plain", init=init_dir, options=options)
        compress_seconds = time.perf_counter() - started
        log(f"compress --target-ratio {BUDGET}: {compress_seconds:.1f} s, {plain.ratio:.2%} of dense")
        started = time.perf_counter()
        with CompressionJob(trained_dir, init=init_dir, options=options,
                            calibration=CalibrationRequest(TEXT, CALIB_TOKENS)) as job:
            calibration_seconds = job.calibration_seconds
            record = job.calibration_record()
        job_seconds = time.perf_counter() - started
        log(f"calibration on {record['tokens']} tokens ({record['windows']} windows of {record['window']}, "
            f"{record['layers']} layers): {calibration_seconds:.1f} s (job opened in {job_seconds:.1f} s)")
    ratio = calibration_seconds / compress_seconds
    details = {"parameters": parameters, "tokens": record["tokens"], "window": record["window"],
               "layers": record["layers"], "calibration_seconds": calibration_seconds,
               "compress_seconds": compress_seconds, "budget": BUDGET}
    return [BenchResult(f"calibration of GPT-2 small on {CALIB_TOKENS} tokens (CPU)", fmt_seconds([calibration_seconds]),
                        f"compress --target-ratio {BUDGET} {fmt_seconds([compress_seconds])}", ratio,
                        "calibration / compress", f"<= {TARGET_RATIO:g}", ratio <= TARGET_RATIO, details)]
