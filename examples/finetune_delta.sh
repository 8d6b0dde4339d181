#!/usr/bin/env bash
# A base model and a fine-tune of it: the fine-tune's update against the base is what gets compressed,
# and the artifact becomes a standard PEFT LoRA adapter over the base.
#   1. train a base GPT-2 dense from scratch on Tiny Shakespeare,
#   2. fine-tune it (its last step folder is the init) on another domain, WikiText-2 valid,
#   3. compress the fine-tune against the base (--init BASE/step-N) and export a PEFT adapter,
#   4. perplexity on WikiText-2 test: `report` (artifact vs the fine-tune and the base), then the
#      same numbers from plain transformers + peft: base / fine-tune / artifact / base + adapter.
#
# Run from the repository root (the defaults train 500 steps in all: 20-30 minutes on 2 CPU cores):
#   examples/finetune_delta.sh
# Everything is overridable through the environment, e.g. a smoke run of a minute or two:
#   N_EMBD=32 N_LAYER=1 N_HEAD=2 BLOCK=16 BATCH=4 STEPS=4 FT_STEPS=4 MAX_TOKENS=64 \
#   OUT=/tmp/finetune-delta examples/finetune_delta.sh
# Writes only under $OUT (config/, base/, finetune/, delta/, adapter/); a second run replaces them.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=${DATA:-$REPO/../shared/data}          # gpt2-tokenizer/, tinyshakespeare/, wikitext-2-raw/
OUT=${OUT:-runs/finetune-delta}
source "$REPO/examples/common.sh"   # IC, PYTHON, TORCHRUN, step, last_step, require_files, write_gpt2_config

N_EMBD=${N_EMBD:-128} N_LAYER=${N_LAYER:-4} N_HEAD=${N_HEAD:-4}
BLOCK=${BLOCK:-64}                    # training sequence length and the model's context (n_positions)
BATCH=${BATCH:-16}
STEPS=${STEPS:-300} LR=${LR:-3e-3} SEED=${SEED:-0}          # the base model
FT_STEPS=${FT_STEPS:-200} FT_LR=${FT_LR:-1e-3}              # the fine-tune
THRESHOLD=${THRESHOLD:-0.99}         # energy of the fine-tune's update kept per tensor
MAX_TOKENS=${MAX_TOKENS:-8192}       # tokens of wiki.test.raw scored

BASE_TEXT=$DATA/tinyshakespeare/input.txt
FT_TEXT=$DATA/wikitext-2-raw/wiki.valid.raw
TEST=$DATA/wikitext-2-raw/wiki.test.raw
TOKENIZER=$DATA/gpt2-tokenizer
require_files "$BASE_TEXT" "$FT_TEXT" "$TEST" "$TOKENIZER/vocab.json" "$TOKENIZER/merges.txt"

# Re-runnable: remove what an earlier run of this script wrote (and nothing else under $OUT).
mkdir -p "$OUT"
rm -rf "$OUT/config" "$OUT/base" "$OUT/finetune" "$OUT/delta" "$OUT/adapter"

step "config: a ${N_LAYER}x${N_EMBD} GPT-2, context $BLOCK, GPT-2 vocabulary"
write_gpt2_config "$OUT/config" "$N_EMBD" "$N_LAYER" "$N_HEAD" "$BLOCK"

step "1. train the base model dense from scratch on Tiny Shakespeare"
"$IC" train "$OUT/config/config.json" -o "$OUT/base" --data "$BASE_TEXT" --tokenizer "$TOKENIZER" \
    --steps "$STEPS" --batch-size "$BATCH" --block-size "$BLOCK" --lr "$LR" --seed "$SEED"
BASE=$(last_step "$OUT/base")

step "2. fine-tune it on WikiText-2 valid: the base's $BASE is the init"
"$IC" train "$BASE" -o "$OUT/finetune" --data "$FT_TEXT" \
    --steps "$FT_STEPS" --batch-size "$BATCH" --block-size "$BLOCK" --lr "$FT_LR" --seed "$SEED"
FINETUNE=$(last_step "$OUT/finetune")

step "3. compress the fine-tune's update against the base (t=$THRESHOLD), export it as a PEFT LoRA adapter"
"$IC" compress "$FINETUNE" --init "$BASE" -o "$OUT/delta" --threshold "$THRESHOLD" --force --quiet
"$IC" export-peft "$OUT/delta" -o "$OUT/adapter" --force

step "4a. report on WikiText-2 test: the artifact vs the fine-tune (original) and the base"
"$IC" report "$OUT/delta" --data "$TEST" --max-tokens "$MAX_TOKENS" --original "$FINETUNE" --also "$BASE" --quiet

step "4b. the same text through transformers + peft: the base plus the adapter is the artifact's model"
"$PYTHON" - "$BASE" "$FINETUNE" "$OUT/delta" "$OUT/adapter" "$TEST" "$MAX_TOKENS" <<'EOF'
import sys
import warnings

from peft import PeftModel
from transformers import AutoModelForCausalLM
from transformers.utils import logging

from inrank_convert import load_compressed
from inrank_convert.inputs.text import load_tokenizer, read_text_tokens
from inrank_convert.runtime.evaluate import perplexity

logging.disable_progress_bar()
warnings.filterwarnings("ignore", module="peft")  # the tied-embedding note: export-peft said it already
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing")  # peft calls a deprecated name

base_dir, finetune_dir, artifact_dir, adapter_dir, text, max_tokens = sys.argv[1:]
tokens = read_text_tokens(text, load_tokenizer(artifact_dir), int(max_tokens))
results = {}
base = AutoModelForCausalLM.from_pretrained(base_dir)
results["base"] = perplexity(base, tokens)  # before the adapter goes in: PeftModel wraps base in place
results["fine-tune"] = perplexity(AutoModelForCausalLM.from_pretrained(finetune_dir), tokens)
results["artifact"] = perplexity(load_compressed(artifact_dir), tokens)
adapted = PeftModel.from_pretrained(base, adapter_dir)
results["adapter"] = perplexity(adapted, tokens)
print(f"perplexity on {results['base'].tokens} tokens of {text} (window {results['base'].context}):")
for name, result in results.items():
    print(f"  {name:<10} perplexity {result.perplexity:12.4f}")
change = results["adapter"].perplexity / results["artifact"].perplexity - 1
print(f"base + adapter vs artifact: {100 * change:+.4f}%")
EOF

step "done: base $BASE, fine-tune $FINETUNE, artifact $OUT/delta, adapter $OUT/adapter"
