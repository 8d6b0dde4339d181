# Shared by the example scripts (sourced, not run): the tools, and small helpers.
# Expects REPO to be set; honours IC, PYTHON and TORCHRUN from the environment.

if [[ -z ${IC:-} ]]; then
    IC=$(command -v inrank-convert || echo "$REPO/.venv/bin/inrank-convert")
fi
BIN=$(dirname "$(command -v "$IC")")          # python and torchrun from the same environment as the CLI
PYTHON=${PYTHON:-$BIN/python}
[[ -x $PYTHON ]] || PYTHON=python3
TORCHRUN=${TORCHRUN:-$BIN/torchrun}
[[ -x $TORCHRUN ]] || TORCHRUN=torchrun

step() { printf '\n== [%ss] %s\n' "$SECONDS" "$*"; }

last_step() {  # the highest step-N folder of a run
    local best=-1 dir n
    for dir in "$1"/step-*; do
        n=${dir##*/step-}
        if [[ $n =~ ^[0-9]+$ ]] && ((n > best)); then best=$n; fi
    done
    ((best >= 0)) || { echo "error: no step-N folder in $1" >&2; return 1; }
    echo "$1/step-$best"
}

require_files() {  # every argument must be a file: else one line on stderr and exit 2
    local f
    for f in "$@"; do
        [[ -f $f ]] || { echo "error: $f not found (set DATA to the folder holding the shared data)" >&2; exit 2; }
    done
}

write_gpt2_config() {  # FOLDER N_EMBD N_LAYER N_HEAD CONTEXT: a GPT-2 config.json with the GPT-2 vocabulary
    "$PYTHON" -c "import sys; from transformers import GPT2Config; GPT2Config(n_embd=int(sys.argv[2]), n_layer=int(sys.argv[3]), n_head=int(sys.argv[4]), n_positions=int(sys.argv[5]), vocab_size=50257, bos_token_id=50256, eos_token_id=50256).save_pretrained(sys.argv[1])" "$@"
}
