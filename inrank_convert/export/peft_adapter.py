"""Export an artifact as a PEFT LoRA adapter over its reference (the init or base model).

``PeftModel.from_pretrained(reference_model, DIR)`` then computes what the artifact holds,
``W_ref + B @ A`` for every tensor, and not just for the factorized ones. How each kind of change is
carried (checked against peft 0.21's loader, and tested end to end in tests/export/test_peft_adapter.py):

- a low-rank update: a LoRA module with its own rank (``rank_pattern``) and ``lora_alpha = r``
  (``alpha_pattern``), so PEFT's scaling ``alpha / r`` is exactly 1. The factors keep their values;
  only their orientation changes (see ``_lora_tensors``);
- a dense-stored matrix (low rank was not smaller): an exact full-rank LoRA, the update times an
  identity (``delta = delta @ I``; no SVD, nothing lost beyond float32 rounding);
- a ``lowrank+rows`` input embedding (``B @ A`` plus K stored rows): PEFT's trainable tokens
  (``trainable_token_indices``), the rows whose rebuilt value differs from the base's saved with
  their values; a head tied to the embedding reads the same rows (PEFT ties it). PEFT wraps an
  embedding in LoRA or in trainable tokens, not both, so a row the low-rank part moves is one of
  the saved rows: exact, and never larger than the full-rank LoRA below;
- any other ``lowrank+rows`` matrix: PEFT has no row-sparse LoRA, so its whole update ``W - W_ref``
  (rebuilt from the artifact) goes in as that same exact full-rank LoRA;
- a matrix with more rows than its reference (a grown vocabulary: embeddings and the LM head of a
  fine-tune that added tokens), or a rows matrix whose reference is not known: the whole trained
  module goes to ``modules_to_save``. The base model must then be resized to the new vocabulary
  before the adapter is loaded (``base.resize_token_embeddings(n)``): PEFT copies the base module
  and loads the saved one into the copy, so the shapes must agree;
- an unchanged matrix (rank 0): not targeted at all;
- biases: ``bias="all"``. PEFT loads every ``...bias`` key of the adapter file into the base model
  (the trained value, not a difference), so a Conv1D/Linear bias changes with or without LoRA on
  its weight. ``lora_bias`` would be the other candidate, but PEFT refuses it on embedding layers;
- any other changed tensor (LayerNorm / RMSNorm weights, a dense matrix whose reference is not
  known): its module goes to ``modules_to_save`` (a full copy of that small leaf module);
- an embedding whose forward is not ``nn.Embedding``'s (OPT's learned positions are called with the
  attention mask and look up position + 2): PEFT's LoRA embedding would look up the wrong rows and
  crash, so the trained module goes to ``modules_to_save`` even when its update is low rank;
- tied weights (GPT-2's ``lm_head`` shares ``wte``): every module that uses the tensor gets the
  same update (the LoRA of an ``nn.Embedding`` and of the tied ``nn.Linear`` head), so the adapter
  is right whether or not the base model keeps the tie. Only ``merge_and_unload()`` on a tied base
  adds the update twice to the shared tensor (PEFT warns about it); ``decompress`` is the merged
  model. PEFT's ``ensure_weight_tying`` does not help: in peft 0.21 it recognizes only embeddings
  named ``embed_tokens``, drops ``lm_head`` from the config it saves, and still merges twice.

Every tensor carried in full rather than in the compact form the artifact stores it in (the two
rows cases above) is listed in ``PeftExportResult.carried_in_full`` (name, modules, why, bytes) and
in its notes: the adapter is exact, but larger than the artifact.

Every key of ``adapter_model.safetensors`` is one ``PeftModel.save_pretrained`` would write for
this config, so the adapter also loads with transformers' ``load_adapter`` and survives a re-save.

Which module is a Conv1D, a Linear or an Embedding comes from the model built on the meta device
from the artifact's ``config.json`` (no weights are allocated).

``target="vllm"`` is the one lossy export: the same plan (the embedding as a LoRA, since vLLM reads
no trainable tokens) cut down by ``vllm_plan.vllm_plan`` to LoRA on the modules vLLM adapts, of rank
at most the cap (a higher-rank update written as its truncated SVD, ``_truncated``), ``r =
lora_alpha`` = the largest rank; what it leaves out is in ``dropped``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inrank_convert.artifact import Artifact
from inrank_convert.core.errors import UsageError
from inrank_convert.export.peft_plan import (
    PEFT_PREFIX,
    AdapterPlan,
    CarriedInFull,
    LoraTarget,
    TokenRows,
    adapter_model_structure,
    plan_adapter,
)
from inrank_convert.export.vllm_plan import DroppedChange, check_target, serving_rank, vllm_plan
from inrank_convert.inputs.sources import open_artifact
from inrank_convert.linalg.svd import FactorProductSVD, exact_svd
from inrank_convert.weights.checkpoints import SIDE_FILES, copy_side_files
from inrank_convert.weights.outputs import TensorFileWriter, atomic_output_dir

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
TOKENIZER_FILES = tuple(name for name in SIDE_FILES if name not in ("config.json", "generation_config.json"))


@dataclass
class PeftExportResult:
    output: Path
    base: str  # where the base model PEFT needs comes from
    targets: list[LoraTarget]
    modules_to_save: list[str]
    biases: list[str]
    unchanged: list[str]
    tensors: int
    bytes: int
    notes: list[str] = field(default_factory=list)
    carried_in_full: list[CarriedInFull] = field(default_factory=list)
    resize_token_embeddings: int | None = None  # the vocabulary the base must be resized to first
    target: str = "peft"  # peft: exact; vllm: LoRA on linear projections only (see vllm_plan.py)
    max_rank: int | None = None  # vllm: the rank cap
    dropped: list[DroppedChange] = field(default_factory=list)  # vllm: what the adapter leaves out or truncates
    trainable_tokens: list[TokenRows] = field(default_factory=list)  # peft: embedding rows saved whole
    perplexity: dict | None = None  # filled by adapter_check.export_and_score when text is given

    @property
    def rank(self) -> int:
        """The largest LoRA rank in the adapter (vLLM's --max-lora-rank must be at least this)."""
        return max(target.rank for target in self.targets)

    def to_json(self) -> dict:
        vllm = {"max_rank": self.max_rank, "max_lora_rank": serving_rank(self.rank)} if self.target == "vllm" else {}
        return {
            "target": self.target, **vllm,
            "output": str(self.output), "base": self.base,
            "target_modules": [target.module for target in self.targets],
            "ranks": {target.module: target.rank for target in self.targets},
            "full_rank": [target.module for target in self.targets if target.full_rank],
            "modules_to_save": self.modules_to_save, "biases": self.biases, "unchanged": self.unchanged,
            "tensors": self.tensors, "bytes": self.bytes, "notes": self.notes,
            "carried_in_full": [item.to_json() for item in self.carried_in_full],
            "resize_token_embeddings": self.resize_token_embeddings,
            "dropped": [item.to_json() for item in self.dropped],
            "trainable_tokens": {item.module: {"name": item.source, "rows": len(item.indices), "bytes": item.bytes}
                                 for item in self.trainable_tokens},
            **({} if self.perplexity is None else {"perplexity": self.perplexity}),
        }


def export_peft(artifact_path: str | Path, output: str | Path, *, force: bool = False,
                init: str | Path | None = None, target: str = "peft", max_rank: int | None = None) -> PeftExportResult:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` for ``PeftModel.from_pretrained``.

    The base model is the artifact's reference: the recorded init/base folder, ``--init PATH``, or
    for a seed recipe or an embedded init the folder ``decompress --reference-only`` writes. When
    the artifact's vocabulary grew, ``resize_token_embeddings`` of the result says the size to
    resize the base to before loading the adapter.

    ``target="vllm"``: only what vLLM serves (LoRA on linear projections, ranks at most ``max_rank``,
    default 512); ``dropped`` of the result lists every change left out or truncated (vllm_plan.py).
    """
    cap = check_target(target, max_rank)
    artifact = open_artifact(artifact_path, init)
    try:
        mode = artifact.manifest.reference.mode
        if mode == "zero":
            raise UsageError("a PEFT adapter needs a base model, but this artifact's reference is zero "
                             "(compressed with --no-init)", str(artifact.path),
                             "use 'inrank-convert decompress' for the dense model instead")
        model = adapter_model_structure(artifact)
        plan = plan_adapter(artifact, model, tokens=cap is None)
        dropped: list[DroppedChange] = []
        if cap is not None:
            plan, dropped = vllm_plan(plan, artifact, model, cap)
        with atomic_output_dir(Path(output), force, artifact.input_paths()) as temp:
            with TensorFileWriter(temp / ADAPTER_WEIGHTS_FILE) as writer:
                count, energies = _write_tensors(writer, artifact, plan)
                size = writer.finish()
            config = _adapter_config(plan, _base_path(artifact, init), target)
            (temp / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            # Tokenizer files go next to the adapter, as PEFT trainers save them; config.json does not (with
            # it, from_pretrained(DIR) would take the folder for a full model rather than an adapter).
            copy_side_files(artifact.path, temp, TOKENIZER_FILES)
        for item in dropped:
            if item.what == "truncated":
                item.energy_kept = energies[item.modules[0]]
        return PeftExportResult(Path(output), _base_hint(artifact, init), plan.targets,
                                plan.modules_to_save, sorted(plan.biases), plan.unchanged, count, size,
                                plan.notes, plan.carried_in_full, plan.resize_token_embeddings, target, cap, dropped,
                                plan.trainable_tokens)
    finally:
        artifact.close()


# ----------------------------------------------------------------------------------------------
# Writing


def _lora_tensors(target: LoraTarget, B: torch.Tensor, A: torch.Tensor) -> dict[str, torch.Tensor]:
    """PEFT's tensors for ``delta = B @ A`` (B [rows, r], A [r, cols] in the weight's stored orientation).

    - nn.Linear, weight [out, in]: PEFT adds ``lora_B @ lora_A`` -> lora_B = B [out, r], lora_A = A [r, in].
    - Conv1D, weight [in, out] (``fan_in_fan_out``): PEFT adds ``(lora_B @ lora_A).T`` = A.T @ B.T,
      so lora_B = A.T [out, r], lora_A = B.T [r, in].
    - nn.Embedding, weight [num, dim]: PEFT adds ``(lora_embedding_B @ lora_embedding_A).T`` with
      lora_embedding_A [r, num] and lora_embedding_B [dim, r] -> A_e = B.T, B_e = A.T.
    """
    prefix = PEFT_PREFIX + target.module
    if target.layout == "linear":
        return {f"{prefix}.lora_A.weight": A, f"{prefix}.lora_B.weight": B}
    if target.layout == "conv1d":
        return {f"{prefix}.lora_A.weight": B.T, f"{prefix}.lora_B.weight": A.T}
    return {f"{prefix}.lora_embedding_A": B.T, f"{prefix}.lora_embedding_B": A.T}


def lora_factors(artifact: Artifact, target: LoraTarget) -> tuple[torch.Tensor, torch.Tensor]:
    if target.placeholder:
        rows, cols = target.shape
        return torch.zeros(rows, 1), torch.zeros(1, cols)
    if not target.full_rank:
        artifact.check_overflow(target.source)  # the adapter's weights are finite, the model they make must be
        return artifact.factors(target.source)
    # delta = W - W_ref of a dense-stored or lowrank+rows matrix (the artifact's own W, rebuilt:
    # reference + B @ A + rows), written as delta @ I (or I @ delta when wide): r = min(rows, cols);
    # no decomposition, so nothing is lost beyond float32 rounding.
    delta = artifact.reconstruct(target.source).float() - artifact.reference.get(target.source).float()
    rows, cols = delta.shape
    if rows >= cols:
        return delta, torch.eye(cols)  # [rows, cols] @ [cols, cols]
    return torch.eye(rows), delta  # [rows, rows] @ [rows, cols]


def _truncated(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` approximation of ``B @ A`` (B [rows, k], A [k, cols], k > rank) as factors
    [rows, rank] and [rank, cols], and the fraction of ``||B @ A||_F^2`` it keeps.

    In float32 through ``FactorProductSVD`` (no [rows, cols] product is formed beyond what a dense
    update already is), its k x k SVD by ``exact_svd`` (retried in float64 if it fails to converge).
    """
    svd = FactorProductSVD.of(B.float(), A.float(), svd=lambda middle: exact_svd(middle)[:3])
    total = float((svd.S.double() ** 2).sum())
    kept = float((svd.S[:rank].double() ** 2).sum()) / total if total > 0 else 1.0
    return (*svd.balanced(rank), kept)


def _write_tensors(writer: TensorFileWriter, artifact: Artifact, plan: AdapterPlan) -> tuple[int, dict[str, float]]:
    """Every tensor of the plan; the count, and the energy each truncated LoRA keeps (by module)."""
    count = 0
    energies: dict[str, float] = {}
    for target in plan.targets:
        B, A = lora_factors(artifact, target)
        if target.truncated_from is not None:
            B, A, energies[target.module] = _truncated(B, A, target.rank)
        for key, tensor in _lora_tensors(target, B, A).items():
            writer.add(key, tensor)
            count += 1
    for module_name in plan.modules_to_save:
        # A ModulesToSaveWrapper is loaded from the module's own keys (PEFT maps them to the copy).
        for attribute, name in plan.module_keys[module_name].items():
            writer.add(f"{PEFT_PREFIX}{module_name}.{attribute}", artifact.reconstruct(name))
            count += 1
    for item in plan.trainable_tokens:
        # PEFT saves the rows' values (not their change): it writes them over the base's rows.
        writer.add(f"{PEFT_PREFIX}{item.module}.token_adapter.trainable_tokens_delta", item.values)
        count += 1
    for key, name in sorted(plan.biases.items()):
        writer.add(key, artifact.reconstruct(name))
        count += 1
    return count, energies


def _adapter_config(plan: AdapterPlan, base_path: str | None, target: str = "peft") -> dict:
    ranks = {target.module: target.rank for target in plan.targets}
    # PEFT reads rank_pattern / alpha_pattern keys as regular expressions matched at the end of a module
    # name: escaped full names match exactly one module. alpha = r everywhere makes the scaling exactly 1.
    pattern = {re.escape(module): rank for module, rank in ranks.items()}
    default = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    if target == "vllm":
        # vLLM ignores rank_pattern / alpha_pattern: it scales every module by lora_alpha / r and checks only r
        # against --max-lora-rank, so r is the largest rank (and lora_alpha = r keeps the scaling at 1).
        default = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "inference_mode": True,
        "r": default,
        "lora_alpha": default,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": [target.module for target in plan.targets],
        "modules_to_save": plan.modules_to_save or None,
        "trainable_token_indices": {item.module: item.indices for item in plan.trainable_tokens} or None,
        "bias": "all" if plan.biases else "none",
        # Conv1D stores its weight [in, out]; PEFT decides per module, this is only the starting value.
        "fan_in_fan_out": any(target.layout == "conv1d" for target in plan.targets),
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
    }
    try:
        import peft

        config["peft_version"] = peft.__version__
    except ImportError:
        pass
    return config


def _base_path(artifact: Artifact, init: str | Path | None) -> str | None:
    if init is not None:
        return str(Path(init).resolve())
    reference = artifact.manifest.reference
    return reference.path if reference.mode == "reference" else None


def _base_hint(artifact: Artifact, init: str | Path | None) -> str:
    path = _base_path(artifact, init)
    if path is not None:
        return path
    return f"write it with 'inrank-convert decompress {artifact.path} --reference-only -o BASE'"


