#!/usr/bin/env bash
# chat.sh: chat with your trained model in the browser (and through the OpenAI-compatible API at /v1).
# Runs scripts/chat_web.py from this checkout's .venv; it loads the most advanced stage that has a
# checkpoint under $NANOCHAT_BASE_DIR (rl > sft > mid > base) unless --source says otherwise.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: ./chat.sh [options] [-- extra chat_web flags]

  -s, --source SRC        rl|sft|mid|base (default: the most advanced stage with a checkpoint)
  -p, --port PORT         port to serve on (default: 8000)
      --host ADDR         address to bind (default: 127.0.0.1; 0.0.0.0 serves every interface)
  -t, --temperature T     default sampling temperature (default: 0.6)
  -k, --top-k K           default top-k (default: 50)
  -m, --max-tokens N      default tokens per reply (default: 512)
  -h, --help              show this message

Anything after `--` goes to `python -m scripts.chat_web` as is (e.g. -- --model-tag d20 --step 700
--api-key KEY --num-gpus 2). Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat) holds the
checkpoints; .nanochat_env in this directory, if present, is sourced first (setup.sh may write GPU
settings there).
USAGE
}

flags=()
port=8000
host=127.0.0.1
need_value() { [ $# -ge 2 ] || { echo "chat.sh: $1 needs a value" >&2; usage >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        -s|--source) need_value "$@"; flags+=(--source "$2"); shift ;;
        -p|--port) need_value "$@"; port="$2"; shift ;;
        --host) need_value "$@"; host="$2"; shift ;;
        -t|--temperature) need_value "$@"; flags+=(--temperature "$2"); shift ;;
        -k|--top-k) need_value "$@"; flags+=(--top-k "$2"); shift ;;
        -m|--max-tokens) need_value "$@"; flags+=(--max-tokens "$2"); shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; flags+=("$@"); break ;;
        *) echo "chat.sh: unknown flag '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
enter_env  # repo root, base dir, .nanochat_env, the venv ($py)

shown_host="$host"
if [ "$host" = 0.0.0.0 ]; then
    shown_host="$(hostname -I 2>/dev/null | awk '{print $1}')"
    shown_host="${shown_host:-localhost}"
fi
echo "[chat] models from $NANOCHAT_BASE_DIR; once the model is loaded, open http://$shown_host:$port/"
exec "$py" -m scripts.chat_web --host "$host" --port "$port" "${flags[@]}"
