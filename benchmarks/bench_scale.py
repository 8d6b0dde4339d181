"""Benchmark: a run at the size users have. A LLaMA-7B-shaped bfloat16 pair (32 layers, hidden 4096,
MLP 11008, vocabulary 32000, untied head: 6.74 B parameters, 13.5 GB per checkpoint) written tensor
by tensor into sharded safetensors (one shard per layer, an index, a config.json: a Hugging Face
folder as users have them; never a whole model in memory), trained = init + a planted rank-32
update with 5% noise energy on every matrix. Then, each in a fresh process: a plain read of both
checkpoints from a cold page cache where the benchmark may empty it (root; the baseline), then
``compress --rank 64 --quantize none`` and ``compress -t 0.9 --quantize none``, with their wall
time, peak RSS (the kernel's VmHWM of the compress process) and artifact bytes.

Targets (issue of 2026-12): peak RSS <= 2 GB; ``--rank 64`` <= 5x the read of both checkpoints on
2 cores. Needs ~30 GB of free disk (the pair is removed afterwards); ``SCALE_LAYERS=N`` builds a
shallower model of the same widths (a quick look, not the benchmark). Not run by CI.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from .bench_memory import cli_path, run_cli
from .common import BenchResult, GiB, human_bytes, log, planted_update, scratch_dir, warm_page_cache

NAME = "scale"
HIDDEN, INTERMEDIATE, VOCAB, HEADS = 4096, 11008, 32000, 32
LAYERS = int(os.environ.get("SCALE_LAYERS", "32"))
PLANTED_RANK = 32
UPDATE_SCALE = 0.3  # the update's norm against the init's, per matrix
NOISE_FRACTION = 0.05
INIT_STD = 0.02
RSS_TARGET = 2 * 10**9
READ_RATIO_TARGET = 5.0
FREE_DISK_NEEDED = 30 * 10**9


def skip_reason() -> str | None:
    free = shutil.disk_usage(os.environ.get("TMPDIR", "/tmp")).free
    needed = FREE_DISK_NEEDED * LAYERS // 32
    if free < needed:
        return f"needs {human_bytes(needed)} of free disk for the pair, {human_bytes(free)} free"
    return None


def config(layers: int = LAYERS) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": HEADS,
            "num_key_value_heads": HEADS, "vocab_size": VOCAB, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2}


def shard_shapes(layers: int = LAYERS, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE,
                 vocab: int = VOCAB) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """(shard file, name -> shape) in the order the shards are written: the embedding, one shard per
    layer, then the final norm and the head."""
    shards = [("model-embed.safetensors", {"model.embed_tokens.weight": (vocab, hidden)})]
    for layer in range(layers):
        prefix = f"model.layers.{layer}"
        shapes = {f"{prefix}.input_layernorm.weight": (hidden,), f"{prefix}.post_attention_layernorm.weight": (hidden,)}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}.self_attn.{name}.weight"] = (hidden, hidden)
        for name in ("gate_proj", "up_proj"):
            shapes[f"{prefix}.mlp.{name}.weight"] = (intermediate, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, intermediate)
        shards.append((f"model-layer-{layer:03d}.safetensors", shapes))
    shards.append(("model-head.safetensors", {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}))
    return shards


def build_pair(root: Path, shards: list[tuple[str, dict[str, tuple[int, ...]]]], model_config: dict
               ) -> tuple[Path, Path]:
    """init/ and trained/ Hugging Face folders under ``root``, one shard in memory at a time."""
    from safetensors.torch import save_file

    folders = root / "init", root / "trained"
    for folder in folders:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(model_config, indent=1) + "\n")
    generator = torch.Generator().manual_seed(7)
    weight_map, total = {}, 0
    for file, shapes in shards:
        init, trained = {}, {}
        for name, shape in shapes.items():
            if len(shape) == 1:
                base = torch.ones(shape)
                update = 1e-3 * torch.randn(shape, generator=generator)
            else:
                base = INIT_STD * torch.randn(shape, generator=generator)
                norm = UPDATE_SCALE * float(torch.linalg.vector_norm(base))
                update = planted_update(*shape, PLANTED_RANK, norm, NOISE_FRACTION, generator)
            init[name] = base.to(torch.bfloat16)
            trained[name] = (base + update).to(torch.bfloat16)
            weight_map[name] = file
            total += init[name].numel() * 2
        save_file(init, str(folders[0] / file), metadata={"format": "pt"})
        save_file(trained, str(folders[1] / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for folder in folders:
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    return folders


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so that the read baseline reads the disk as a user's
    first compress of a downloaded model does; the pair was just written, and much of it would
    otherwise still be cached. Whether it could is recorded with the figures."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _shard_files(*folders: Path) -> list[Path]:
    return sorted(file for folder in folders for file in folder.glob("*.safetensors"))


def run() -> BenchResult:
    shards = shard_shapes()
    with scratch_dir("inrank-bench-scale-") as root:
        started = time.perf_counter()
        init_dir, trained_dir = build_pair(root, shards, config())
        files = _shard_files(init_dir, trained_dir)
        pair_bytes = sum(file.stat().st_size for file in files)
        log(f"built a {LAYERS}-layer LLaMA-7B-shaped bfloat16 pair, {human_bytes(pair_bytes)} in {len(files)} "
            f"shards, in {time.perf_counter() - started:.0f} s")
        rows = {}
        # The documented settings: bfloat16 factors, threshold 0.9 (compress's default is 0.95 in int8).
        for label, extra in (("rank 64", ["--rank", "64", "--quantize", "none"]),
                             ("t 0.9", ["--threshold", "0.9", "--quantize", "none"])):
            # The baseline right before each run, under the same page cache (the pair is larger
            # than this machine's memory, so both read mostly from disk).
            cold = drop_page_cache()
            read = warm_page_cache(*files)
            out = root / label.replace(" ", "-")
            args = [cli_path(), "compress", str(trained_dir), "--init", str(init_dir), "-o", str(out), "--json",
                    *extra]
            outcome = run_cli(args, root)
            if outcome["returncode"] != 0:
                raise RuntimeError(f"compress {label} failed ({outcome['returncode']}): {outcome['stderr'][-2000:]}")
            summary = json.loads(outcome["stdout"])
            peak = outcome["poll_peaks_bytes"]["VmHWM"]
            rows[label] = {"seconds": outcome["seconds"], "read_seconds": read, "read_from_cold_cache": cold,
                           "over_read": outcome["seconds"] / read,
                           "peak_rss_bytes": peak, "compressed_bytes": summary["compressed_bytes"],
                           "ratio": summary["ratio"], "command": args[1:]}
            log(f"compress {label}: {outcome['seconds']:.0f} s ({outcome['seconds'] / read:.2f}x a {read:.0f} s "
                f"{'cold' if cold else 'warm'} read), "
                f"peak RSS {human_bytes(peak)}, {human_bytes(summary['compressed_bytes'])} "
                f"({100 * summary['ratio']:.2f}% of the dense bytes)")
            shutil.rmtree(out, ignore_errors=True)
    fixed = rows["rank 64"]
    worst_rss = max(row["peak_rss_bytes"] for row in rows.values())
    passed = fixed["over_read"] <= READ_RATIO_TARGET and worst_rss <= RSS_TARGET
    return BenchResult(
        name=f"compress a 7B-shaped bf16 pair ({LAYERS} layers, 2x{human_bytes(pair_bytes / 2)})",
        measured=f"--rank 64 {fixed['seconds']:.0f} s, -t 0.9 {rows['t 0.9']['seconds']:.0f} s; peak RSS "
                 f"{worst_rss / GiB:.2f} GiB",
        baseline=f"plain read of both {fixed['read_seconds']:.0f} s",
        ratio=fixed["over_read"], ratio_label="--rank 64 / read",
        target=f"<= {READ_RATIO_TARGET:g}, peak RSS <= {RSS_TARGET / 1e9:g} GB", passed=passed,
        details={"layers": LAYERS, "pair_bytes": pair_bytes, "shards": len(files), "runs": rows})
