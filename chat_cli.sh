#!/usr/bin/env bash
# chat_cli.sh: chat with your trained model in this terminal.
# Runs scripts/chat_cli.py from this checkout's .venv; it loads the most advanced stage that has a
# checkpoint under $NANOCHAT_BASE_DIR (rl > sft > mid > base) unless --source says otherwise.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: ./chat_cli.sh [options] [-- extra chat_cli flags]

  -s, --source SRC        rl|sft|mid|base (default: the most advanced stage with a checkpoint)
  -t, --temperature T     sampling temperature (default: 0.6)
  -k, --top-k K           top-k (default: 50)
  -m, --max-tokens N      tokens per answer at most (default: 512)
  -p, --prompt TEXT       answer this one prompt and exit
      --port, --host      accepted for symmetry with chat.sh and ignored (the terminal needs no server)
  -h, --help              show this message

Anything after `--` goes to `python -m scripts.chat_cli` as is (e.g. -- --model-tag d20 --step 700).
In the chat: `clear` starts over, `quit` or Ctrl-D leaves. Environment: NANOCHAT_BASE_DIR (default
~/.cache/nanochat) holds the checkpoints; .nanochat_env in this directory, if present, is sourced first.
USAGE
}

flags=()
need_value() { [ $# -ge 2 ] || { echo "chat_cli.sh: $1 needs a value" >&2; usage >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        -s|--source) need_value "$@"; flags+=(--source "$2"); shift ;;
        -t|--temperature) need_value "$@"; flags+=(--temperature "$2"); shift ;;
        -k|--top-k) need_value "$@"; flags+=(--top-k "$2"); shift ;;
        -m|--max-tokens) need_value "$@"; flags+=(--max-tokens "$2"); shift ;;
        -p|--prompt) need_value "$@"; flags+=(--prompt "$2"); shift ;;
        --port|--host) need_value "$@"; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; flags+=("$@"); break ;;
        *) echo "chat_cli.sh: unknown flag '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
enter_env  # repo root, base dir, .nanochat_env, the venv ($py)
exec "$py" -m scripts.chat_cli "${flags[@]}"
