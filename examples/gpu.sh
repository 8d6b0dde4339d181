#!/usr/bin/env bash
# examples/from_scratch.sh on a CUDA GPU: training and InRank resume in bfloat16 autocast
# (parameters and optimizer state stay float32), the SVDs of compress on the GPU, and report's
# perplexities computed on the GPU in float32.
#   1. train a GPT-2 dense from scratch on Tiny Shakespeare (validation on WikiText-2),
#   2. compress the run at two thresholds (0.9 and 0.99),
#   3. report both artifacts against the dense model on WikiText-2 test,
#   4. resume InRank training from the 0.99 artifact, 5. report and inspect its last checkpoint.
#
# Run from the repository root on a machine with CUDA and a CUDA build of torch:
#   examples/gpu.sh
# Everything is overridable through the environment, e.g. a small quick run:
#   N_EMBD=64 N_LAYER=2 N_HEAD=2 BLOCK=32 BATCH=8 STEPS=20 RESUME_STEPS=20 RANK_WARMUP=5 RANK_EVERY=5 \
#   MAX_TOKENS=512 OUT=/tmp/gpu examples/gpu.sh
# Writes only under $OUT (config/, run/, t$LOW/, t$HIGH/, inrank/, report.png, report-inrank.png);
# a second run replaces them. Exits 1 at once, writing nothing, when torch sees no CUDA device.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=${DATA:-$REPO/../shared/data}          # gpt2-tokenizer/, tinyshakespeare/, wikitext-2-raw/
OUT=${OUT:-runs/gpu}
source "$REPO/examples/common.sh"   # IC, PYTHON, TORCHRUN, step, last_step, require_files, write_gpt2_config

DEVICE=${DEVICE:-cuda}               # cuda or cuda:N
DTYPE=${DTYPE:-bfloat16}             # autocast dtype of train and resume (float16 works too)
N_EMBD=${N_EMBD:-256} N_LAYER=${N_LAYER:-6} N_HEAD=${N_HEAD:-8}
BLOCK=${BLOCK:-256}                  # training sequence length and the model's context (n_positions)
BATCH=${BATCH:-32}
STEPS=${STEPS:-2000} LR=${LR:-3e-3} SAVE_EVERY=${SAVE_EVERY:-500} SEED=${SEED:-0}
LOW=${LOW:-0.9} HIGH=${HIGH:-0.99}   # the two compress thresholds (energy kept per update)
RESUME_STEPS=${RESUME_STEPS:-1000}   # InRank steps after the artifact (the resumed run's total)
RANK_WARMUP=${RANK_WARMUP:-100} RANK_EVERY=${RANK_EVERY:-25}
MAX_TOKENS=${MAX_TOKENS:-65536}      # tokens of wiki.test.raw scored by report

if ! "$PYTHON" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    echo "error: gpu.sh needs a CUDA GPU, and torch ($PYTHON) sees none; run examples/from_scratch.sh on the CPU" >&2
    exit 1
fi

TEXT=$DATA/tinyshakespeare/input.txt
VALID=$DATA/wikitext-2-raw/wiki.valid.raw
TEST=$DATA/wikitext-2-raw/wiki.test.raw
TOKENIZER=$DATA/gpt2-tokenizer
require_files "$TEXT" "$VALID" "$TEST" "$TOKENIZER/vocab.json" "$TOKENIZER/merges.txt"

# Re-runnable: remove what an earlier run of this script wrote (and nothing else under $OUT).
mkdir -p "$OUT"
rm -rf "$OUT/config" "$OUT/run" "$OUT/t$LOW" "$OUT/t$HIGH" "$OUT/inrank" "$OUT/report.png" "$OUT/report-inrank.png"

step "config: a ${N_LAYER}x${N_EMBD} GPT-2, context $BLOCK, GPT-2 vocabulary"
write_gpt2_config "$OUT/config" "$N_EMBD" "$N_LAYER" "$N_HEAD" "$BLOCK"

step "1. train dense from scratch on $DEVICE ($DTYPE autocast)"
"$IC" train "$OUT/config/config.json" -o "$OUT/run" --data "$TEXT" --val-data "$VALID" --tokenizer "$TOKENIZER" \
    --steps "$STEPS" --batch-size "$BATCH" --block-size "$BLOCK" --lr "$LR" --save-every "$SAVE_EVERY" --seed "$SEED" \
    --device "$DEVICE" --dtype "$DTYPE"

step "2. compress the run at two thresholds, SVDs on $DEVICE"
"$IC" compress "$OUT/run" -o "$OUT/t$LOW" --threshold "$LOW" --device "$DEVICE" --force --quiet
"$IC" compress "$OUT/run" -o "$OUT/t$HIGH" --threshold "$HIGH" --device "$DEVICE" --force --quiet

step "3. report on $DEVICE: the dense model, t=$HIGH and t=$LOW on WikiText-2 test"
"$IC" report "$OUT/t$HIGH" --data "$TEST" --max-tokens "$MAX_TOKENS" --also "$OUT/t$LOW" --plot "$OUT/report.png" \
    --device "$DEVICE" --quiet

step "4. resume InRank training from the t=$HIGH artifact on $DEVICE ($DTYPE autocast)"
"$IC" resume "$OUT/t$HIGH" -o "$OUT/inrank" --data "$TEXT" --val-data "$VALID" --steps "$RESUME_STEPS" \
    --rank-warmup "$RANK_WARMUP" --rank-every "$RANK_EVERY" --device "$DEVICE" --dtype "$DTYPE"

DENSE=$(last_step "$OUT/run")
LAST=$(last_step "$OUT/inrank")
step "5. report the resumed run's last checkpoint $LAST (vs the dense model and t=$HIGH), inspect it"
# --original: a training checkpoint records its run folder as its source, which is no single model.
"$IC" report "$LAST" --data "$TEST" --max-tokens "$MAX_TOKENS" --original "$DENSE" --also "$OUT/t$HIGH" \
    --plot "$OUT/report-inrank.png" --device "$DEVICE" --quiet
"$IC" inspect "$LAST"

step "done: artifacts $OUT/t$LOW $OUT/t$HIGH, InRank run $OUT/inrank, plots $OUT/report.png $OUT/report-inrank.png"
