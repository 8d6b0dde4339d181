"""A fine-tune's update served everywhere, scored on the same tokens (docs/export.md's table).

A 4x128 LLaMA with GPT-2's vocabulary (untied head) trained dense 200 steps on Tiny Shakespeare (the
base), fine-tuned 100 steps on WikiText-2 valid (lr 1e-3), the fine-tune compressed against the
base at energy 0.99 and 0.9, and then each served form scored on the first 8,192 tokens of
WikiText-2 test in windows of 64 (the model's context), each window predicting its own 63 next
tokens: the base, the fine-tune, the artifact (``load_compressed``), base + the PEFT adapter
(``export-peft``), base + the vLLM adapter (``--target vllm``, loaded by PEFT: vLLM needs a GPU),
base + the llama.cpp adapter (``export-gguf``) in llama.cpp itself over the base converted by
llama.cpp's own converter at float32. The llama.cpp rows need what ``make test-serving`` builds
(``PYTHONPATH=build/serving/site INRANK_LLAMA_CPP=build/serving/llama.cpp``); without it they are
left out, said so.

    python -m benchmarks.serving_finetune [--out DIR]    # ~10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TOKENS, WINDOW = 8192, 64
THRESHOLDS = ("0.99", "0.9")


def cli(*args) -> str:
    result = subprocess.run([sys.executable, "-m", "inrank_convert", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: inrank-convert {' '.join(map(str, args[:2]))} failed: {result.stderr.strip()}")
    return result.stdout


def last_step(run: Path) -> Path:
    return max(run.glob("step-*"), key=lambda path: int(path.name.split("-")[1]))


def window_nll(logits_of, tokens: torch.Tensor) -> float:
    """Perplexity over non-overlapping windows of WINDOW tokens, each predicting its next WINDOW - 1."""
    total, count = 0.0, 0
    for start in range(0, len(tokens) - WINDOW + 1, WINDOW):
        window = tokens[start:start + WINDOW]
        logits = logits_of(window).double()  # [WINDOW, vocab]
        total += float(torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum"))
        count += WINDOW - 1
    return math.exp(total / count)


def torch_scorer(model):
    model.eval()

    def logits_of(window):
        with torch.no_grad():
            return model(window[None]).logits[0]
    return logits_of


def llama_cpp_scorer(base_gguf: Path, adapter: Path | None):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=None if adapter is None else str(adapter),
                          logits_all=True, n_ctx=WINDOW, n_threads=2, verbose=False, type_k=0, type_v=0)

    def logits_of(window):
        llm.reset()
        llm.eval(window.tolist())
        return torch.from_numpy(np.array(llm.scores[:WINDOW], dtype=np.float32))
    return logits_of


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "serving-finetune")
    args = parser.parse_args(argv)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = DATA / "gpt2-tokenizer"
    shakespeare, valid, test = (DATA / "tinyshakespeare" / "input.txt", DATA / "wikitext-2-raw" / "wiki.valid.raw",
                                DATA / "wikitext-2-raw" / "wiki.test.raw")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig

    from inrank_convert import load_compressed
    from inrank_convert.inputs.text import load_tokenizer, read_text_tokens

    tokenizer = load_tokenizer(tokenizer_dir)
    config = out / "config"
    if not (config / "config.json").is_file():
        LlamaConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=len(tokenizer), max_position_embeddings=WINDOW,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    tie_word_embeddings=False, architectures=["LlamaForCausalLM"]).save_pretrained(config)
    common = ["--batch-size", "16", "--block-size", str(WINDOW), "--seed", "0", "--quiet"]
    if not (out / "base").is_dir():
        cli("train", config, "-o", out / "base", "--data", shakespeare, "--tokenizer", tokenizer_dir, "--steps", 200,
            "--lr", "3e-3", *common)
    base = last_step(out / "base")
    if not (out / "finetune").is_dir():
        cli("train", base, "-o", out / "finetune", "--data", valid, "--steps", 100, "--lr", "1e-3", *common)
    finetune = last_step(out / "finetune")
    tokens = read_text_tokens(test, tokenizer, TOKENS)

    converter = Path(os.environ.get("INRANK_LLAMA_CPP", "")) / "convert_hf_to_gguf.py"
    base_gguf = out / "base.gguf"
    try:
        import llama_cpp  # noqa: F401

        served_by_llama_cpp = converter.is_file()
    except ImportError:
        served_by_llama_cpp = False
    if served_by_llama_cpp and not base_gguf.is_file():
        subprocess.run([sys.executable, str(converter), str(base), "--outfile", str(base_gguf), "--outtype", "f32"],
                       check=True, capture_output=True)

    def with_adapter(folder: Path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)

    size = sum(path.stat().st_size for path in finetune.glob("*.safetensors"))
    rows = [{"row": "base", "perplexity": window_nll(torch_scorer(AutoModelForCausalLM.from_pretrained(base)), tokens)},
            {"row": "fine-tune", "perplexity": window_nll(torch_scorer(AutoModelForCausalLM.from_pretrained(finetune)),
                                                          tokens), "bytes": size}]
    if served_by_llama_cpp:
        rows.append({"row": "base in llama.cpp", "perplexity": window_nll(llama_cpp_scorer(base_gguf, None), tokens)})
    for threshold in THRESHOLDS:
        artifact, peft_dir, vllm_dir, gguf = (out / f"delta-{threshold}", out / f"peft-{threshold}",
                                              out / f"vllm-{threshold}", out / f"delta-{threshold}.gguf")
        cli("compress", finetune, "--init", base, "-o", artifact, "--threshold", threshold, "--quantize", "none",
            "--force", "--quiet")
        peft_info = json.loads(cli("export-peft", artifact, "-o", peft_dir, "--force", "--json"))
        vllm_info = json.loads(cli("export-peft", artifact, "-o", vllm_dir, "--target", "vllm", "--force", "--json"))
        cli("export-gguf", artifact, "-o", gguf, "--force")
        stored = json.loads(cli("inspect", artifact, "--json"))
        found = [
            {"row": f"artifact t={threshold}", "bytes": stored["compressed_bytes"],
             "perplexity": window_nll(torch_scorer(load_compressed(artifact)), tokens)},
            {"row": f"base + PEFT adapter t={threshold}", "bytes": peft_info["bytes"],
             "perplexity": window_nll(torch_scorer(with_adapter(peft_dir)), tokens)},
            {"row": f"base + vLLM adapter t={threshold} (PEFT-loaded)", "bytes": vllm_info["bytes"],
             "dropped": sorted({item["what"] for item in vllm_info["dropped"]}),
             "perplexity": window_nll(torch_scorer(with_adapter(vllm_dir)), tokens)},
        ]
        if served_by_llama_cpp:
            found.append({"row": f"base + llama.cpp adapter t={threshold} (llama.cpp)", "bytes": gguf.stat().st_size,
                          "perplexity": window_nll(llama_cpp_scorer(base_gguf, gguf), tokens)})
        artifact_ppl = found[0]["perplexity"]
        for row in found[1:]:
            row["vs_artifact_percent"] = 100 * (row["perplexity"] / artifact_ppl - 1)
        rows.extend(found)
    (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"Perplexity on the first {len(tokens):,} tokens of WikiText-2 test (windows of {WINDOW}):")
    print("| row | perplexity | vs artifact | bytes |\n| --- | --- | --- | --- |")
    for row in rows:
        change = f"{row['vs_artifact_percent']:+.2f}%" if "vs_artifact_percent" in row else ""
        print(f"| {row['row']} | {row['perplexity']:,.2f} | {change} | {row.get('bytes', 0):,} |")
    if not served_by_llama_cpp:
        print("llama.cpp rows left out: run with PYTHONPATH=build/serving/site INRANK_LLAMA_CPP=build/serving/llama.cpp "
              "after make test-serving", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
