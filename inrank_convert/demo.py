"""The end-to-end story on real text, as one library call (``inrank-convert demo``, ``make demo``).

Train a small GPT-2 from scratch, compress the run at two thresholds, measure size and
perplexity, resume InRank training from one artifact, and measure again. With ../shared/data it
uses the GPT-2 tokenizer and WikiText-2 (valid to train, test to evaluate); without it, it trains a byte-level BPE
tokenizer on the Python standard library's own sources and uses them as the text (and says so).
Every number in the result comes from this run.
"""

from __future__ import annotations

import json
import re
import shutil
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .compress import CompressResult, compress
from .errors import OutputError, flag
from .plan import PlanOptions
from .plots import plot_report
from .report import ReportResult, report
from .spectrum import RankRule
from .train_options import TrainOptions, TrainResult
from .training import resume, train

MARKER = "demo.json"  # a folder holding it was written by the demo, and may be replaced by it
FALLBACK_VOCAB = 4096
FALLBACK_CHARS = 2_000_000  # of standard-library source: enough to train on for a few hundred steps


@dataclass
class DemoSettings:
    out: Path = Path("demo-out")
    data_dir: Path | None = None
    steps: int = 250
    resume_steps: int = 100
    thresholds: tuple[float, float] = (0.9, 0.99)
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
    seed: int = 0
    fallback_chars: int = FALLBACK_CHARS


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
    trained: TrainResult
    artifacts: list[CompressResult]
    before: ReportResult
    resumed: TrainResult
    resumed_artifact: CompressResult
    after: ReportResult
    plot: Path
    seconds: float

    def rank_table(self) -> list[dict]:
        """Mean rank per layer type (attention in/out, MLP in/out, embeddings) in each artifact, and
        the resumed run's ranks (the rank controller's r, without the buffer). A tensor stored as low
        rank + rows adds a ``TYPE rows`` line: its stored rows, out of all its rows (``full``)."""
        rows: dict[str, dict] = {}

        def add(kind: str, column: str, rank: int, full: int | None = None) -> None:
            row = rows.setdefault(kind, {"type": kind, "full": full})
            row.setdefault(column, []).append(rank)

        for label, artifact in [(f"t={a.rule.split('>=')[-1]}", a) for a in self.artifacts] + \
                [("resumed, compressed", self.resumed_artifact)]:
            for layer in artifact.layers:
                if len(layer.shape) == 2 and layer.rank is not None:  # not the tensors kept dense by choice
                    add(layer_type(layer.name), label, layer.rank, min(layer.shape))
                    if layer.kind == "lowrank+rows":  # the rank alone would hide most of what is stored
                        add(layer_type(layer.name) + " rows", label, layer.entry.rows or 0, layer.shape[0])
        for name, rank in self.resumed.ranks.items():
            add(layer_type(name + ".weight"), "resumed (InRank r)", rank)
        columns = list(dict.fromkeys(key for row in rows.values() for key in row))
        return [{key: (sum(row[key]) / len(row[key]) if isinstance(row.get(key), list) else row.get(key))
                 for key in columns} for row in rows.values()]

    def to_json(self) -> dict:
        return {
            "data": {"source": self.data.source, "train": str(self.data.train_text), "eval": str(self.data.eval_text),
                     "tokenizer": str(self.data.tokenizer), "notes": self.data.notes},
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.settings).items()},
            "trained": self.trained.to_json(),
            "artifacts": [{"output": str(a.output), "rule": a.rule, "compressed_bytes": a.compressed_bytes,
                           "original_bytes": a.original_bytes, "ratio": a.ratio} for a in self.artifacts],
            "before": self.before.to_json(), "resumed": self.resumed.to_json(),
            "resumed_artifact": {"output": str(self.resumed_artifact.output), "rule": self.resumed_artifact.rule,
                                 "compressed_bytes": self.resumed_artifact.compressed_bytes,
                                 "ratio": self.resumed_artifact.ratio},
            "after": self.after.to_json(),
            "ranks": self.rank_table(), "plot": str(self.plot), "seconds": round(self.seconds, 1),
        }


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
    """Run the whole story into ``settings.out``; ``on_stage(text)`` announces each stage."""
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

    say(f"1/5 training a {settings.n_layer}x{settings.n_embd} GPT-2 from scratch for {settings.steps} steps "
        f"on {data.train_text.name}")
    common = dict(data=str(data.train_text), batch_size=settings.batch_size, block_size=settings.block_size,
                  seed=settings.seed, log_every=max(1, settings.steps // 10), tokenizer=str(data.tokenizer))
    trained = train(config_dir, out / "run", TrainOptions(steps=settings.steps, mode="dense", lr=settings.lr, **common),
                    on_step=on_step)

    artifacts = []
    for threshold in settings.thresholds:
        say(f"2/5 compressing the run at threshold {threshold}")
        artifacts.append(compress(out / "run", out / f"artifact-t{threshold}", options=_plan(settings, threshold)))

    say(f"3/5 measuring size and perplexity on {data.eval_text.name} ({settings.eval_tokens} tokens)")
    keep, other = artifacts[0].output, artifacts[-1].output  # resume from the smaller one: more room to grow
    last_dense = out / "run" / f"step-{settings.steps}"
    before = report(keep, data.eval_text, original=last_dense, also=(other,), max_tokens=settings.eval_tokens)
    plot = plot_report(before, out / "report.png")

    say(f"4/5 resuming InRank training from {keep.name} for {settings.resume_steps} steps")
    warmup = max(1, settings.resume_steps // 4)
    # Continue at the learning rate the dense run ended with (its cosine floor): no second warm-up spike.
    resumed = resume(keep, out / "inrank", dict(steps=settings.resume_steps, lr=settings.lr / 10, rank_warmup=warmup,
                                                rank_every=max(1, settings.resume_steps // 8), **common),
                     on_step=on_step)

    say("5/5 compressing the resumed model against the run's init, and measuring it")
    # The resumed checkpoint trains its embeddings dense (a rows tensor is rebuilt dense to train);
    # compressing it against the original init (the seed recipe in run/step-0) finds its rows again
    # and gives its honest size next to the first artifacts.
    resumed_artifact = compress(out / "inrank" / f"step-{settings.resume_steps}", out / "resumed-artifact",
                                init=out / "run" / "step-0", init_seed=settings.seed,
                                options=_plan(settings, settings.thresholds[0]))
    resumed_checkpoint = out / "inrank" / f"step-{settings.resume_steps}"  # the resumed model itself, exact
    after = report(resumed_artifact.output, data.eval_text, original=last_dense, also=(resumed_checkpoint, keep),
                   max_tokens=settings.eval_tokens)
    plot_report(after, out / "report-resumed.png")
    result = DemoResult(settings, data, trained, artifacts, before, resumed, resumed_artifact, after, plot,
                        time.perf_counter() - started)
    (out / MARKER).write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return result


def _plan(settings: DemoSettings, threshold: float) -> PlanOptions:
    return PlanOptions(rule=RankRule("energy", threshold), embeddings=settings.embeddings, seed=settings.seed)


def _write_config(folder: Path, data: DemoData, settings: DemoSettings) -> None:
    from transformers import GPT2Config

    from .data import load_tokenizer

    tokenizer = load_tokenizer(None, data.tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    GPT2Config(n_embd=settings.n_embd, n_layer=settings.n_layer, n_head=settings.n_head,
               n_positions=max(128, settings.block_size), vocab_size=len(tokenizer), bos_token_id=eos,
               eos_token_id=eos).save_pretrained(folder)
