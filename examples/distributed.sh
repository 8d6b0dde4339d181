#!/usr/bin/env bash
# InRank training under torchrun (DistributedDataParallel: gloo on the CPU, NCCL with DEVICE=cuda):
#   1. train a GPT-2 with InRank from scratch on Tiny Shakespeare in $NPROC processes,
#   2. continue the same run folder in place for $MORE more steps (exactly where it stopped),
#   3. inspect the last checkpoint (an InRank run's checkpoints are artifacts).
# --batch-size counts sequences per optimizer step over all processes; checkpoints are written by rank 0.
#
# Run from the repository root (the defaults train 300 steps in all: 15-20 minutes on 2 CPU cores):
#   examples/distributed.sh
#   NPROC=8 DEVICE=cuda examples/distributed.sh     # one GPU per process
# Everything is overridable through the environment, e.g. a smoke run of a minute or two:
#   N_EMBD=32 N_LAYER=1 N_HEAD=2 BLOCK=16 BATCH=4 STEPS=4 MORE=2 RANK_WARMUP=2 RANK_EVERY=1 \
#   OUT=/tmp/distributed examples/distributed.sh
# Writes only under $OUT (config/, run/); a second run replaces them.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DATA=${DATA:-$REPO/../shared/data}          # gpt2-tokenizer/, tinyshakespeare/, wikitext-2-raw/
OUT=${OUT:-runs/distributed}
source "$REPO/examples/common.sh"   # IC, PYTHON, TORCHRUN, step, last_step, require_files, write_gpt2_config

NPROC=${NPROC:-2}
DEVICE=${DEVICE:-cpu}                # cpu (gloo) or cuda (NCCL, one GPU per process)
DTYPE=${DTYPE:-float32}              # autocast dtype; bfloat16 on GPUs
N_EMBD=${N_EMBD:-128} N_LAYER=${N_LAYER:-4} N_HEAD=${N_HEAD:-4}
BLOCK=${BLOCK:-64}                    # training sequence length and the model's context (n_positions)
BATCH=${BATCH:-16}                   # over all processes: a multiple of NPROC
STEPS=${STEPS:-200} MORE=${MORE:-100} LR=${LR:-3e-3} SAVE_EVERY=${SAVE_EVERY:-100} SEED=${SEED:-0}
RANK_WARMUP=${RANK_WARMUP:-50} RANK_EVERY=${RANK_EVERY:-25}
# CPU threads per process: the cores shared out (torchrun would set 1, with a banner saying so).
THREADS=$(($(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1) / NPROC))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((THREADS > 0 ? THREADS : 1))}

TEXT=$DATA/tinyshakespeare/input.txt
VALID=$DATA/wikitext-2-raw/wiki.valid.raw
TOKENIZER=$DATA/gpt2-tokenizer
require_files "$TEXT" "$VALID" "$TOKENIZER/vocab.json" "$TOKENIZER/merges.txt"

# Re-runnable: remove what an earlier run of this script wrote (and nothing else under $OUT).
mkdir -p "$OUT"
rm -rf "$OUT/config" "$OUT/run"

step "config: a ${N_LAYER}x${N_EMBD} GPT-2, context $BLOCK, GPT-2 vocabulary"
write_gpt2_config "$OUT/config" "$N_EMBD" "$N_LAYER" "$N_HEAD" "$BLOCK"

step "1. InRank training from scratch in $NPROC processes on $DEVICE: $STEPS steps"
"$TORCHRUN" --standalone --nproc_per_node "$NPROC" -m inrank_convert train "$OUT/config/config.json" -o "$OUT/run" \
    --data "$TEXT" --val-data "$VALID" --tokenizer "$TOKENIZER" --mode inrank --steps "$STEPS" \
    --batch-size "$BATCH" --block-size "$BLOCK" --lr "$LR" --save-every "$SAVE_EVERY" --seed "$SEED" \
    --rank-warmup "$RANK_WARMUP" --rank-every "$RANK_EVERY" --device "$DEVICE" --dtype "$DTYPE"

TOTAL=$((STEPS + MORE))
step "2. continue the run in place to $TOTAL steps (--steps is the run's total)"
"$TORCHRUN" --standalone --nproc_per_node "$NPROC" -m inrank_convert resume "$OUT/run" --steps "$TOTAL"

LAST=$(last_step "$OUT/run")
step "3. inspect the last checkpoint $LAST"
"$IC" inspect "$LAST"

step "done: InRank run $OUT/run (metrics in $OUT/run/metrics.jsonl)"
