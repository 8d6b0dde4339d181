"""The fine-tune benchmark's peer: mergekit's ``mergekit-extract-lora``, run in its own environment
(``make bench-peers`` builds it; ``INRANK_MERGEKIT`` names its executable), at the largest rank whose
adapter fits the same bytes as this tool's artifact.

mergekit extracts every linear layer's delta (embedding and LM head included, ``--embed-lora``) at
one rank by SVD, and stores the norms whole (``modules_to_save``); its adapter is written in the
checkpoint's dtype (float32 here). Both its float32 adapter and the same adapter cast to bfloat16
(twice the rank for the bytes) are scored: the base with the adapter merged by PEFT, saved as a
checkpoint that ``report`` reads beside the artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from .common import log

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "build" / "peers" / "bin" / "mergekit-extract-lora"
PROBE_RANK = 8  # a first extraction measures the adapter's bytes per rank


def executable() -> Path | None:
    path = Path(os.environ.get("INRANK_MERGEKIT") or DEFAULT)
    return path if path.is_file() else None


def extract(tool: Path, finetune: Path, base: Path, out: Path, rank: int) -> float:
    """One extraction on the CPU, one thread; returns its wall time in seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run([str(tool), "--model", str(finetune), "--base-model", str(base), "--out-path", str(out),
                    "--max-rank", str(rank), "--embed-lora", "--device", "cpu", "-j", "1", "--no-async-write"],
                   check=True, capture_output=True, text=True, env=env)
    return time.perf_counter() - started


def adapter_bytes(folder: Path) -> tuple[int, int]:
    """(bytes of the low-rank tensors, bytes of the tensors stored whole) of an adapter's tensors,
    from the safetensors header alone."""
    from inrank_convert.weights.checkpoints import SafetensorsCheckpoint

    file = folder / "adapter_model.safetensors"
    infos = SafetensorsCheckpoint(file, [file], None).infos()
    low_rank = sum(info.nbytes for name, info in infos.items() if "lora_" in name)
    return low_rank, sum(info.nbytes for info in infos.values()) - low_rank


def cast_adapter(folder: Path, out: Path, dtype) -> None:
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    shutil.copy(folder / "adapter_config.json", out / "adapter_config.json")
    tensors = {name: tensor.to(dtype) for name, tensor in load_file(str(folder / "adapter_model.safetensors")).items()}
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def merged_checkpoint(base: Path, adapter: Path, out: Path) -> None:
    """The base with the adapter merged (PEFT), saved as a float32 checkpoint."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="float32")
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)


def prepare(root: Path, finetune: Path, base: Path, budget: int) -> dict[str, dict]:
    """Extract at the largest ranks whose float32 and bfloat16 adapters fit ``budget`` bytes; returns
    label -> {folder (a merged checkpoint for report), adapter_bytes, rank, seconds}. Empty without the tool."""
    import torch

    tool = executable()
    if tool is None:
        log(f"mergekit-extract-lora not found ({DEFAULT}; make bench-peers builds it): its rows are skipped")
        return {}
    probe = root / "mergekit-probe"
    extract(tool, finetune, base, probe, PROBE_RANK)
    low_rank, whole = adapter_bytes(probe)  # float32
    peers = {}
    for label, dtype, width in (("mergekit-float32", None, 4), ("mergekit-bfloat16", torch.bfloat16, 2)):
        per_rank, fixed = low_rank / PROBE_RANK * width / 4, whole * width / 4
        rank = int((budget - fixed) // per_rank)
        if rank < 1:
            log(f"{label}: no rank fits {budget:,} bytes")
            continue
        extracted = root / f"{label}-extracted"
        seconds = extract(tool, finetune, base, extracted, rank)
        adapter = extracted
        if dtype is not None:
            adapter = root / f"{label}-adapter"
            cast_adapter(extracted, adapter, dtype)
        merged = root / label
        merged_checkpoint(base, adapter, merged)
        stored = sum(adapter_bytes(adapter))
        peers[label] = {"folder": merged, "adapter_bytes": stored, "rank": rank, "seconds": round(seconds, 1),
                        "config": json.loads((adapter / "adapter_config.json").read_text())}
        log(f"{label:18s} rank {rank}: {stored:,} bytes in {seconds:.1f} s")
    return peers
