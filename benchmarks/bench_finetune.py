"""Benchmark: a fine-tune's delta at 1/16 of its bfloat16 bytes, in every storage, plain and calibrated.

A 4x256 LLaMA (untied head, context 64) with a byte-level BPE of 4,096 tokens trained on both texts
is trained dense from scratch on WikiText-2 valid (the base, ``BASE_STEPS``), then fine-tuned from
it on the first 90% of Tiny Shakespeare (cut at a line end; ``FT_STEPS``, lr 1e-3). The fine-tune
is compressed against the base to ``--target-ratio 0.03125`` (3.125% of its float32 bytes: 1/16 of
its bfloat16 bytes) in bfloat16, int8, int4 and mixed precision, each plain and ``--calibrate``-d on its training
text (65,536 tokens), and one ``report`` scores the fine-tune, the base and every artifact on the
first 16,384 tokens of the held-out 10%. Where mergekit's environment exists (``make bench-peers``),
``mergekit-extract-lora`` runs beside it at the largest rank whose adapter fits the bytes of the
calibrated mixed-precision artifact (benchmarks/peer_mergekit.py): a comparison at equal bytes.

The calibrated int4 and mixed artifacts are made once more with ``--distill-scales 100`` (their
scales trained on the fine-tune's logits on the calibration text, in the same bytes).

Targets: calibrated mixed precision within +1% of the fine-tune's perplexity; in every storage, calibrated no
worse than plain at the same bytes; distilled no worse than calibrated. Skipped without ../shared/data.
About 18 minutes on 2 cores.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from . import peer_mergekit
from .common import BenchResult, log, no_worse, scratch_dir

NAME = "finetune"
TIMED = False  # bytes and perplexity
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BASE_TEXT = DATA / "wikitext-2-raw" / "wiki.valid.raw"
FT_TEXT = DATA / "tinyshakespeare" / "input.txt"
VOCAB, BLOCK, BATCH = 4096, 64, 16
BASE_STEPS, FT_STEPS, BASE_LR, FT_LR, SEED = 300, 150, 3e-3, 1e-3, 0
RATIO = 1 / 32  # of the fine-tune's float32 bytes: 1/16 of its bfloat16 bytes
STORAGES = ("none", "int8", "int4", "mixed")  # --quantize
DISTILLED, DISTILL_STEPS = ("int4", "mixed"), 100  # calibrated storages made again with --distill-scales
CALIBRATION_TOKENS, EVAL_TOKENS = 65_536, 16_384
MAX_CHANGE = 1.0  # % over the fine-tune's perplexity, of BEST
BEST = "mixed-calibrated"  # the headline setting, and the bytes mergekit gets


def skip_reason() -> str | None:
    missing = [str(path) for path in (BASE_TEXT, FT_TEXT) if not path.is_file()]
    return f"needs {', '.join(missing)}" if missing else None


def prepare(root: Path) -> tuple[Path, Path, Path, Path]:
    """(tokenizer folder, config folder, fine-tune training text, held-out text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig

    text = FT_TEXT.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    train_file, held_out = root / "ft-train.txt", root / "ft-val.txt"
    train_file.write_text(text[:cut], encoding="utf-8")
    held_out.write_text(text[cut:], encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([BASE_TEXT.read_text(encoding="utf-8"), text[:cut]], trainer)
    folder = root / "tokenizer"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = root / "config"
    LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=BLOCK,
                tie_word_embeddings=False).save_pretrained(config)
    return folder, config, train_file, held_out


def last_step(run: Path) -> Path:
    return max(run.glob("step-*"), key=lambda path: int(path.name.split("-")[1]))


def run() -> list[BenchResult]:
    from inrank_convert import PlanOptions, TrainOptions, compress, train
    from inrank_convert.compression.job import CalibrationRequest
    from inrank_convert.measure.report import report

    with scratch_dir("inrank-bench-finetune-") as root:
        tokenizer, config, train_file, held_out = prepare(root)
        started = time.perf_counter()
        train(config, root / "base", TrainOptions(data=str(BASE_TEXT), steps=BASE_STEPS, batch_size=BATCH,
                                                  block_size=BLOCK, lr=BASE_LR, seed=SEED, tokenizer=str(tokenizer),
                                                  log_every=BASE_STEPS))
        base = last_step(root / "base")
        train(base, root / "ft", TrainOptions(data=str(train_file), steps=FT_STEPS, batch_size=BATCH, block_size=BLOCK,
                                              lr=FT_LR, seed=SEED + 1, tokenizer=str(tokenizer), log_every=FT_STEPS))
        finetune = last_step(root / "ft")
        log(f"base {BASE_STEPS} + fine-tune {FT_STEPS} steps in {time.perf_counter() - started:.0f} s")
        calibration = CalibrationRequest(train_file, CALIBRATION_TOKENS)
        outputs, results_by_label = {}, {}
        for storage in STORAGES:
            for calibrated in (False, True):
                label = f"{storage}-{'calibrated' if calibrated else 'plain'}"
                result = compress(finetune, root / label, init=base,
                                  options=PlanOptions(target_ratio=RATIO, quantize=storage),
                                  calibration=calibration if calibrated else None)
                log(f"{label:18s} {result.ratio:7.2%} of the fine-tune in {result.seconds:.1f} s")
                outputs[label] = root / label
                results_by_label[label] = result
        for storage in DISTILLED:
            label = f"{storage}-distilled"
            result = compress(finetune, root / label, init=base, options=PlanOptions(target_ratio=RATIO, quantize=storage),
                              calibration=replace(calibration, distill_steps=DISTILL_STEPS))
            log(f"{label:18s} {result.ratio:7.2%} of the fine-tune in {result.seconds:.1f} s: "
                f"{result.manifest.calibration['distill']}")
            outputs[label] = root / label
        peers = peer_mergekit.prepare(root, finetune, base, results_by_label[BEST].compressed_bytes)
        measured = report(outputs[BEST], held_out, also=[base, *(path for label, path in outputs.items()
                                                                 if label != BEST),
                                                                      *(peer["folder"] for peer in peers.values())],
                          max_tokens=EVAL_TOKENS)
    original = measured.row("original")
    by_path = {Path(row.path).name: row for row in measured.models}
    base_row = by_path[base.name]
    details = {"base_steps": BASE_STEPS, "ft_steps": FT_STEPS, "ratio": RATIO, "tokens": measured.text_tokens,
               "finetune_perplexity": original.result.perplexity, "base_perplexity": base_row.result.perplexity,
               "models": {name: {"bytes": row.bytes, "ratio": row.ratio, "perplexity": row.result.perplexity,
                                 "change_percent": row.change_percent} for name, row in by_path.items()}}
    baseline = (f"fine-tune ppl {original.result.perplexity:.2f} (base {base_row.result.perplexity:.2f}), "
                f"{RATIO:.3%} of its bytes")
    best = by_path[BEST]
    results = [BenchResult("fine-tune delta at 1/16 of bf16: --quantize mixed --calibrate",
                           f"{best.ratio:.2%} of the fine-tune, ppl {best.result.perplexity:.2f} "
                           f"({best.change_percent:+.2f}%)", baseline, best.ratio, "artifact / fine-tune bytes",
                           f"<= +{MAX_CHANGE:g}% ppl", best.change_percent <= MAX_CHANGE, details)]
    for label, peer in peers.items():  # at equal bytes: the adapter's, not the merged checkpoint's
        row = by_path[label]
        ratio = peer["adapter_bytes"] / original.bytes
        details["models"][label] = {"bytes": peer["adapter_bytes"], "ratio": ratio, "rank": peer["rank"],
                                    "perplexity": row.result.perplexity, "change_percent": row.change_percent,
                                    "seconds": peer["seconds"]}
        results.append(BenchResult(
            f"fine-tune delta vs {label} (rank {peer['rank']}) at equal bytes",
            f"--quantize mixed --calibrate {best.change_percent:+.2f}% ({best.ratio:.2%})",
            f"{label} {row.change_percent:+.2f}% ({ratio:.2%})", best.result.perplexity / row.result.perplexity,
            "this tool / mergekit ppl", "<= 1", best.result.perplexity <= row.result.perplexity, details))
    for storage in STORAGES:
        results.append(no_worse(f"fine-tune delta, --quantize {storage}: --calibrate vs plain", "calibrated",
                                by_path[f"{storage}-calibrated"], "plain", by_path[f"{storage}-plain"], details))
    for storage in DISTILLED:
        results.append(no_worse(f"fine-tune delta, --quantize {storage} --calibrate: --distill-scales {DISTILL_STEPS} "
                                "vs without", "distilled", by_path[f"{storage}-distilled"], "calibrated",
                                by_path[f"{storage}-calibrated"], details))
    return results
