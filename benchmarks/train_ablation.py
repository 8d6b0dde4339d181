"""The low-rank training ablation: one command per row, on the README's setting, and its table.

A 4x128 GPT-2 (GPT-2 tokenizer) from seed 0, 1,000 steps on Tiny Shakespeare up to the first line
end at or after 90% of it (batch 16 x 64, lr 3e-3, cosine to 3e-4, 100 warm-up steps), validation
on the rest every 100 steps (32 windows of 64 tokens). InRank rows add ``--buffer 16 --rank-warmup
50 --rank-every 10`` (sized for a 128-wide model, as the README's runs). The resume rows start from
the dense row's step 500: its t = 0.9 bfloat16 artifact (or compress's default one, the rows named
``resumed-default*``) resumed for 500 steps (lr 1e-3, seed 1), against the same checkpoint trained dense for the same 500 steps on the same tokens.

    python -m benchmarks.train_ablation --out ablation              # every row (hours on 2 CPU cores)
    python -m benchmarks.train_ablation --out ablation dense warm100  # some rows; the table of all done
    python -m benchmarks.train_ablation --list                      # the rows and their commands

Each row is its own run folder under ``--out``; a row already there is not run again. The table
(markdown, also ``table.json``) comes from ``compare-runs`` of each row against its baseline row:
final validation perplexity, its change against the baseline, the total rank of the factorized
layers as a share of their full rank (final, and mean over the logged steps, a dense warm-up's
steps counting as full rank), the parameters the optimizer trained at the end, tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
INRANK = ["--mode", "inrank", "--buffer", "16", "--rank-warmup", "50", "--rank-every", "10"]
REFERENCE = [*INRANK, "--recipe", "reference"]  # the InRank reference's mechanics for what a row leaves unset


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    args: tuple[str, ...] = ()
    kind: str = "train"  # train (from the seed) | resume (the dense row's step-500 artifact) | continue (dense)
    baseline: str = "dense"
    steps: int = 1000  # a train row's steps; the 3x rows see whether the gap shrinks with steps
    artifact: str = "t09"  # a resume row's artifact of the dense step 500 (ARTIFACTS)


ROWS = [
    Row("dense", "dense", ("--save-every", "500")),
    Row("inrank", "`--mode inrank` as the reference has it (W_init + B A, exact growth)", (*REFERENCE,)),
    Row("inrank-lora-orth", "`--mode inrank`, buffer columns that learn (`--growth lora`), orthogonal W_0",
        (*REFERENCE, "--growth", "lora", "--orthogonal-init")),
    Row("efficient", "InRank-Efficient as the reference has it (kaiming factors, random growth)",
        (*REFERENCE, "--efficient")),
    Row("full-kaiming", "control: full-rank B A, kaiming factors", (*REFERENCE, "--efficient", "--initial-rank", "128")),
    Row("full-spectral", "full-rank B A, spectral init (B A = the dense init)",
        (*REFERENCE, "--efficient", "--growth", "exact", "--initial-rank", "128")),
    Row("dense-wd", "dense, weight decay 0.1", ("--weight-decay", "0.1")),
    Row("full-spectral-wd", "full-rank spectral B A, weight decay 0.1 on A and B",
        (*REFERENCE, "--efficient", "--growth", "exact", "--initial-rank", "128", "--weight-decay", "0.1")),
    Row("full-spectral-frob", "full-rank spectral B A, Frobenius decay 0.1 on B A",
        (*REFERENCE, "--efficient", "--growth", "exact", "--initial-rank", "128", "--weight-decay", "0.1",
         "--factor-decay", "frobenius")),
    Row("inrank-resplit", "`--mode inrank --growth lora`, balanced re-split and fresh moments at every growth",
        (*REFERENCE, "--growth", "lora", "--on-growth", "resplit")),
    Row("warm100", "dense 100 steps, then compress (inrank criterion, t = 0.9) and go on low rank, lora growth",
        (*REFERENCE, "--dense-warmup", "100", "--growth", "lora")),
    Row("warm200", "the same, dense 200 steps", (*REFERENCE, "--dense-warmup", "200", "--growth", "lora")),
    Row("warm300", "the same, dense 300 steps", (*REFERENCE, "--dense-warmup", "300", "--growth", "lora")),
    Row("warm-start", "the warm-start recipe with 100 dense steps (its first default), then compress at energy 0.9, "
        "lora growth", (*INRANK, "--dense-warmup", "100")),
    Row("warm-start-200", "the default recipe (warm-start): 200 dense steps, a fifth of the run",
        (*INRANK, "--dense-warmup", "200")),
    Row("warm-start-200-dense-rate", "the default recipe, the switch's factors split so that A's rows have norm "
        "sqrt(in / k) (`--factor-split dense-rate`)", (*INRANK, "--dense-warmup", "200", "--factor-split", "dense-rate")),
    Row("warm-start-200-update", "the default recipe, ranks also grown where the update since the last decision "
        "needs more than the kept rank (`--rank-signal update`)", (*INRANK, "--dense-warmup", "200", "--rank-signal", "update")),
    Row("warm-start-200-full", "control: the default recipe at full rank after the switch (`--threshold 1 --max-rank "
        "128`: B A is the whole update, W_init + B A the dense weight)",
        (*INRANK, "--dense-warmup", "200", "--threshold", "1", "--max-rank", "128")),
    Row("warm-start-200-r32", "the default recipe, every layer at rank 32 of 128 after the switch (`--threshold 0.99 "
        "--max-rank 32`)", (*INRANK, "--dense-warmup", "200", "--threshold", "0.99", "--max-rank", "32")),
    Row("warm-start-200-r20", "the same at rank 20 of 128 (a mean rank within a third, the warm-up counted)",
        (*INRANK, "--dense-warmup", "200", "--threshold", "0.99", "--max-rank", "20")),
    Row("warm-start-200-cut8", "the default recipe at rank 32 after the switch, every layer cut to rank 8 at step 600 "
        "(`--rank-cut 8 --rank-cut-at 600`: a mean rank within a third, the warm-up counted)",
        (*INRANK, "--dense-warmup", "200", "--threshold", "1", "--max-rank", "32", "--rank-cut", "8", "--rank-cut-at", "600")),
    Row("warm-start-200-efficient", "the default recipe with --efficient (W = B A from the switch, no W_init)",
        (*INRANK, "--dense-warmup", "200", "--efficient")),
    Row("warm-start-200-efficient-r16", "the same, ranks capped at 16 of 128 (a mean rank within a third)",
        (*INRANK, "--dense-warmup", "200", "--efficient", "--max-rank", "16")),
    Row("warm-start-200-efficient-r16-frob", "the same with Frobenius decay 0.1 on B A (and weight decay 0.1 on the "
        "dense matrices)", (*INRANK, "--dense-warmup", "200", "--efficient", "--max-rank", "16", "--weight-decay", "0.1",
                            "--factor-decay", "frobenius")),
    Row("warm-start-efficient-r32", "--efficient after 100 dense steps, ranks capped at 32 of 128",
        (*INRANK, "--dense-warmup", "100", "--efficient", "--max-rank", "32")),
    Row("dense-seed1", "dense, another seed (init and data order)", ("--seed", "1")),
    Row("warm-start-200-seed1", "warm-start-200 on that seed", (*INRANK, "--dense-warmup", "200", "--seed", "1"),
        baseline="dense-seed1"),
    Row("warm-start-200-dense-rate-seed1", "warm-start-200-dense-rate on that seed",
        (*INRANK, "--dense-warmup", "200", "--factor-split", "dense-rate", "--seed", "1"), baseline="dense-seed1"),
    Row("warm-start-t0.95", "warm-start (100 dense steps) at energy 0.95 (the switch and the decisions)",
        (*INRANK, "--dense-warmup", "100", "--threshold", "0.95")),
    Row("warm-start-t0.99", "warm-start (100 dense steps) at energy 0.99 (the switch and the decisions)",
        (*INRANK, "--dense-warmup", "100", "--threshold", "0.99")),
    Row("warm-start-t0.99-efficient", "the same with --efficient (W = B A, no init), ranks capped at 32",
        (*INRANK, "--dense-warmup", "100", "--efficient", "--threshold", "0.99", "--max-rank", "32")),
    Row("warm100-lr0.5", "warm100, factors at 0.5x lr", (*REFERENCE, "--dense-warmup", "100", "--growth", "lora",
                                                           "--factor-lr-scale", "0.5")),
    Row("warm100-lr0.25", "warm100, factors at 0.25x lr", (*REFERENCE, "--dense-warmup", "100", "--growth", "lora",
                                                            "--factor-lr-scale", "0.25")),
    Row("warm-start-200-lr2", "the default recipe, factors at 2x lr", (*INRANK, "--dense-warmup", "200",
                                                                         "--factor-lr-scale", "2")),
    Row("warm-start-200-lr3", "the default recipe, factors at 3x lr", (*INRANK, "--dense-warmup", "200",
                                                                         "--factor-lr-scale", "3")),
    Row("dense-3x", "dense, 3,000 steps", baseline="dense-3x", steps=3000),
    Row("warm-start-200-3x", "the default recipe, 3,000 steps (200 dense steps)", (*INRANK, "--dense-warmup", "200"),
        baseline="dense-3x", steps=3000),
    Row("warm-start-t0.95-3x", "warm-start at energy 0.95, 3,000 steps (200 dense steps)",
        (*INRANK, "--dense-warmup", "200", "--threshold", "0.95"), baseline="dense-3x", steps=3000),
    Row("continued", "the dense row's step 500 trained dense 500 more steps", (), "continue", "continued"),
    Row("resumed-reference", "its t = 0.9 artifact resumed, `--recipe reference` (exact growth, embedding trained "
        "dense)", ("--recipe", "reference"), "resume", "continued"),
    Row("resumed-lora", "the same, `--growth lora`", ("--recipe", "reference", "--growth", "lora"), "resume", "continued"),
    Row("resumed-rows", "the same, `--growth lora --embedding-training rows`",
        ("--recipe", "reference", "--growth", "lora", "--embedding-training", "rows"), "resume", "continued"),
    Row("resumed-rows-update", "the same, ranks also grown by the update since the last decision (`--rank-signal "
        "update`)", ("--recipe", "reference", "--growth", "lora", "--embedding-training", "rows", "--rank-signal", "update"),
        "resume", "continued"),
    Row("resumed", "its t = 0.9 artifact resumed with the default recipe (warm-start: lora growth, energy 0.9 "
        "decisions, the token embedding trained as rows)", (), "resume", "continued"),
    Row("resumed-dense-rate", "the same, the artifact's factors re-split dense-rate (`--factor-split dense-rate`)",
        ("--factor-split", "dense-rate"), "resume", "continued"),
    Row("resumed-dense-embedding", "the same, `--embedding-training dense`", ("--embedding-training", "dense"),
        "resume", "continued"),
    Row("resumed-default", "its default artifact (energy-rest 0.95, int8) resumed with the default recipe", (), "resume",
        "continued", artifact="default"),
    Row("resumed-default-dense-embedding", "the same, `--embedding-training dense`", ("--embedding-training", "dense"),
        "resume", "continued", artifact="default"),
    Row("resumed-default-rows", "the same, `--recipe reference --growth lora --embedding-training rows`",
        ("--recipe", "reference", "--growth", "lora", "--embedding-training", "rows"), "resume", "continued",
        artifact="default"),
]
RESUME_STEPS = 500
# The artifacts a resume row starts from: compress flags (beside --init-seed 0) of dense/step-500.
ARTIFACTS = {"t09": ("-t", "0.9", "--quantize", "none"),  # t = 0.9 in bfloat16 (the default until int8 was)
             "default": ()}  # compress's default: energy-rest 0.95, int8
COMMON = ["--batch-size", "16", "--block-size", "64", "--eval-every", "100", "--json", "--quiet"]


def split_text(out: Path, data: Path = DATA) -> tuple[Path, Path]:
    """Tiny Shakespeare up to the first line end at or after 90% (train) and the rest (validation)."""
    text = (data / "tinyshakespeare" / "input.txt").read_text()
    cut = text.find("\n", int(len(text) * 0.9)) + 1
    train, val = out / "train.txt", out / "val.txt"
    if not train.is_file():
        train.write_text(text[:cut])
        val.write_text(text[cut:])
    return train, val


def config(out: Path, n_embd: int = 128, n_layer: int = 4, n_head: int = 4, n_positions: int = 128) -> Path:
    """OUT/config: a GPT-2 of this shape with GPT-2's vocabulary (the ablation's 4x128 by default)."""
    from transformers import GPT2Config

    folder = out / "config"
    if not (folder / "config.json").is_file():
        GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions, vocab_size=50257,
                   bos_token_id=50256, eos_token_id=50256).save_pretrained(folder)
    return folder


def command(row: Row, out: Path) -> list[str]:
    train, val = out / "train.txt", out / "val.txt"
    data = ["--data", str(train), "--val-data", str(val)]
    cli = [sys.executable, "-m", "inrank_convert"]
    if row.kind == "train":
        return [*cli, "train", str(out / "config"), "-o", str(out / row.name), *data, "--tokenizer",
                str(DATA / "gpt2-tokenizer"), "--steps", str(row.steps), "--lr", "3e-3", "--seed", "0", *COMMON, *row.args]
    source = out / "dense" / "step-500" if row.kind == "continue" else out / f"dense-step500-{row.artifact}"
    verb = "train" if row.kind == "continue" else "resume"
    return [*cli, verb, str(source), "-o", str(out / row.name), *data, "--steps", str(RESUME_STEPS), "--lr", "1e-3",
            "--seed", "1", *COMMON, *row.args]


def run_row(row: Row, out: Path) -> None:
    if (out / row.name / "metrics.jsonl").is_file() and (out / f"{row.name}.json").is_file():
        return
    if row.kind != "train":
        run_row(ROWS[0], out)
        artifact = out / f"dense-step500-{row.artifact}"
        if row.kind == "resume" and not artifact.is_dir():
            subprocess.run([sys.executable, "-m", "inrank_convert", "compress", str(out / "dense" / "step-500"),
                            "--init-seed", "0", *ARTIFACTS[row.artifact], "-o", str(artifact), "--quiet"], check=True)
    run_command(row.name, command(row, out), out)


def run_command(name: str, cmd: list[str], out: Path) -> None:
    """Run one row's CLI command, its JSON result to OUT/NAME.json; RowFailed with the CLI's error."""
    print(f"== {name}: {' '.join(cmd[2:])}", flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:  # the CLI's own one-line error says what and how to fix
        raise RowFailed(f"row {name} failed (exit {result.returncode}): {result.stderr.strip()[-500:]}")
    (out / f"{name}.json").write_text(result.stdout)


class RowFailed(Exception):
    pass


def table(out: Path) -> list[dict]:
    from inrank_convert.measure.compare_runs import compare_runs

    rows = []
    for row in ROWS:
        if not (out / f"{row.name}.json").is_file() or not (out / row.baseline).is_dir():
            continue
        try:
            result = json.loads((out / f"{row.name}.json").read_text())
        except ValueError:  # still running (or failed): no result yet
            continue
        pair = compare_runs(out / row.baseline, out / row.name)
        base, this = pair.runs
        change = None
        if base.final_val_loss is not None and this.final_val_loss is not None:
            change = 100 * (math.exp(this.final_val_loss - base.final_val_loss) - 1)
        rows.append({"row": row.name, "what": row.what, "val_perplexity": math.exp(this.final_val_loss),
                     "vs": row.baseline, "change_percent": change, "rank_final": this.final_rank_fraction,
                     "rank_mean": this.mean_rank_fraction, "trainable_parameters": result.get("trainable_parameters"),
                     "tokens_per_second": this.tokens_per_second, "bytes": this.bytes})
    return rows


def rank_and_parameter_cells(r: dict) -> tuple[str, str]:
    """A table row's "rank final / mean" and "parameters trained" cells (empty for a dense row)."""
    ranks = "" if r["rank_final"] is None else f"{100 * r['rank_final']:.1f}% / {100 * r['rank_mean']:.1f}%"
    params = "" if r["trainable_parameters"] is None else f"{r['trainable_parameters']:,}"
    return ranks, params


def unknown_rows(requested: list[str], names: list[str]) -> bool:
    """Says so in one line on stderr when a requested row does not exist."""
    unknown = [name for name in requested if name not in names]
    if unknown:
        print(f"error: unknown row {unknown[0]!r}; rows: {', '.join(names)}", file=sys.stderr)
    return bool(unknown)


def markdown(rows: list[dict]) -> str:
    lines = ["| row | what | val. perplexity | vs baseline | rank final / mean | parameters trained | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        change = "" if r["row"] == r["vs"] else f"{r['change_percent']:+.1f}% ({r['vs']})"
        ranks, params = rank_and_parameter_cells(r)
        lines.append(f"| {r['row']} | {r['what']} | {r['val_perplexity']:.2f} | {change} | {ranks} | {params} | "
                     f"{r['tokens_per_second']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", help="rows to run (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "train-ablation")
    parser.add_argument("--list", action="store_true", help="print the rows and their commands")
    args = parser.parse_args(argv)
    names = {row.name: row for row in ROWS}
    if unknown_rows(args.rows, list(names)):
        return 2
    out = args.out.absolute()
    if args.list:
        for row in ROWS:
            print(f"{row.name}: {' '.join(command(row, out)[2:])}")
        return 0
    if not (DATA / "tinyshakespeare" / "input.txt").is_file():
        print(f"error: Tiny Shakespeare not found under {DATA}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    split_text(out)
    config(out)
    try:
        for name in args.rows or list(names):
            run_row(names[name], out)
    except RowFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rows = table(out)
    (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
