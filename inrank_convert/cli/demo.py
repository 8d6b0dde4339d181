"""``inrank-convert demo``: the end-to-end story on real text, as one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inrank_convert.cli import console, console_runs
from inrank_convert.cli.boundary import user_errors
from inrank_convert.cli.options import JsonOpt, QuietOpt
from inrank_convert.core.errors import UsageError


@user_errors
def demo_command(
    out: Annotated[Path, typer.Option("--out", help="Folder the demo owns (replaced by the next demo).")] = Path("demo-out"),
    data_dir: Annotated[Path | None, typer.Option(
        "--data-dir", help="Real text: gpt2-tokenizer/, tinyshakespeare/, wikitext-2-raw/ (default: ../shared/data).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Training steps of each run from scratch.")] = 200,
    resume_steps: Annotated[int, typer.Option("--resume-steps", help="InRank steps resumed from the dense artifact.")] = 60,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", help="Evaluation tokens of wiki.test.raw.")] = 16384,
    n_embd: Annotated[int, typer.Option("--n-embd", help="Model width.")] = 128,
    n_layer: Annotated[int, typer.Option("--n-layer", help="Transformer blocks.")] = 4,
    json_output: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Train a small GPT-2 dense and with InRank from one init, compress both, resume InRank, compare.

    Example: inrank-convert demo --out demo-out
    """
    from inrank_convert.demo import DEFAULT_DATA_DIR, DemoSettings, run_demo

    if steps < 1 or resume_steps < 1 or eval_tokens < 2:
        raise UsageError("--steps, --resume-steps and --eval-tokens must be positive", None, "e.g. --steps 300")
    settings = DemoSettings(out=out, data_dir=data_dir or DEFAULT_DATA_DIR, steps=steps, resume_steps=resume_steps,
                            eval_tokens=eval_tokens, n_embd=n_embd, n_layer=n_layer, n_head=max(1, n_embd // 32))
    say = (lambda text: None) if quiet or json_output else (lambda text: console.stderr.print(text))
    result = run_demo(settings, on_stage=say, on_step=None if quiet or json_output else _log_demo_step)
    console.emit_json(result.to_json()) if json_output else console_runs.render_demo(result.to_json())


def _log_demo_step(record: dict) -> None:
    console.stderr.print(f"  step {record['step']}  loss {record['loss']:.3f}  {record['tokens_per_second']:.0f} tok/s"
                         + (f"  total rank {record['total_rank']}" if "total_rank" in record else ""))
