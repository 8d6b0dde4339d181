#!/usr/bin/env bash
# The whole story on the CPU, as plain inrank-convert commands:
#   1. train a small GPT-2 dense from scratch on Tiny Shakespeare (validation on WikiText-2),
#   2. compress the run at two thresholds (0.9 and 0.99; the init is stored as its seed recipe),
#   3. report size and perplexity of both artifacts against the dense model on WikiText-2 test,
#   4. resume InRank training from the 0.99 artifact into a new run folder,
#   5. report the resumed run's last checkpoint (it is an artifact itself) and inspect it.
#
# Run from the repository root (the defaults train 500 steps in all: 20-30 minutes on 2 CPU cores):
#   examples/from_scratch.sh
# Everything is overridable through the environment, e.g. a smoke run of a minute or two:
#   N_EMBD=32 N_LAYER=1 N_HEAD=2 BLOCK=16 BATCH=4 STEPS=4 RESUME_STEPS=4 RANK_WARMUP=2 RANK_EVERY=1 \
#   MAX_TOKENS=64 OUT=/tmp/from-scratch examples/from_scratch.sh
# Writes only under $OUT (config/, run/, t$LOW/, t$HIGH/, inrank/, report.png, report-inrank.png);
# a second run replaces them.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=${DATA:-$REPO/../shared/data}          # gpt2-tokenizer/, tinyshakespeare/, wikitext-2-raw/
OUT=${OUT:-runs/from-scratch}
source "$REPO/examples/common.sh"   # IC, PYTHON, TORCHRUN, step, last_step, require_files, write_gpt2_config

DEVICE=${DEVICE:-cpu}                # where train, resume, compress's SVDs and report run (cuda: examples/gpu.sh)
DTYPE=${DTYPE:-float32}              # autocast dtype of train and resume
N_EMBD=${N_EMBD:-128} N_LAYER=${N_LAYER:-4} N_HEAD=${N_HEAD:-4}
BLOCK=${BLOCK:-64}                    # training sequence length and the model's context (n_positions)
BATCH=${BATCH:-16}
STEPS=${STEPS:-300} LR=${LR:-3e-3} SAVE_EVERY=${SAVE_EVERY:-100} SEED=${SEED:-0}
LOW=${LOW:-0.9} HIGH=${HIGH:-0.99}   # the two compress thresholds (energy kept per update)
RESUME_STEPS=${RESUME_STEPS:-200}    # InRank steps after the artifact (the resumed run's total)
RANK_WARMUP=${RANK_WARMUP:-50} RANK_EVERY=${RANK_EVERY:-25}
MAX_TOKENS=${MAX_TOKENS:-8192}       # tokens of wiki.test.raw scored by report

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

step "1. train dense from scratch: $OUT/run/step-0 is the init (a seed recipe), step-$STEPS the trained model"
"$IC" train "$OUT/config/config.json" -o "$OUT/run" --data "$TEXT" --val-data "$VALID" --tokenizer "$TOKENIZER" \
    --steps "$STEPS" --batch-size "$BATCH" --block-size "$BLOCK" --lr "$LR" --save-every "$SAVE_EVERY" --seed "$SEED" \
    --device "$DEVICE" --dtype "$DTYPE"

step "2. compress the run at two thresholds (update = step-$STEPS - step-0; no init bytes stored)"
"$IC" compress "$OUT/run" -o "$OUT/t$LOW" --threshold "$LOW" --device "$DEVICE" --force --quiet
"$IC" compress "$OUT/run" -o "$OUT/t$HIGH" --threshold "$HIGH" --device "$DEVICE" --force --quiet

step "3. report: the dense model, t=$HIGH and t=$LOW on WikiText-2 test"
"$IC" report "$OUT/t$HIGH" --data "$TEST" --max-tokens "$MAX_TOKENS" --also "$OUT/t$LOW" --plot "$OUT/report.png" \
    --device "$DEVICE" --quiet

step "4. resume InRank training from the t=$HIGH artifact's factors into $OUT/inrank"
"$IC" resume "$OUT/t$HIGH" -o "$OUT/inrank" --data "$TEXT" --val-data "$VALID" --steps "$RESUME_STEPS" \
    --rank-warmup "$RANK_WARMUP" --rank-every "$RANK_EVERY" --device "$DEVICE" --dtype "$DTYPE"

DENSE=$(last_step "$OUT/run")
LAST=$(last_step "$OUT/inrank")
step "5. the resumed run's last checkpoint $LAST is an artifact: report it (vs the dense model and t=$HIGH), inspect it"
# --original: a training checkpoint records its run folder as its source, which is no single model.
"$IC" report "$LAST" --data "$TEST" --max-tokens "$MAX_TOKENS" --original "$DENSE" --also "$OUT/t$HIGH" \
    --plot "$OUT/report-inrank.png" --device "$DEVICE" --quiet
"$IC" inspect "$LAST"

step "done: artifacts $OUT/t$LOW $OUT/t$HIGH, InRank run $OUT/inrank, plots $OUT/report.png $OUT/report-inrank.png"
