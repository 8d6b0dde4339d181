"""The end-to-end story on real text, as one library call (``inrank-convert demo``, ``make demo``).

Train a small GPT-2 twice from one seed's init on the same text for the same steps, dense and with
InRank (the default recipe, warm-start: the MLP dense for a tenth of the steps, then factorized
at the rank its update needs, with buffer columns that learn); compress both runs;
resume InRank from the dense run's artifact, and continue the dense run dense on the same tokens for
the same steps (what the resumed run has to keep up with); measure sizes and perplexities on held-out text and
put the runs side by side (validation curves, the rank InRank used, bytes, time). With
../shared/data it uses the GPT-2 tokenizer and WikiText-2 (valid to train, test to evaluate);
without it, it trains a byte-level BPE tokenizer on the Python standard library's own sources and
uses them as the text (and says so). Every number in the result comes from this run.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from inrank_convert.compression.job import compress
from inrank_convert.compression.plan import PlanOptions
from inrank_convert.compression.results import CompressResult
from inrank_convert.core.errors import OutputError, StoppedError, flag
from inrank_convert.inputs.text import load_tokenizer
from inrank_convert.linalg.criteria import DEFAULT_THRESHOLD, RankRule
from inrank_convert.measure.compare_runs import CompareResult, RunSummary, compare_runs
from inrank_convert.measure.plots import plot_compare_runs, plot_report
from inrank_convert.measure.report import ReportResult, report
from inrank_convert.training.entrypoints import resume, train
from inrank_convert.training.options import TrainOptions, TrainResult
from inrank_convert.weights.output_lock import output_lock
from inrank_convert.weights.outputs import check_output_outside

MARKER = "demo.json"  # a folder holding it was written by the demo, and may be replaced by it
FALLBACK_VOCAB = 4096
FALLBACK_CHARS = 2_000_000  # of standard-library source: enough to train on for a few hundred steps


# ../shared/data beside the repository checkout (the demo's --data-dir default).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

@dataclass
class DemoSettings:
    out: Path = Path("demo-out")
    data_dir: Path | None = None
    steps: int = 200
    resume_steps: int = 60
    threshold: float = DEFAULT_THRESHOLD
    # Embeddings are factorized too: their update (a rank-1 drift shared by the rows of tokens the
    # text never uses, plus the rows of the tokens it does use) is stored as low rank + rows.
    embeddings: bool = True
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    block_size: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    eval_tokens: int = 16384
    eval_blocks: int = 16  # validation windows during training (block_size tokens each)
    seed: int = 0
    fallback_chars: int = FALLBACK_CHARS
    # The InRank run: the default recipe (warm-start) on the MLP, W = W_init + B @ A; a buffer and
    # schedule sized for a 128-wide model and a few hundred steps (the reference's 100 / 200 / 25
    # are for GPT-2 small over thousands). recipe "reference" with efficient=True is the InRank
    # reference's InRank-Efficient.
    factorize: str = "mlp"
    efficient: bool = False
    recipe: str = "warm-start"
    growth: str | None = None  # the recipe's
    initial_rank: int | None = None  # the recipe's (the reference starts at 2)
    buffer: int = 16
    rank_warmup: int = 25
    rank_every: int = 10


@dataclass
class DemoData:
    train_text: Path
    eval_text: Path
    tokenizer: Path
    source: str  # "shared" | "fallback"
    notes: list[str] = field(default_factory=list)


@dataclass
class DemoResult:
    settings: DemoSettings
    data: DemoData
    dense: TrainResult
    inrank: TrainResult
    dense_artifact: CompressResult
    inrank_artifact: CompressResult
    resumed: TrainResult
    continued: TrainResult
    measured: ReportResult
    comparison: CompareResult
    plots: list[Path]
    seconds: float

    def story(self) -> list[dict]:
        """The demo's one table: per run, the final validation perplexity (each run's own curve on
        the same held-out windows), the rank InRank used as a fraction of full rank, the bytes of
        its checkpoint and of its artifact (with the artifact's perplexity on the evaluation
        text), and the training time."""
        perplexity = {row.path: row.result.perplexity for row in self.measured.models}
        rows = []
        for run, summary, artifact in ((self.dense, self.comparison.runs[0], self.dense_artifact),
                                       (self.inrank, self.comparison.runs[1], self.inrank_artifact)):
            rows.append(_story_row(summary.label, run, summary, artifact, perplexity))
        for label, run in (("resumed InRank", self.resumed), ("dense continued", self.continued)):
            rows.append({"run": label, "steps": run.step, "seconds": round(run.seconds, 1),
                         "val_perplexity": None if run.val_loss is None else math.exp(run.val_loss),
                         "trainable_parameters": run.trainable_parameters,
                         "start_total_rank": self.resumed_start_rank if run is self.resumed else None,
                         "total_rank": run.total_rank if run.ranks else None,
                         "checkpoint_perplexity": perplexity.get(str(run.checkpoints[-1]))})
        return rows

    @property
    def resumed_start_rank(self) -> int:
        return sum(layer.rank for layer in self.dense_artifact.layers
                   if layer.rank is not None and layer.name.removesuffix(".weight") in self.resumed.ranks)

    def rank_table(self) -> list[dict]:
        """Mean rank per layer type (attention in/out, MLP in/out, embeddings) in each artifact, and
        the InRank runs' ranks (the rank controller's r, without the buffer). A tensor stored as low
        rank + rows adds a ``TYPE rows`` line: its stored rows, out of all its rows (``full``)."""
        rows: dict[str, dict] = {}

        def add(kind: str, column: str, rank: int, full: int | None = None) -> None:
            row = rows.setdefault(kind, {"type": kind, "full": full})
            row.setdefault(column, []).append(rank)

        for label, artifact in (("dense, compressed", self.dense_artifact), ("InRank, compressed", self.inrank_artifact)):
            for layer in artifact.layers:
                if len(layer.shape) == 2 and layer.rank is not None:  # not the tensors kept dense by choice
                    add(layer_type(layer.name), label, layer.rank, min(layer.shape))
                    if layer.kind == "lowrank+rows":  # the rank alone would hide most of what is stored
                        add(layer_type(layer.name) + " rows", label, layer.entry.rows or 0, layer.shape[0])
        for label, run in (("InRank r", self.inrank), ("resumed r", self.resumed)):
            for name, rank in run.ranks.items():
                add(layer_type(name + ".weight"), label, rank)
        columns = ["type", "full", "dense, compressed", "InRank, compressed", "InRank r", "resumed r"]
        return [{key: (sum(row[key]) / len(row[key]) if isinstance(row.get(key), list) else row.get(key))
                 for key in columns} for row in rows.values()]

    def to_json(self) -> dict:
        def artifact(result: CompressResult) -> dict:
            return {"output": str(result.output), "rule": result.rule, "compressed_bytes": result.compressed_bytes,
                    "original_bytes": result.original_bytes, "ratio": result.ratio}

        return {
            "data": {"source": self.data.source, "train": str(self.data.train_text), "eval": str(self.data.eval_text),
                     "tokenizer": str(self.data.tokenizer), "notes": self.data.notes},
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.settings).items()},
            "story": self.story(),
            "dense": self.dense.to_json(), "inrank": self.inrank.to_json(),
            "dense_artifact": artifact(self.dense_artifact), "inrank_artifact": artifact(self.inrank_artifact),
            "resumed": self.resumed.to_json(), "continued": self.continued.to_json(), "measured": self.measured.to_json(),
            "comparison": self.comparison.to_json(),
            "ranks": self.rank_table(), "plots": [str(p) for p in self.plots], "seconds": round(self.seconds, 1),
        }


def _story_row(label: str, run: TrainResult, summary: RunSummary, artifact: CompressResult,
               perplexity: dict[str, float]) -> dict:
    final_val = summary.final_val_loss
    return {"run": label, "steps": run.step, "seconds": round(run.seconds, 1),
            "tokens_per_second": round(run.tokens_per_second, 1),
            "val_perplexity": None if final_val is None else math.exp(final_val),
            "rank_fraction_final": summary.final_rank_fraction, "rank_fraction_mean": summary.mean_rank_fraction,
            "total_rank": run.total_rank if run.ranks else None,
            "checkpoint_bytes": summary.bytes, "checkpoint_perplexity": perplexity.get(summary.checkpoint),
            "artifact_bytes": artifact.compressed_bytes, "artifact_perplexity": perplexity.get(str(artifact.output))}


def layer_type(name: str) -> str:
    """``transformer.h.3.mlp.c_fc.weight`` -> ``mlp.c_fc``: the same layer in every block."""
    return re.sub(r"^.*?\.(?:h|layers)\.\d+\.", "", name).removesuffix(".weight")


def find_data(data_dir: Path | None, work: Path, fallback_chars: int = FALLBACK_CHARS) -> DemoData:
    """The shared real-text data when it is there and readable; the fallback corpus otherwise."""
    notes = []
    if data_dir is not None:
        tokenizer = data_dir / "gpt2-tokenizer"
        train_text = data_dir / "wikitext-2-raw" / "wiki.valid.raw"  # the evaluation text's domain
        eval_text = data_dir / "wikitext-2-raw" / "wiki.test.raw"
        needed = [tokenizer / "vocab.json", tokenizer / "merges.txt", train_text, eval_text]
        unreadable = [str(p) for p in needed if not _readable(p)]
        if not unreadable:
            return DemoData(train_text, eval_text, tokenizer, "shared")
        notes.append(f"{data_dir}: missing or unreadable ({', '.join(unreadable[:2])})")
    else:
        notes.append("no data folder given")
    notes.append(f"so the demo trains a {FALLBACK_VOCAB}-token byte-level BPE tokenizer on the Python standard "
                 "library's source files and uses those files as its text (numbers differ from the README's)")
    return _fallback_data(work, notes, fallback_chars)


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return bool(handle.read(1))
    except OSError:
        return False


def _fallback_data(work: Path, notes: list[str], fallback_chars: int) -> DemoData:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = work / "fallback-data"
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    texts, size = [], 0
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text)
        size += len(text)
        if size >= fallback_chars:
            break
    cut = max(1, len(texts) * 9 // 10)  # the last tenth of the files is held out for evaluation
    (folder / "train.txt").write_text("\n\n".join(texts[:cut]))
    (folder / "eval.txt").write_text("\n\n".join(texts[cut:]))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=FALLBACK_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(folder / "train.txt")], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    wrapped.save_pretrained(folder / "tokenizer")
    return DemoData(folder / "train.txt", folder / "eval.txt", folder / "tokenizer", "fallback", notes)


def _prepare_out(out: Path) -> None:
    """The demo's own folder: replaced when an earlier demo wrote it, never anything else."""
    if out.exists():
        if not out.is_dir() or not (out / MARKER).is_file() and any(out.iterdir()):
            raise OutputError("the demo's output folder exists and was not written by the demo", str(out),
                              f"choose another {flag('--out')}, or remove it")
        for child in out.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("{}\n")  # claims the folder now: a demo killed midway can be re-run


def run_demo(settings: DemoSettings, on_stage: Callable[[str], None] | None = None,
             on_step: Callable[[dict], None] | None = None) -> DemoResult:
    """Run the whole story into ``settings.out``; ``on_stage(text)`` announces each stage. The
    folder is checked (not the current folder, not in the data) and locked for the whole demo."""
    check_output_outside(Path(settings.out), (settings.data_dir,))
    with output_lock(Path(settings.out)):
        return _run_demo(settings, on_stage, on_step)


def _run_demo(settings: DemoSettings, on_stage: Callable[[str], None] | None,
              on_step: Callable[[dict], None] | None) -> DemoResult:
    started = time.perf_counter()
    out = Path(settings.out)
    say = on_stage or (lambda text: None)
    _prepare_out(out)
    data = find_data(settings.data_dir, out, settings.fallback_chars)
    for note in data.notes:
        say(f"note: {note}")
    if not settings.embeddings:
        say(f"note: embeddings stay dense ({flag('--no-embeddings')})")
    config_dir = out / "config"
    _write_config(config_dir, data, settings)
    common = dict(data=str(data.train_text), batch_size=settings.batch_size, block_size=settings.block_size,
                  seed=settings.seed, log_every=max(1, settings.steps // 10), tokenizer=str(data.tokenizer),
                  val_data=str(data.eval_text), eval_every=max(1, settings.steps // 5), eval_blocks=settings.eval_blocks)
    model = f"{settings.n_layer}x{settings.n_embd} GPT-2"

    say(f"1/7 training a {model} dense from scratch for {settings.steps} steps on {data.train_text.name}")
    dense = train(config_dir, out / "dense", TrainOptions(steps=settings.steps, mode="dense", lr=settings.lr, **common),
                  on_step=on_step)
    _stop_if_interrupted(dense, out)
    say(f"2/7 training it with InRank{'-Efficient' if settings.efficient else ''} from the same init, text and steps "
        f"({flag('--factorize')} {settings.factorize}, {flag('--recipe')} {settings.recipe})")
    inrank = train(config_dir, out / "inrank", TrainOptions(
        steps=settings.steps, mode="inrank", lr=settings.lr, efficient=settings.efficient, factorize=settings.factorize,
        recipe=settings.recipe, growth=settings.growth, initial_rank=settings.initial_rank, buffer=settings.buffer,
        rank_warmup=settings.rank_warmup, rank_every=settings.rank_every, **common), on_step=on_step)
    _stop_if_interrupted(inrank, out)

    say(f"3/7 compressing both runs at threshold {settings.threshold}")
    dense_artifact = compress(out / "dense", out / "dense-artifact", options=_plan(settings))
    inrank_artifact = compress(out / "inrank", out / "inrank-artifact", options=_plan(settings))

    say(f"4/7 resuming InRank from {dense_artifact.output.name} for {settings.resume_steps} steps")
    resume_warmup = max(1, settings.resume_steps // 5)
    # A third of the peak learning rate: the run continues without the spike of a second full
    # warm-up. Ranks grow only where the buffers learn more than the artifact's 10% left out.
    resumed = resume(dense_artifact.output, out / "resumed", dict(
        steps=settings.resume_steps, lr=settings.lr / 3, buffer=settings.buffer, rank_warmup=resume_warmup,
        rank_every=resume_warmup, recipe=settings.recipe, **common), on_step=on_step)
    _stop_if_interrupted(resumed, out)
    say(f"5/7 continuing the dense run dense for {settings.resume_steps} steps on the same tokens")
    continued = train(dense.checkpoints[-1], out / "continued", TrainOptions(
        steps=settings.resume_steps, mode="dense", lr=settings.lr / 3, **common), on_step=on_step)
    _stop_if_interrupted(continued, out)

    say(f"6/7 measuring size and perplexity on {data.eval_text.name} ({settings.eval_tokens} tokens)")
    measured = report(dense_artifact.output, data.eval_text, original=dense.checkpoints[-1],
                      also=(inrank.checkpoints[-1], inrank_artifact.output, resumed.checkpoints[-1],
                            continued.checkpoints[-1]),
                      max_tokens=settings.eval_tokens)

    say("7/7 putting the dense and InRank runs side by side")
    comparison = compare_runs(out / "dense", out / "inrank")
    plots = [plot_compare_runs(comparison, out / "runs.png"), plot_report(measured, out / "report.png")]
    result = DemoResult(settings, data, dense, inrank, dense_artifact, inrank_artifact, resumed, continued, measured,
                        comparison,
                        plots, time.perf_counter() - started)
    (out / MARKER).write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return result


def _stop_if_interrupted(run: TrainResult, out: Path) -> None:
    """A stop request (Ctrl-C, SIGTERM) ends a training stage early with a checkpoint; the demo ends
    there too, instead of going on to train the next run and compare a partial one."""
    if run.interrupted:
        raise StoppedError(f"the demo was stopped at step {run.step} of its {run.run.name} run (its checkpoint is "
                           f"saved; the stages after it did not run)", str(out), "run the demo again: it starts afresh")


def _plan(settings: DemoSettings) -> PlanOptions:
    return PlanOptions(rule=RankRule(threshold=settings.threshold), embeddings=settings.embeddings, seed=settings.seed)


def _write_config(folder: Path, data: DemoData, settings: DemoSettings) -> None:
    from transformers import GPT2Config

    tokenizer = load_tokenizer(None, data.tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    GPT2Config(n_embd=settings.n_embd, n_layer=settings.n_layer, n_head=settings.n_head,
               n_positions=max(128, settings.block_size), vocab_size=len(tokenizer), bos_token_id=eos,
               eos_token_id=eos).save_pretrained(folder)
