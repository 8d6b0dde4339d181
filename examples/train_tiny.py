"""Train a tiny GPT-2 from scratch on real text and save it as a training-run folder.

    python examples/train_tiny.py runs/tiny --steps 300

writes ``runs/tiny/step-0`` (the init, with its seed recipe ``inrank_init.json``) and
``runs/tiny/step-N`` (the trained model), both Hugging Face folders with the GPT-2 tokenizer:
the input ``inrank-convert compress runs/tiny`` expects. Uses ../shared/data (Tiny Shakespeare
and the GPT-2 tokenizer) when present.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", type=Path, default=DATA / "tinyshakespeare" / "input.txt")
    parser.add_argument("--tokenizer", type=Path, default=DATA / "gpt2-tokenizer")
    args = parser.parse_args()
    if not args.text.is_file() or not (args.tokenizer / "vocab.json").is_file():
        print(f"error: needs {args.text} and {args.tokenizer}/vocab.json (pass --text/--tokenizer)", file=sys.stderr)
        return 2

    from transformers import AutoModelForCausalLM, GPT2Config, GPT2TokenizerFast

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = GPT2TokenizerFast(vocab=str(args.tokenizer / "vocab.json"), merges=str(args.tokenizer / "merges.txt"))
    tokens = torch.tensor(tokenizer(args.text.read_text())["input_ids"], dtype=torch.long)
    config = GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=128, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    # The init is exactly from_config under manual_seed(seed): compress can regenerate it from the recipe.
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config)
    save(model, tokenizer, args.run / "step-0")
    (args.run / "step-0" / "inrank_init.json").write_text(json.dumps({"seed": args.seed}) + "\n")

    generator = torch.Generator().manual_seed(args.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    block, batch = 64, 16
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, tokens.numel() - block - 1, (batch,), generator=generator)
        inputs = torch.stack([tokens[s:s + block] for s in starts.tolist()])  # [batch, block]
        loss = model(input_ids=inputs, labels=inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - started:.0f} s", file=sys.stderr)
    save(model, tokenizer, args.run / f"step-{args.steps}")
    return 0


def save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


if __name__ == "__main__":
    sys.exit(main())
