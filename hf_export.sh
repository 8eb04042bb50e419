#!/usr/bin/env bash
# hf_export.sh: export your trained model to the Hugging Face transformers format (a folder that
# AutoModelForCausalLM / AutoTokenizer load with no custom code). Runs scripts/hf_export.py from
# this checkout's .venv on the most advanced stage with a checkpoint unless --source says otherwise.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: ./hf_export.sh [options] [-- extra hf_export flags]

  -s, --source SRC        rl|sft|mid|base (default: the most advanced stage with a checkpoint)
  -g, --model-tag TAG     e.g. d20 (default: the largest)
      --step N            checkpoint step (default: the last)
  -o, --out DIR           output folder (default: $NANOCHAT_BASE_DIR/hf_export/<tag>-<source>-<step>)
      --dtype D           bfloat16 (default) or float32
  -h, --help              show this message

Anything after `--` goes to `python -m scripts.hf_export` as is. Environment: NANOCHAT_BASE_DIR
(default ~/.cache/nanochat) holds the checkpoints; .nanochat_env in this directory is sourced first.
USAGE
}

flags=()
need_value() { [ $# -ge 2 ] || { echo "hf_export.sh: $1 needs a value" >&2; usage >&2; exit 2; }; }
while [ $# -gt 0 ]; do
    case "$1" in
        -s|--source) need_value "$@"; flags+=(--source "$2"); shift ;;
        -g|--model-tag) need_value "$@"; flags+=(--model-tag "$2"); shift ;;
        --step) need_value "$@"; flags+=(--step "$2"); shift ;;
        -o|--out) need_value "$@"; flags+=(--out "$(realpath -m "$2")"); shift ;;
        --dtype) need_value "$@"; flags+=(--dtype "$2"); shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; flags+=("$@"); break ;;
        *) echo "hf_export.sh: unknown flag '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
enter_env  # repo root, base dir, .nanochat_env, the venv ($py)
exec "$py" -m scripts.hf_export "${flags[@]}"
