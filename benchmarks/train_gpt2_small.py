"""Low-rank training against dense at GPT-2 small's shape (12 x 768), on a GPU when there is one.

The paper's claim (InRank-Efficient matches dense on GPT-2 small) is at this shape; the ablation
(``benchmarks.train_ablation``) runs a 4x128 model on 2 CPU cores. Here each row trains a GPT-2 of
12 layers, width 768, 12 heads, context 256 (GPT-2 tokenizer, seed 0) on Tiny Shakespeare up to the
first line end at or after 90% of it, batch 16 x 256 at lr 6e-4 (100 warm-up steps, cosine to a
tenth), validation on the rest every 100 steps, in bfloat16 autocast on ``--device cuda``:

    python -m benchmarks.train_gpt2_small --out gpt2-small --steps 1000      # every row
    python -m benchmarks.train_gpt2_small --out gpt2-small dense efficient   # some rows
    python -m benchmarks.train_gpt2_small --list                             # the commands

Rows: ``dense``; ``efficient``, InRank-Efficient with the default recipe (a fifth of the run dense,
at most 200 steps, then each MLP weight cut at energy 0.9 into ``B @ A`` with a buffer of 96
columns); ``efficient-r128``, the same with ranks capped at 128 of 768 (a mean rank within a third);
``inrank``, the default recipe (``W_init + B @ A``). The table adds to the ablation's columns the
best validation perplexity (Tiny Shakespeare is 0.3 M tokens: a 124 M-parameter model overfits it
within a few passes) and the median time of a step after the switch (before it, for dense: the same
steps). ``--n-layer/--n-embd/--n-head/--block/--batch`` shrink the model for a check on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.train_ablation import (
    DATA,
    REPO,
    RowFailed,
    config,
    rank_and_parameter_cells,
    run_command,
    split_text,
    unknown_rows,
)
from inrank_convert.weights.run_folder import read_metrics


@dataclass(frozen=True)
class Shape:
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    block: int = 256
    batch: int = 16

    @property
    def buffer(self) -> int:
        return max(1, self.n_embd // 8)  # 16 of 128 in the ablation, 96 of 768 here

    @property
    def rank_cap(self) -> int:
        return max(1, self.n_embd // 6)  # 128 of 768


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    inrank: bool = True
    efficient: bool = True
    capped: bool = False


ROWS = [
    Row("dense", "dense", inrank=False, efficient=False),
    Row("efficient", "InRank-Efficient, the default recipe (dense warm-up, then W = B A cut at energy 0.9)"),
    Row("efficient-r128", "the same, ranks capped at n_embd / 6 (128 of 768)", capped=True),
    Row("inrank", "the default recipe (W_init + B A)", efficient=False),
]
LEARNING_RATE = "6e-4"


def command(row: Row, out: Path, shape: Shape, steps: int, device: str, dtype: str, data: Path) -> list[str]:
    args = [sys.executable, "-m", "inrank_convert", "train", str(out / "config"), "-o", str(out / row.name),
            "--data", str(out / "train.txt"), "--val-data", str(out / "val.txt"),
            "--tokenizer", str(data / "gpt2-tokenizer"), "--steps", str(steps), "--lr", LEARNING_RATE, "--seed", "0",
            "--batch-size", str(shape.batch), "--block-size", str(shape.block), "--eval-every", "100",
            "--device", device, "--dtype", dtype, "--json", "--quiet"]
    if row.inrank:
        args += ["--mode", "inrank", "--buffer", str(shape.buffer), "--rank-warmup", "50", "--rank-every", "10"]
    if row.efficient:
        args.append("--efficient")
    if row.capped:
        args += ["--max-rank", str(shape.rank_cap)]
    return args


def step_seconds(run: Path, tokens_per_step: int, after: int | None) -> float | None:
    """Median seconds per step over the logged intervals after step ``after`` (the switch), from
    metrics.jsonl's throughput; the median leaves out the intervals an evaluation slowed."""
    rates = [r["tokens_per_second"] for r in read_metrics(run)
             if r.get("step", 0) > (after or 1) and r.get("tokens_per_second", 0) > 0]
    return tokens_per_step / statistics.median(rates) if rates else None


def switch_step(run: Path) -> int | None:
    """The first logged step with ranks: the switch of a dense warm-up (None for a dense run)."""
    return next((int(record["step"]) for record in read_metrics(run) if "ranks" in record), None)


def table(out: Path, shape: Shape) -> list[dict]:
    from inrank_convert.measure.compare_runs import compare_runs

    done = [row for row in ROWS if (out / f"{row.name}.json").is_file() and (out / row.name).is_dir()]
    switch = next((s for s in (switch_step(out / row.name) for row in done if row.inrank) if s is not None), None)
    rows = []
    for row in done:
        base, this = compare_runs(out / "dense", out / row.name).runs if (out / "dense").is_dir() else (None, None)
        if this is None or this.final_val_loss is None:
            continue
        best_step, best_loss = min(this.val_curve, key=lambda point: point[1])
        result = json.loads((out / f"{row.name}.json").read_text())
        rows.append({"row": row.name, "what": row.what, "val_perplexity": math.exp(this.final_val_loss),
                     "change_percent": 100 * (math.exp(this.final_val_loss - base.final_val_loss) - 1),
                     "best_val_perplexity": math.exp(best_loss), "best_step": best_step,
                     "rank_final": this.final_rank_fraction, "rank_mean": this.mean_rank_fraction,
                     "trainable_parameters": result.get("trainable_parameters"),
                     "step_seconds": step_seconds(out / row.name, shape.batch * shape.block, switch)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| row | what | val. perplexity | vs dense | best (step) | rank final / mean | parameters trained | "
             "step after the switch |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        change = "" if r["row"] == "dense" else f"{r['change_percent']:+.1f}%"
        ranks, params = rank_and_parameter_cells(r)
        step = "" if r["step_seconds"] is None else f"{1000 * r['step_seconds']:.0f} ms"
        lines.append(f"| {r['row']} | {r['what']} | {r['val_perplexity']:.2f} | {change} | "
                     f"{r['best_val_perplexity']:.2f} ({r['best_step']}) | {ranks} | {params} | {step} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="*", help="rows to run (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "train-gpt2-small")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder (tinyshakespeare/, gpt2-tokenizer/)")
    parser.add_argument("--list", action="store_true", help="print the rows and their commands")
    for field, default in vars(Shape()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=default)
    args = parser.parse_args(argv)
    shape = Shape(args.n_layer, args.n_embd, args.n_head, args.block, args.batch)
    names = {row.name: row for row in ROWS}
    if unknown_rows(args.rows, list(names)):
        return 2
    out = args.out.absolute()
    run = [names[name] for name in args.rows] or ROWS
    commands = {row.name: command(row, out, shape, args.steps, args.device, args.dtype, args.data) for row in run}
    if args.list:
        for name, cmd in commands.items():
            print(f"{name}: {' '.join(cmd[2:])}")
        return 0
    text = args.data / "tinyshakespeare" / "input.txt"
    if not text.is_file():
        print(f"error: Tiny Shakespeare not found at {text}; pass --data with the shared data folder", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"error: --device {args.device} but torch sees no CUDA device; pass --device cpu with a "
                  "smaller --n-layer/--n-embd for a check on the CPU", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    split_text(out, args.data)
    config(out, shape.n_embd, shape.n_layer, shape.n_head, shape.block)
    try:
        for row in ([ROWS[0]] if ROWS[0] not in run else []) + run:  # dense is every row's baseline
            if (out / f"{row.name}.json").is_file():
                continue
            cmd = commands.get(row.name) or command(row, out, shape, args.steps, args.device, args.dtype, args.data)
            run_command(row.name, cmd, out)
    except RowFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rows = table(out, shape)
    (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
