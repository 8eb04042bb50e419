#!/usr/bin/env bash
# speedrun_dgx.sh: the main job. Data -> tokenizer, on one GPU or a CPU, resumable.
# Launch it inside tmux or screen: the full run takes days on one GPU.
# Stages that already finished (their outputs exist) are skipped when you re-run it.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bash speedrun_dgx.sh [flags]

  --data online|offline   pretraining text: FineWeb-EDU shards from the Hugging Face Hub
                          (online) or the corpus built from Debian packages (offline).
                          Default: online if huggingface.co answers, else offline.
  --num-shards N          FineWeb-EDU shards to download when online (default 240, ~24 GB)
  --vocab-size N          tokenizer vocabulary size incl. special tokens (default 65536)
  --help                  show this message

Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat) holds data, checkpoints, logs.
USAGE
}

data=auto
num_shards=240
vocab_size=65536
while [ $# -gt 0 ]; do
    case "$1" in
        --data) data="${2:?--data needs online or offline}"; shift ;;
        --num-shards) num_shards="${2:?--num-shards needs a number}"; shift ;;
        --vocab-size) vocab_size="${2:?--vocab-size needs a number}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "speedrun_dgx.sh: unknown flag '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case "$data" in auto|online|offline) ;; *) echo "--data must be online or offline, not '$data'" >&2; exit 2 ;; esac

cd "$(dirname "${BASH_SOURCE[0]}")"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$NANOCHAT_BASE_DIR/logs"
log="$NANOCHAT_BASE_DIR/logs/speedrun_$(date +%Y%m%d_%H%M%S).log"
exec > >(tee -a "$log") 2>&1
echo "[speedrun] base dir: $NANOCHAT_BASE_DIR   log: $log"

# Setup (idempotent)
./setup.sh
py=.venv/bin/python

# Data
if [ "$data" = auto ]; then
    if $py -c "import requests; requests.head('https://huggingface.co', timeout=5)" >/dev/null 2>&1; then
        data=online
    else
        data=offline
        echo "[speedrun] *** huggingface.co is unreachable: using the OFFLINE corpus built from Debian packages ***"
    fi
fi
if [ "$data" = online ]; then
    $py -m nanochat.dataset -n "$num_shards"
else
    ./setup.sh --offline-data
fi

# Tokenizer
if [ -f "$NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl" ] && [ -f "$NANOCHAT_BASE_DIR/tokenizer/token_bytes.pt" ]; then
    echo "[speedrun] tokenizer exists, skipping tok_train (delete $NANOCHAT_BASE_DIR/tokenizer to retrain)"
else
    $py -m scripts.tok_train --vocab-size "$vocab_size"
fi
$py -m scripts.tok_eval

echo "[speedrun] done. Log: $log"
