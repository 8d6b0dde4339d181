"""Decide, per tensor and before any heavy work, what compress will do with it.

A plan is cheap: it reads shapes, dtypes and (for tie detection) first rows only. It checks
that the trained checkpoint and its reference line up, so a mismatch fails before anything
is computed or written. ``compress --dry-run`` shows it.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from inrank_convert.artifact.storage import NO_QUANTIZATION, QUANTIZE_SCHEMES, storage_costs
from inrank_convert.core.errors import CheckpointError, MismatchError, UsageError, flag
from inrank_convert.core.tensors import dtype_name
from inrank_convert.inputs.reference import Reference
from inrank_convert.linalg.criteria import RankRule
from inrank_convert.linalg.forms import Costs
from inrank_convert.model.architecture import (
    checkpoint_keys,
    config_from_dict,
    embedding_weight_names,
    meta_model,
)
from inrank_convert.weights.checkpoints import Checkpoint, TensorInfo

# What compress will do with a tensor: factorize its update (the result may still be stored
# dense or as zero, see artifact.TensorKind), store it whole, or store it once under another name.
PlanAction = Literal["factorize", "dense", "alias"]

# Used only when there is no config.json to build the model's module tree from.
_EMBEDDING_NAME = re.compile(r"(^|\.)(embed\w*|wte|wpe|lm_head|tok_embeddings|word_embeddings|position_embeddings)\.weight$|^output\.weight$")


@dataclass(frozen=True)
class PlanOptions:
    """Everything that shapes what compress stores. Defaults: docs/design.md §4."""

    rule: RankRule = field(default_factory=RankRule)
    engine: str = "auto"
    device: str = "cpu"
    factor_dtype: torch.dtype | None = None  # None: each tensor's source dtype
    embeddings: bool = True
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    float64: bool = False
    seed: int = 0
    # None: int8 where the artifact is lossy and no factor_dtype is named (storage_for); "int8", "int4";
    # "none": float factors (factor_dtype, else bfloat16).
    quantize: str | None = None
    # A global size budget (at most one): the artifact's tensor file <= target_ratio x the source's
    # dense bytes, or <= target_size bytes; ranks and rows are then allocated across tensors (budget.py).
    target_ratio: float | None = None
    target_size: int | None = None

    @property
    def has_target(self) -> bool:
        return self.target_ratio is not None or self.target_size is not None

    @property
    def lossless(self) -> bool:
        """The rule keeps every update whole (threshold 1, no fixed rank): nothing may be rounded."""
        return self.rule.fixed_rank is None and self.rule.threshold >= 1.0 and not self.has_target


@dataclass
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    action: PlanAction
    reason: str = ""
    alias_of: str | None = None
    reference_rows: int | None = None  # the reference has fewer rows (a grown vocabulary)

    @property
    def new_rows(self) -> int:
        """How many rows the reference lacks (a grown vocabulary's new tokens)."""
        return 0 if self.reference_rows is None else self.shape[0] - self.reference_rows

    @property
    def forced_rows(self) -> torch.Tensor | None:
        """The rows the reference lacks (a grown vocabulary's new tokens): always stored rows."""
        return None if self.reference_rows is None else torch.arange(self.reference_rows, self.shape[0])

    @property
    def nbytes(self) -> int:
        return TensorInfo(self.name, self.shape, self.dtype).nbytes

    @property
    def breakeven_rank(self) -> int | None:
        """The largest rank at which B, A take fewer bytes than the dense tensor."""
        if len(self.shape) != 2:
            return None
        rows, cols = self.shape
        return max(0, (rows * cols - 1) // (rows + cols))

    def to_json(self) -> dict:
        """A layer of ``compress --dry-run --json``: a compress layer's keys, with what only the
        factorization can tell (kind, rank, bytes) null, and the planned action."""
        return {"name": self.name, "shape": list(self.shape), "dtype": dtype_name(self.dtype), "kind": None,
                "rank": None, "bytes": None, "original_bytes": self.nbytes, "action": self.action,
                "reason": self.reason, "breakeven_rank": self.breakeven_rank}


@dataclass
class Plan:
    entries: list[TensorPlan]
    options: PlanOptions

    @property
    def original_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries if entry.action != "alias")

    @property
    def tied(self) -> dict[str, str]:
        return {entry.name: entry.alias_of for entry in self.entries if entry.action == "alias"}

    def to_json(self, source: str, reference: str) -> dict:
        """``compress --dry-run --json``: compress's own JSON shape (docs/design.md §10) with what only the
        factorization can tell left null (kind, rank, bytes, ratio) and each tensor's planned action."""
        options = self.options
        rule = (f"target ratio {options.target_ratio:g}" if options.target_ratio is not None
                else f"target size {options.target_size} bytes" if options.target_size is not None
                else options.rule.describe())
        layers = [entry.to_json() for entry in self.entries if entry.action != "alias"]  # aliases: under "tied"
        return {"dry_run": True, "output": None, "source": source, "reference": reference, "rule": rule,
                "original_bytes": self.original_bytes, "compressed_bytes": None, "ratio": None, "seconds": None,
                "tied": self.tied, "notes": [], "layers": layers}


def embedding_parameter_names(config: dict | None, names: list[str]) -> set[str]:
    """Weights of the model's input and output embeddings.

    Built from the model's module tree on the meta device (no memory, no init cost) when the
    config is known, so any architecture's naming works; by name patterns otherwise.
    """
    if config is not None:
        try:
            model_config = config_from_dict(config)
            if model_config is not None:
                model = meta_model(model_config)
                embeddings = embedding_weight_names(model)
                # Saved names are not always module paths (GPT-NeoX saves lm_head as embed_out.weight).
                return embeddings | {name for name, key in checkpoint_keys(model, names).items() if key in embeddings}
        except Exception:  # noqa: BLE001 - a custom architecture transformers cannot build: fall back to names
            pass
    return {name for name in names if _EMBEDDING_NAME.search(name)}


def find_ties(checkpoint: Checkpoint, infos: dict[str, TensorInfo]) -> dict[str, str]:
    """alias -> canonical for tensors that are the same weight stored under two names.

    Shared storage in a pickle is a tie for sure; otherwise equal shape and dtype, equal first
    row, then full equality confirms it (the full compare runs only on those rare candidates).
    """
    ties: dict[str, str] = {}
    for group in checkpoint.shared_storage_groups():
        for alias in group[1:]:
            ties[alias] = group[0]
    candidates: dict[tuple, list[str]] = {}
    for name, info in infos.items():
        if name in ties or len(info.shape) != 2 or not info.dtype.is_floating_point:
            continue
        candidates.setdefault((info.shape, info.dtype), []).append(name)
    for names in candidates.values():
        if len(names) < 2:
            continue
        by_row: dict[bytes, list[str]] = {}
        for name in names:
            row = checkpoint.first_row(name).contiguous()
            by_row.setdefault(row.view(torch.uint8).numpy().tobytes(), []).append(name)
        for same_row in by_row.values():
            if len(same_row) < 2:
                continue
            first = checkpoint.get(same_row[0])
            for other in same_row[1:]:
                if torch.equal(first, checkpoint.get(other)):
                    ties[other] = same_row[0]
    return ties


def dense_tensor_bytes(checkpoint: Checkpoint) -> int:
    """A checkpoint's size as compress counts it (a plan's ``original_bytes``): the dense bytes of
    its tensors, tied ones once, no file headers."""
    infos = checkpoint.infos()
    ties = find_ties(checkpoint, infos)
    return sum(info.nbytes for name, info in infos.items() if name not in ties)


def grown_rows(trained: TensorInfo, reference: TensorInfo) -> int | None:
    """The reference's row count when the trained tensor only adds rows to it (a fine-tune whose
    vocabulary grew: embeddings and heads get new rows at the end), else None."""
    same_rest = tuple(trained.shape[1:]) == tuple(reference.shape[1:])
    if len(trained.shape) >= 1 and same_rest and 0 < reference.shape[0] < trained.shape[0] \
            and trained.dtype.is_floating_point:
        return int(reference.shape[0])
    return None


def check_reference_matches(trained: dict[str, TensorInfo], ties: dict[str, str], reference: Reference,
                            reference_aliases: set[str]) -> dict[str, int]:
    """Every trained tensor must have a reference tensor of the same shape, and vice versa, except
    that a trained tensor may have more rows (a grown vocabulary). Returns name -> reference rows
    of those grown tensors."""
    ref_infos = reference.infos()
    if ref_infos is None:
        return {}
    missing = [name for name in trained if name not in ties and name not in ref_infos]
    extra = [name for name in ref_infos if name not in trained and name not in reference_aliases]
    grown = {name: rows for name, info in trained.items() if name in ref_infos
             and (rows := grown_rows(info, ref_infos[name])) is not None}
    shapes = [f"{name} {list(info.shape)} vs {list(ref_infos[name].shape)}" for name, info in trained.items()
              if name in ref_infos and name not in grown and tuple(ref_infos[name].shape) != tuple(info.shape)]
    if missing:
        raise MismatchError(f"init lacks {len(missing)} tensor(s) of the trained model: {', '.join(missing[:3])}",
                            "trained vs init", "pass the init of this very model (same architecture and size)")
    if extra:
        raise MismatchError(f"init has {len(extra)} tensor(s) the trained model lacks: {', '.join(extra[:3])}",
                            "trained vs init", "pass the init of this very model (same architecture and size)")
    if shapes:
        raise MismatchError(f"init and trained shapes differ: {'; '.join(shapes[:3])}", "trained vs init",
                            "pass the init of this very model (same architecture and size)")
    return grown


# The float dtypes an update is computed in and an artifact stores; float8 (and any newer format)
# has no arithmetic on CPU and no place in the format: refused in one line, never half-handled.
FACTORIZABLE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_patterns(options: PlanOptions, names: list[str]) -> None:
    """Every --include / --exclude pattern must match a tensor: a pattern that matches nothing (a
    typo, a malformed bracket) would otherwise store the whole model dense, or factorize what the
    user meant to keep, in silence."""
    for option, patterns in (("--include", options.include), ("--exclude", options.exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                example = names[0] if names else "model.layers.*.mlp.*"
                raise UsageError(f"{flag(option)} {pattern!r} matches no tensor of the checkpoint", flag(option),
                                 f"patterns are shell-style and match whole names, e.g. {flag(option)} "
                                 f"'{example.rsplit('.', 1)[0]}.*'; 'inrank-convert spectrum CKPT' lists the names")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def make_plan(trained: Checkpoint, reference: Reference, options: PlanOptions,
              reference_aliases: set[str] | None = None) -> Plan:
    infos = trained.infos()
    ties = find_ties(trained, infos)
    grown = check_reference_matches(infos, ties, reference, reference_aliases or set())
    # Only --no-embeddings needs to know which tensors are embeddings (and building the module
    # tree costs a transformers import), so it is worked out only then.
    embeddings = set() if options.embeddings else embedding_parameter_names(trained.config(), list(infos))
    check_patterns(options, list(infos))
    entries = []
    for name, info in infos.items():
        if info.dtype.is_floating_point and info.dtype not in FACTORIZABLE_DTYPES:
            raise CheckpointError(f"tensor {name!r} is {dtype_name(info.dtype)}, which inrank-convert cannot factorize "
                                  "or store", str(trained.path),
                                  "convert the checkpoint to bfloat16, float16 or float32 first (e.g. "
                                  "model.to(torch.bfloat16).save_pretrained(...))")
        entry = TensorPlan(name, info.shape, info.dtype, "factorize", reference_rows=grown.get(name))
        if name in ties:
            entry.action, entry.alias_of, entry.reason = "alias", ties[name], f"tied to {ties[name]}"
        elif not info.dtype.is_floating_point:
            entry.action, entry.reason = "dense", "not a float tensor"
        elif len(info.shape) != 2:
            entry.action, entry.reason = "dense", f"{len(info.shape)}-D tensor"
        elif options.include and not _matches(name, options.include):
            entry.action, entry.reason = "dense", f"not matched by {flag('--include')}"
        elif _matches(name, options.exclude):
            entry.action, entry.reason = "dense", f"matched by {flag('--exclude')}"
        elif name in embeddings and not options.embeddings:
            entry.action, entry.reason = "dense", f"embedding ({flag('--no-embeddings')})"
        elif entry.breakeven_rank == 0:
            entry.action, entry.reason = "dense", "too small for any rank to pay"
        entries.append(entry)
    return Plan(entries, options)


def costs_for(options: PlanOptions, entry: TensorPlan) -> Costs:
    """What each stored number, component or row of ``entry`` costs at its storage precision, and its dense bytes."""
    storage = storage_for(options, entry)
    return Costs(**storage_costs(storage), dense=entry.nbytes)


# Lossy factors and rows are int8 unless the user names a float storage: measured on held-out text
# the run never trained on, int8 at threshold 0.95 is both smaller and closer to the dense model
# than bfloat16 at 0.9 (docs/rank-selection.md "The default threshold").
DEFAULT_LOSSY_STORAGE = "int8"
LOSSY_FLOAT_STORAGE = "bfloat16"


def storage_for(options: PlanOptions, entry: TensorPlan) -> str:
    """The precision factors and rows are stored at (format versions 2 and 3): --quantize int8 or int4, else
    --dtype, else float32 when the rule is lossless (float64 for a float64 source: factors of a
    half-precision update rounded to half precision would not be exact), else bfloat16 under
    --quantize none, else int8."""
    if options.quantize in QUANTIZE_SCHEMES:
        return options.quantize
    if options.factor_dtype is not None:
        return dtype_name(options.factor_dtype)
    if options.lossless:
        return "float64" if entry.dtype == torch.float64 else "float32"
    return LOSSY_FLOAT_STORAGE if options.quantize == NO_QUANTIZATION else DEFAULT_LOSSY_STORAGE
