"""``compare-runs DENSE_RUN INRANK_RUN``: two training runs of one architecture side by side.

From each run folder: its metrics (``metrics.jsonl``: training loss, validation loss where it
evaluated, InRank's total rank, tokens/s), its last checkpoint (bytes on disk, parameters stored)
and its training state (mode, architecture, tokenizer). The total rank is given as a fraction of
the full rank of the layers the rank controller holds (sum of min(rows, cols)). The validation
curves compare only if both runs evaluated on the same text (``--val-data``, recorded in each
checkpoint's training state); ``--data TEXT`` instead scores every checkpoint both runs saved at
the same step on one text, through the same ``perplexity`` as ``report``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from inrank_convert.core.errors import MismatchError, UsageError
from inrank_convert.inputs.sources import open_checkpoint
from inrank_convert.inputs.text import load_tokenizer, read_text, tokenize_text
from inrank_convert.runtime.evaluate import checkpoint_perplexity, window_length
from inrank_convert.runtime.modeling import model_config
from inrank_convert.weights.run_folder import (
    latest_checkpoint,
    load_state,
    read_metrics,
    training_checkpoints,
)

# Config keys that describe the training, not the architecture (two runs may differ in them).
_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                     "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "attention_dropout",
                     "hidden_dropout", "dropout", "use_cache"}


@dataclass
class RunSummary:
    label: str
    path: str
    mode: str  # "dense" | "inrank"
    efficient: bool
    final_step: int
    checkpoint: str
    bytes: int  # the last checkpoint's weight files
    parameters: int  # numbers stored (factors counted as stored)
    tokens_per_second: float | None  # mean over the logged steps after the first
    val_data: str | None
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val_loss) from metrics.jsonl
    rank_curve: list[tuple[int, int]] = field(default_factory=list)  # (step, total_rank), InRank only
    full_rank: int | None = None  # sum of min(rows, cols) over the layers the controller holds
    data_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, perplexity on --data)
    trainable_parameters: int | None = None  # what the optimizer trained at the last checkpoint

    @property
    def final_val_loss(self) -> float | None:
        return self.val_curve[-1][1] if self.val_curve else None

    @property
    def final_rank_fraction(self) -> float | None:
        return self.rank_curve[-1][1] / self.full_rank if self.rank_curve and self.full_rank else None

    @property
    def mean_rank_fraction(self) -> float | None:
        """The total rank averaged over the logged steps, as a fraction of the full rank."""
        if not self.rank_curve or not self.full_rank:
            return None
        return sum(rank for _, rank in self.rank_curve) / len(self.rank_curve) / self.full_rank

    def to_json(self) -> dict:
        final_val = self.final_val_loss
        return {"label": self.label, "path": self.path, "mode": self.mode, "efficient": self.efficient,
                "final_step": self.final_step, "checkpoint": self.checkpoint, "bytes": self.bytes,
                "parameters": self.parameters, "trainable_parameters": self.trainable_parameters,
                "tokens_per_second": self.tokens_per_second, "val_data": self.val_data,
                "final_val_loss": final_val, "final_val_perplexity": None if final_val is None else math.exp(final_val),
                "full_rank": self.full_rank, "final_rank_fraction": self.final_rank_fraction,
                "mean_rank_fraction": self.mean_rank_fraction,
                "val_curve": [{"step": s, "val_loss": v} for s, v in self.val_curve],
                "rank_curve": [{"step": s, "total_rank": r} for s, r in self.rank_curve],
                "data_curve": [{"step": s, "perplexity": p} for s, p in self.data_curve]}


@dataclass
class CompareResult:
    runs: list[RunSummary]
    same_val_data: bool
    data: str | None = None
    data_tokens: int | None = None

    def to_json(self) -> dict:
        return {"same_val_data": self.same_val_data, "data": self.data, "data_tokens": self.data_tokens,
                "runs": [run.to_json() for run in self.runs]}


def _weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix in {".safetensors", ".bin"})


def _summarize(run: Path, label: str) -> tuple[RunSummary, dict, dict[str, tuple[int, ...]]]:
    run = Path(run)
    if not run.is_dir():
        raise UsageError("no such run folder", str(run), "pass the folder train or resume wrote")
    records = [record for record in read_metrics(run) if isinstance(record, dict) and "step" in record]
    if not records:
        raise UsageError("the run folder has no metrics (metrics.jsonl missing or empty)", str(run),
                         "pass the folder train or resume wrote (it logs metrics.jsonl)")
    checkpoint = latest_checkpoint(run)
    state, _ = load_state(checkpoint)
    source = open_checkpoint(checkpoint)
    try:
        shapes = {name: tuple(info.shape) for name, info in source.infos().items()}
        parameters = _stored_parameters(source, shapes)
    finally:
        source.close()
    controller = state.get("rank_controller") or None
    full_rank = None
    if controller:
        full_rank = sum(min(shapes[f"{name}.weight"]) for name in controller["ranks"] if f"{name}.weight" in shapes) \
            or None
    speeds = [float(r["tokens_per_second"]) for r in records[1:] if r.get("tokens_per_second")]
    options = state.get("options") or {}
    summary = RunSummary(
        label, str(run), str(state.get("mode", "dense")), bool(state.get("efficient", False)), int(state.get("step", 0)),
        str(checkpoint), _weight_bytes(checkpoint), parameters, sum(speeds) / len(speeds) if speeds else None,
        options.get("val_data"),
        [(int(r["step"]), float(r["val_loss"])) for r in records if r.get("val_loss") is not None],
        # A dense warm-up's steps hold every rank: they count as the full rank.
        [(int(r["step"]), int(r["total_rank"]) if r.get("total_rank") is not None else full_rank) for r in records
         if r.get("total_rank") is not None or (r.get("dense_warmup") and full_rank)], full_rank,
        trainable_parameters=state.get("trainable_parameters"))
    return summary, state, shapes


def _stored_parameters(source, shapes: dict[str, tuple[int, ...]]) -> int:
    artifact = getattr(source, "artifact", None)
    manifest = getattr(artifact, "manifest", None)
    if manifest is not None:  # an InRank checkpoint: an artifact storing factors
        return manifest.stored_parameters()
    return sum(math.prod(shape) for shape in shapes.values())


def _architecture(state: dict) -> dict:
    return {key: value for key, value in (state.get("config") or {}).items() if key not in _NOT_ARCHITECTURE}


def check_comparable(first: tuple[RunSummary, dict, dict], second: tuple[RunSummary, dict, dict]) -> None:
    """Same architecture (config and tensor shapes) and the same tokenizer, or one line saying which differs."""
    (a, a_state, a_shapes), (b, b_state, b_shapes) = first, second
    fix = "compare two runs of the same config.json and tokenizer"
    a_arch, b_arch = _architecture(a_state), _architecture(b_state)
    differing = sorted(key for key in set(a_arch) | set(b_arch) if a_arch.get(key) != b_arch.get(key))
    if differing:
        key = differing[0]
        raise MismatchError(f"the runs are different architectures: {key} is {a_arch.get(key)!r} in {a.path} and "
                            f"{b_arch.get(key)!r} in {b.path}", b.path, fix)
    # A tied tensor may be listed by one checkpoint form and not the other (GPT-2's lm_head): the
    # names both hold must agree, and the configs above say the rest.
    differing = sorted(name for name in set(a_shapes) & set(b_shapes) if a_shapes[name] != b_shapes[name])
    if differing:
        name = differing[0]
        raise MismatchError(f"the runs are different architectures: tensor {name!r} has shape "
                            f"{list(a_shapes[name])} in {a.path} and {list(b_shapes[name])} in {b.path}", b.path, fix)
    if a_state.get("tokenizer") != b_state.get("tokenizer"):
        raise MismatchError(f"the runs used different tokenizers (fingerprints {a_state.get('tokenizer')} and "
                            f"{b_state.get('tokenizer')}): their losses do not compare", b.path, fix)


def compare_runs(dense_run: str | Path, inrank_run: str | Path, *, data: str | Path | None = None,
                 max_tokens: int | None = None, device: str = "cpu",
                 on_checkpoint: Callable[[str, int], None] | None = None) -> CompareResult:
    """The side-by-side of two runs; with ``data``, every step both runs saved scored on it."""
    text = read_text(data) if data is not None else None  # a bad text fails before any model is read
    first, second = _summarize(dense_run, "dense"), _summarize(inrank_run, "inrank")
    check_comparable(first, second)
    runs = [first[0], second[0]]
    if first[0].mode == second[0].mode == "dense":
        runs[1].label = "second"
    same_val = runs[0].val_data is not None and runs[0].val_data == runs[1].val_data
    result = CompareResult(runs, same_val)
    if text is None:
        return result
    checkpoint = Path(runs[1].checkpoint)
    config = model_config(checkpoint)
    tokens = tokenize_text(text, load_tokenizer([checkpoint]), max_tokens, str(data))
    window = window_length(config)
    steps = [training_checkpoints(Path(run.path)) for run in runs]
    common = sorted(set(steps[0]) & set(steps[1]))
    for run, saved in zip(runs, steps, strict=True):
        for step in common:
            if on_checkpoint is not None:
                on_checkpoint(run.label, step)
            run.data_curve.append((step, checkpoint_perplexity(saved[step], tokens, window, device, config)))
    result.data, result.data_tokens = str(data), int(tokens.numel())
    return result
