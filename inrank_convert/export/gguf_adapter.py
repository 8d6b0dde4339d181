"""export-gguf: the artifact's update as a llama.cpp LoRA adapter (a GGUF file).

llama.cpp (and everything built on it) loads a LoRA adapter as GGUF: ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, the base's ``general.architecture``, and per
adapted weight two tensors named after llama.cpp's own tensor name plus ``.lora_a`` ([r, in] in
torch's order, ne = [in, r]) and ``.lora_b`` ([out, r]); it adds ``scale * B @ A`` with
``scale = alpha / r`` per tensor (llama-adapter.cpp), r that tensor's own rank. So each module's B
here is multiplied by r / alpha (alpha = 1): every product comes out exactly ``B @ A``. This is what
llama.cpp's own ``convert_lora_to_gguf.py`` writes from a PEFT adapter (read for these facts), with
the names mapped by the ``gguf`` package it uses.

The LLaMA family's converter permutes the rows of q_proj and k_proj (the rotary halves interleaved,
``LlamaModel.permute``); a LoRA's rows live in B, so B is permuted the same way. Qwen2 is not
permuted.

The token embedding's change goes in as llama.cpp reads it (``llm_build_inp_embd``: the rows of
``token_embd.weight.lora_a`` looked up by token, times ``lora_b``): lora_a = B [vocab, r], lora_b =
A.T [dim, r] for ``delta = B @ A`` ([vocab, dim]); a ``lowrank+rows`` embedding as its whole update
(delta @ I, rank = the width: exact). Where the head is tied to the embedding, llama.cpp's output
is token_embd itself, used as a lookup and as a matrix product; an adapter on it is not checked
against llama.cpp, so the embedding's change (and so the head's) is left out there.

What llama.cpp's adapters cannot hold is left out and listed (stderr and ``--json``): norms, biases,
a grown vocabulary, the embedding of a tied head. Supported: LLaMA, Mistral, Qwen2 (``SUPPORTED``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from inrank_convert.core.errors import ArtifactError, UsageError
from inrank_convert.export.peft_adapter import lora_factors
from inrank_convert.export.peft_plan import LoraTarget, adapter_model_structure, plan_adapter
from inrank_convert.export.vllm_plan import DroppedChange, ServingRules, dropped_whole, serving_plan
from inrank_convert.inputs.sources import open_artifact
from inrank_convert.weights.outputs import atomic_output_file, check_output_outside

# model_type -> (the gguf package's architecture name, whether q_proj/k_proj rows are permuted)
SUPPORTED = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
ALPHA = 1.0
NO_RANK_CAP = 1 << 30

TOKEN_EMBD = "token_embd.weight"
LLAMA_CPP = ServingRules("llama.cpp", {
    "embedding": "the head is tied to the token embedding (llama.cpp's output is token_embd itself), and an "
                 "adapter on that shared tensor is not written: the embedding's change is left out",
    "lm_head": "",  # the head is served (output.weight.lora_a/b), as is the embedding
    "bias": "llama.cpp adapters hold LoRA pairs only: no biases",
    "norm": "llama.cpp adapters hold LoRA pairs only: a norm has no LoRA form",
    "module": "llama.cpp adapters hold LoRA pairs only",
    "vocabulary": "a llama.cpp adapter cannot change the vocabulary: it serves the base's",
}, embedding_lora=None)


@dataclass
class GgufExportResult:
    output: Path
    architecture: str  # general.architecture
    ranks: dict[str, int]  # llama.cpp tensor name -> LoRA rank
    tensors: int
    bytes: int
    dropped: list[DroppedChange] = field(default_factory=list)
    alpha: float = ALPHA

    def to_json(self) -> dict:
        return {"output": str(self.output), "architecture": self.architecture, "alpha": self.alpha,
                "ranks": self.ranks, "tensors": self.tensors, "bytes": self.bytes,
                "dropped": [item.to_json() for item in self.dropped]}


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The row order llama.cpp's HF converter gives a LLaMA q_proj / k_proj weight (its
    ``LlamaModel.permute``, with the KV head count for k_proj): each head's rows, in two rotary
    halves, interleaved. Applied to B [out, r], it permutes the rows of B @ A the same way."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def export_gguf(artifact_path: str | Path, output: str | Path, *, force: bool = False,
                init: str | Path | None = None, dtype: torch.dtype = torch.float32) -> GgufExportResult:
    """Write the llama.cpp LoRA adapter of the artifact at ``artifact_path`` to the file ``output``."""
    try:
        import gguf
    except ImportError as err:
        raise UsageError("export-gguf writes with the gguf package, which is not installed", "gguf",
                         "pip install 'inrank-convert[gguf]'") from err

    if dtype not in (torch.float32, torch.float16):
        raise UsageError("a GGUF adapter is written in float32 or float16", str(dtype), "pass --dtype float16 or float32")
    output = Path(output)
    check_output_outside(output, (Path(artifact_path),))
    artifact = open_artifact(artifact_path, init)
    try:
        if artifact.manifest.reference.mode == "zero":
            raise UsageError("a LoRA adapter needs a base model, but this artifact's reference is zero "
                             "(compressed with --no-init)", str(artifact.path),
                             "use 'inrank-convert decompress' for the dense model instead")
        config = _config(artifact.path)
        model_type = config.get("model_type")
        if model_type not in SUPPORTED:
            raise UsageError(f"export-gguf supports {', '.join(SUPPORTED)}, not {model_type!r}", str(artifact.path),
                             "use 'inrank-convert decompress' and llama.cpp's convert_hf_to_gguf.py for the dense model")
        arch, permuted = SUPPORTED[model_type]
        model = adapter_model_structure(artifact)
        plan, dropped = serving_plan(plan_adapter(artifact, model), artifact, model, NO_RANK_CAP, LLAMA_CPP)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], int(config["num_hidden_layers"]))
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        with atomic_output_file(output, force, artifact.input_paths()) as temp:
            writer = gguf.GGUFWriter(str(temp), arch)
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, ALPHA)
            ranks = {}
            named = [(target, _gguf_name(names, target)) for target in plan.targets]
            # A head tied to the embedding is named token_embd too (llama.cpp's output is that tensor).
            tied = sum(name == TOKEN_EMBD for _, name in named) > 1
            for target, name in named:
                if tied and name == TOKEN_EMBD:
                    if target.layout == "embedding":
                        dropped.append(dropped_whole(target.source, artifact.tensors[target.source],
                                                     target.module, "embedding", LLAMA_CPP.why["embedding"]))
                    continue
                B, A = _lora_pair(artifact, target, permuted, heads, kv_heads)
                writer.add_tensor(f"{name}.lora_a", A.to(dtype).contiguous().numpy())
                writer.add_tensor(f"{name}.lora_b", B.to(dtype).contiguous().numpy())
                ranks[name] = target.rank
            if not ranks:
                raise UsageError("none of the artifact's changes is on a projection llama.cpp adapts",
                                 str(artifact.path), "use 'inrank-convert decompress' for the dense model")
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        return GgufExportResult(output, arch, ranks, 2 * len(ranks), output.stat().st_size, dropped)
    finally:
        artifact.close()


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError("the artifact has no readable config.json", str(folder),
                            "put the model's config.json in the artifact folder") from err


def _gguf_name(names, target: LoraTarget) -> str:
    """llama.cpp's name of the weight ``target`` adapts (``blk.0.attn_q.weight``)."""
    base = names.get_name(target.source, try_suffixes=(".weight",))
    if base is None:
        raise UsageError(f"llama.cpp has no tensor for {target.source!r}", target.source,
                         "this architecture's layout is not one export-gguf knows")
    return base


def _lora_pair(artifact, target: LoraTarget, permuted: bool, heads: int, kv_heads: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair written as (lora_b, lora_a). A projection: (B [out, r] scaled by r / alpha and
    row-permuted where llama.cpp permutes the weight, A [r, in]). The token embedding, delta = B @ A
    [vocab, dim]: (A.T [dim, r] scaled by r / alpha, B [vocab, r]), the orientation llama.cpp reads."""
    B, A = lora_factors(artifact, target)  # the weight as stored ([out, in]; [vocab, dim]) gets B @ A
    if target.layout == "embedding":
        return A.float().T * (target.rank / ALPHA), B.float()
    B = B.float() * (target.rank / ALPHA)  # llama.cpp multiplies B @ A by alpha / r
    if permuted and target.source.endswith("self_attn.q_proj.weight"):
        B = permute_rows(B, heads)
    elif permuted and target.source.endswith("self_attn.k_proj.weight"):
        B = permute_rows(B, kv_heads)
    return B, A.float()
