#!/usr/bin/env bash
# examples/from_scratch.sh on a CUDA GPU: training and InRank resume in bfloat16 autocast
# (parameters and optimizer state stay float32), the SVDs of compress on the GPU, and report's
# perplexities computed on the GPU in float32, with a bigger model and longer runs by default.
#
# Run from the repository root on a machine with CUDA and a CUDA build of torch:
#   examples/gpu.sh
# Everything is overridable through the environment, e.g. a small quick run:
#   N_EMBD=64 N_LAYER=2 N_HEAD=2 BLOCK=32 BATCH=8 STEPS=20 RESUME_STEPS=20 RANK_WARMUP=5 RANK_EVERY=5 \
#   MAX_TOKENS=512 OUT=/tmp/gpu examples/gpu.sh
# Writes only under $OUT, as from_scratch.sh does. Exits 1 at once, writing nothing, when torch
# sees no CUDA device.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$REPO/examples/common.sh"   # IC, PYTHON

if ! "$PYTHON" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
    echo "error: gpu.sh needs a CUDA GPU, and torch ($PYTHON) sees none; run examples/from_scratch.sh on the CPU" >&2
    exit 1
fi

export IC PYTHON
export OUT=${OUT:-runs/gpu}
export DEVICE=${DEVICE:-cuda}               # cuda or cuda:N
export DTYPE=${DTYPE:-bfloat16}             # autocast dtype of train and resume (float16 works too)
export N_EMBD=${N_EMBD:-256} N_LAYER=${N_LAYER:-6} N_HEAD=${N_HEAD:-8}
export BLOCK=${BLOCK:-256} BATCH=${BATCH:-32}
export STEPS=${STEPS:-2000} SAVE_EVERY=${SAVE_EVERY:-500}
export RESUME_STEPS=${RESUME_STEPS:-1000} RANK_WARMUP=${RANK_WARMUP:-100}
export MAX_TOKENS=${MAX_TOKENS:-65536}
exec "$REPO/examples/from_scratch.sh"
