"""export-peft --target vllm: the exact adapter plan cut down to what vLLM serves.

vLLM (0.34, read from its source: vllm/lora/peft_helper.py, lora_model.py, utils.py, and each model
class's ``embedding_modules``) loads a PEFT LoRA adapter only if it is LoRA and nothing else:

- ``modules_to_save`` is refused except for a classifier head ("vLLM only supports modules_to_save
  being either None or [classifier, score]"), so changed norms, saved-whole modules and a grown
  vocabulary cannot go in; PEFT's trainable tokens (``trainable_token_indices``) are not read at all
  (their tensors are an "unsupported LoRA weight");
- LoRA on the input embedding (``lora_embedding_A`` [r, vocab] / ``lora_embedding_B`` [dim, r]) and on
  the LM head is served only by the model classes that declare them in ``embedding_modules``
  (LLaMA, Qwen3, Mixtral, Granite, ...: ``EMBEDDING_LORA``); vLLM's Mistral and Qwen2 classes declare
  none and its GPT-2 class serves no LoRA at all;
- LoRA bias was removed from vLLM in 2025 (vllm-project/vllm#25807), and PEFT's ``bias="all"`` (the
  trained biases written into the base layers) was never read by it;
- every LoRA's rank must fit the server's ``--max-lora-rank`` (one of 1, 8, 16, 32, 64, 128, 256, 320,
  512); vLLM checks the config's ``r`` (and ``rank_pattern``) against it.

So this plan keeps the LoRA targets on Linear / Conv1D projections, and on the token embedding and
the LM head where the architecture serves them; a target whose rank exceeds ``max_rank`` is kept as
the best rank-``max_rank`` approximation of its update (a truncated SVD: approximate, listed). A
``lowrank+rows`` embedding's whole update (its rows included) goes in as an embedding LoRA of rank
at most the model width: exact whenever the width fits the cap. Everything else that changed is
listed as dropped: name, modules, what, the parameters and bytes it leaves out, and why. The plan
itself (which module gets which treatment, exactly) comes from ``peft_plan.plan_adapter``, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from inrank_convert.artifact import Artifact
from inrank_convert.core.errors import UsageError, flag
from inrank_convert.export.peft_plan import AdapterPlan, LoraTarget

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks (v0.14 to 0.34)
DEFAULT_MAX_RANK = VLLM_MAX_LORA_RANKS[-1]  # the largest a vLLM server takes: only what it cannot serve is cut
TARGETS = ("peft", "vllm")

# The transformers classes whose vLLM model class declares LoRA on embed_tokens and lm_head
# (``embedding_modules`` in vllm/model_executor/models/*.py, vLLM 0.34).
EMBEDDING_LORA = frozenset({
    "ApertusForCausalLM", "Exaone4ForCausalLM", "FalconH1ForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM",
    "GraniteMoeHybridForCausalLM", "GraniteMoeSharedForCausalLM", "JambaForCausalLM", "Lfm2ForCausalLM",
    "Lfm2MoeForCausalLM", "LlamaForCausalLM", "MiniCPMForCausalLM", "MixtralForCausalLM", "NemotronForCausalLM",
    "NemotronHForCausalLM", "PhimoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
})

_WHY = {
    "embedding": "vLLM serves LoRA on the token embedding only for the model classes that declare it (LLaMA, "
                 "Qwen3, Mixtral, Granite, ...; not Mistral, Qwen2 or GPT-2)",
    "lm_head": "vLLM serves LoRA on the LM head only for the model classes that declare it (LLaMA, Qwen3, "
               "Mixtral, Granite, ...; not Mistral, Qwen2 or GPT-2)",
    "bias": "vLLM serves no adapter biases (LoRA bias support removed, vllm-project/vllm#25807)",
    "norm": "vLLM refuses modules_to_save (vllm-project/vllm#9280), and a norm has no LoRA form",
    "module": "vLLM refuses modules_to_save (vllm-project/vllm#9280)",
    "vocabulary": "vLLM refuses modules_to_save and serves the base's vocabulary",
}


@dataclass(frozen=True)
class ServingRules:
    """What a server's adapter format takes: LoRA on linear projections; on the token embedding and
    the LM head for the model classes ``embedding_lora`` names (None: every class); and why each
    other kind of change is left out (by ``DroppedChange.what``)."""

    server: str
    why: dict[str, str]
    embedding_lora: frozenset[str] | None = frozenset()

    def takes_embedding_lora(self, model) -> bool:
        return self.embedding_lora is None or type(model).__name__ in self.embedding_lora


VLLM = ServingRules("vLLM", _WHY, EMBEDDING_LORA)


@dataclass
class DroppedChange:
    """A change of the artifact the vLLM adapter leaves out (or, ``truncated``, carries in part)."""

    name: str  # the artifact tensor
    modules: list[str]  # the modules of the model it belongs to (two for a tied embedding)
    what: str  # embedding | lm_head | bias | norm | module | truncated
    parameters: int  # values left out: the whole tensor; for a truncated matrix, the LoRA parameters past the cap
    bytes: int  # those values as stored (the tensor's dtype; float32 factors for a truncated matrix)
    reason: str
    rank: int | None = None  # truncated: the update's rank
    kept_rank: int | None = None  # truncated: the LoRA's rank
    energy_kept: float | None = None  # truncated: sum(s[:kept]^2) / sum(s^2) of the update, once written

    @property
    def why(self) -> str:
        if self.what != "truncated":
            return self.reason
        kept = "" if self.energy_kept is None else f", {100 * self.energy_kept:.2f}% of its energy kept"
        return f"rank {self.rank} > the rank cap {self.kept_rank}: a truncated SVD (approximate{kept})"

    def to_json(self) -> dict:
        values = {"name": self.name, "modules": self.modules, "what": self.what, "parameters": self.parameters,
                  "bytes": self.bytes, "why": self.why}
        if self.what == "truncated":
            values |= {"rank": self.rank, "kept_rank": self.kept_rank, "energy_kept": self.energy_kept}
        return values


def dropped_whole(name: str, entry, module: str, what: str, reason: str) -> DroppedChange:
    """The artifact tensor ``name`` (its manifest ``entry``) left out whole: all its values, at its dtype."""
    count = math.prod(entry.shape)
    return DroppedChange(name, [module], what, count, count * entry.dtype.itemsize, reason)


def check_target(target: str, max_rank: int | None) -> int | None:
    """The rank cap of ``target`` (None: no cap); refuses an unknown target and a cap it cannot use."""
    if target not in TARGETS:
        raise UsageError(f"unknown export target {target!r}", f"{flag('--target')} {target}",
                         f"choose {' or '.join(TARGETS)} (peft: exact, any PEFT loader; vllm: what vLLM serves)")
    if target != "vllm":
        if max_rank is not None:
            raise UsageError(f"{flag('--max-rank')} caps the ranks of a vLLM adapter only; the PEFT adapter is exact",
                             f"{flag('--max-rank')} {max_rank}", f"add {flag('--target')} vllm, or drop {flag('--max-rank')}")
        return None
    cap = DEFAULT_MAX_RANK if max_rank is None else max_rank
    if not 1 <= cap <= VLLM_MAX_LORA_RANKS[-1]:
        raise UsageError(f"{flag('--max-rank')} must lie in [1, {VLLM_MAX_LORA_RANKS[-1]}] (vLLM's largest "
                         "--max-lora-rank)", f"{flag('--max-rank')} {max_rank}", f"e.g. {flag('--max-rank')} 64")
    return cap


def serving_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds a LoRA of ``rank``."""
    return next(value for value in VLLM_MAX_LORA_RANKS if value >= rank)


def vllm_plan(plan: AdapterPlan, artifact: Artifact, model, max_rank: int) -> tuple[AdapterPlan, list[DroppedChange]]:
    """``plan`` (the exact adapter) restricted to what vLLM serves (``serving_plan``)."""
    return serving_plan(plan, artifact, model, max_rank, VLLM)


def serving_plan(plan: AdapterPlan, artifact: Artifact, model, max_rank: int,
                 rules: ServingRules) -> tuple[AdapterPlan, list[DroppedChange]]:
    """``plan`` (the exact adapter) restricted to LoRA of rank <= ``max_rank`` on linear projections
    (and on the token embedding and LM head where ``rules`` take them), and what that leaves out, in
    the artifact's tensor order."""
    why = rules.why
    tensors = artifact.tensors
    modules = dict(model.named_modules())
    output = model.get_output_embeddings()
    heads = {name for name, module in modules.items() if output is not None and module is output}
    embeddings = rules.takes_embedding_lora(model)
    token_embedding = model.get_input_embeddings()  # the one embedding a server adapts (no learned positions)
    dropped: dict[str, DroppedChange] = {}

    def drop(name: str, module: str, what: str, reason: str | None = None) -> None:
        entry = tensors[name]
        item = dropped.get(name)
        if item is None:
            dropped[name] = dropped_whole(name, entry, module, what, reason or why[what])
        elif module not in item.modules:
            item.modules.append(module)

    kept: list[LoraTarget] = []
    for target in plan.targets:
        if target.placeholder:
            continue
        if target.layout == "embedding" and not (embeddings and modules[target.module] is token_embedding):
            drop(target.source, target.module, "embedding")
        elif target.module in heads and not embeddings:
            drop(target.source, target.module, "lm_head")
        elif target.rank > max_rank:
            rows, cols = target.shape
            cut = (target.rank - max_rank) * (rows + cols)
            dropped[target.source] = DroppedChange(target.source, [target.module], "truncated", cut, 4 * cut, "",
                                                   target.rank, max_rank)
            kept.append(replace(target, rank=max_rank, truncated_from=target.rank))
        else:
            kept.append(target)
    for module_name in plan.modules_to_save:
        module = modules[module_name]
        for name in plan.module_keys[module_name].values():
            entry = tensors[name]
            if entry.reference_rows is not None:
                what = "lm_head" if module_name in heads else "embedding"
                reason = (f"a grown vocabulary ({entry.shape[0]} rows, the base {entry.reference_rows}): "
                          f"{why['vocabulary']}")
            elif isinstance(module, torch.nn.Embedding) or module_name in heads:
                what = "lm_head" if module_name in heads else "embedding"
                reason = f"{why[what]}; stored {entry.kind} with an unknown reference, so it has no LoRA form"
            elif "norm" in type(module).__name__.lower():
                what, reason = "norm", None
            else:
                what = "module"
                reason = (f"stored {entry.kind} and its reference is not known (an embedded init), so it has no "
                          f"LoRA form; {why['module']}")
            drop(name, module_name, what, reason)
    for name in plan.biases.values():
        drop(name, name.rpartition(".")[0], "bias")

    if not kept:
        raise UsageError(f"none of the artifact's changes is on a module {rules.server} adapts, so its adapter "
                         "would carry nothing", str(artifact.path),
                         f"use the exact adapter ({flag('--target')} peft) or 'inrank-convert decompress' for the "
                         "dense model")
    targets = {target.module for target in kept}
    carried = [item for item in plan.carried_in_full if all(module in targets for module in item.modules)
               and item.name not in dropped]
    notes = [item.why for item in carried]
    if model.config.model_type == "gpt2" and rules is VLLM:
        notes.append("vLLM's GPT-2 (GPT2LMHeadModel) implements no LoRA, so vLLM does not serve this adapter on "
                     "GPT-2; PEFT loads it")
    restricted = AdapterPlan(kept, [], {}, {}, plan.unchanged, notes, carried, None)
    return restricted, [dropped[name] for name in tensors if name in dropped]


def dropped_summary(dropped: list[DroppedChange], shown: int = 3, rules: ServingRules = VLLM) -> list[str]:
    """The dropped changes as a few lines, one per kind (what --json lists tensor by tensor)."""
    if not dropped:
        return []
    lines = []
    for what in ("truncated", "embedding", "lm_head", "norm", "bias", "module"):
        items = [item for item in dropped if item.what == what]
        if not items:
            continue
        count = sum(item.parameters for item in items)
        if what == "truncated":
            names = [f"{item.name} rank {item.rank}->{item.kept_rank}"
                     + ("" if item.energy_kept is None else f" ({100 * item.energy_kept:.1f}% energy)")
                     for item in items[:shown]]
            head = f"{len(items)} truncated to rank {items[0].kept_rank} ({count:,} LoRA parameters cut)"
            why = "approximate: the best low-rank fit of the update"
        else:
            names = [item.name for item in items[:shown]]
            head = f"{len(items)} {what} tensor{'s' if len(items) > 1 else ''} ({count:,} parameters) left out"
            why = rules.why[what]
        more = f", and {len(items) - shown} more" if len(items) > shown else ""
        lines.append(f"{head}: {', '.join(names)}{more}; {why}")
    return lines
