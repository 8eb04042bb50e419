# common.sh: what speedrun_dgx.sh and the stage scripts (pretrain.sh, midtrain.sh, sft.sh,
# rl.sh) share: the flags, the environment, the presets, logging, and one function per stage.
# Sourced, never run on its own. Every path derives from NANOCHAT_BASE_DIR.
# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source this file

COMMON_USAGE='
  --depth N               model depth (default 20; width = 64 x depth)
  --device-batch-size N   sequences per forward pass (default: chosen for the GPU memory)
  --run NAME              wandb run name (default: dummy = no wandb)
  --data online|offline   Hub datasets or data built on this machine (default: online if
                          huggingface.co answers, else offline)
  --nproc N               processes (GPUs) for torchrun (default 1)
  --tiny                  CPU preset: offline corpus, vocab 8192, d4, seq 512, short stages (~15 min)
  --smoke                 shorter CPU preset used by CI (~5 min): d2, seq 256, a few steps per stage
  -- ARGS...              extra arguments passed to the stage'"'"'s python script
  --help                  show this message'

# The --help of the single-stage scripts (speedrun_dgx.sh has its own)
stage_usage() {
    cat <<USAGE
Usage: bash $(basename "$0") [flags] [-- extra args for the python script]
$COMMON_USAGE
USAGE
}

depth=20
device_batch_size=auto
run=dummy
data=auto
nproc=1
preset=gpu
skip_rl=0
num_shards=240
price_per_kwh=""
extra_args=()

parse_flags() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --depth) depth="${2:?--depth needs a number}"; shift ;;
            --device-batch-size) device_batch_size="${2:?--device-batch-size needs a number}"; shift ;;
            --run) run="${2:?--run needs a name}"; shift ;;
            --data) data="${2:?--data needs online or offline}"; shift ;;
            --nproc) nproc="${2:?--nproc needs a number}"; shift ;;
            --tiny) preset=tiny ;;
            --smoke) preset=smoke ;;
            --skip-rl) skip_rl=1 ;;
            --num-shards) num_shards="${2:?--num-shards needs a number}"; shift ;;
            --price-per-kwh) price_per_kwh="${2:?--price-per-kwh needs a number}"; shift ;;
            --) shift; extra_args=("$@"); break ;;
            -h|--help) usage; exit 0 ;;
            *) echo "unknown flag '$1' (see --help)" >&2; exit 2 ;;
        esac
        shift
    done
    case "$data" in auto|online|offline) ;; *) echo "--data must be online or offline, not '$data'" >&2; exit 2 ;; esac
}

# The environment: repo root, base dir, venv, GPU settings from setup.sh, logs, data mode, presets
setup_env() {
    cd "$(dirname "${BASH_SOURCE[0]}")" || exit 1
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
    mkdir -p "$NANOCHAT_BASE_DIR/logs"
    logs="$NANOCHAT_BASE_DIR/logs"
    # shellcheck disable=SC1091
    [ -f .nanochat_env ] && source .nanochat_env
    py="$PWD/.venv/bin/python"
    if [ ! -x "$py" ]; then
        echo "no .venv in $PWD: run ./setup.sh first" >&2
        exit 1
    fi
    if [ "$data" = auto ]; then
        if "$py" -c "import requests; requests.head('https://huggingface.co', timeout=5)" >/dev/null 2>&1; then
            data=online
        else
            data=offline
            echo "*** huggingface.co is unreachable: using the OFFLINE data (Debian-package corpus, generated chat tasks) ***"
        fi
    fi
    if [ "$nproc" -gt 1 ]; then
        launch=("$PWD/.venv/bin/torchrun" --standalone "--nproc_per_node=$nproc" -m)
    else
        launch=("$py" -m)
    fi
    apply_preset
    model_tag="d$depth"
}

# Stage arguments for each preset. gpu: the real run (upstream nanochat's defaults).
apply_preset() {
    case "$preset" in
        gpu)
            [ "$device_batch_size" = auto ] && device_batch_size=$(auto_device_batch_size)
            vocab_size=65536; tok_args=(); seq_len=2048; total_batch_size=524288
            base_args=(); loss_args=(); mid_args=(); sft_args=(); rl_args=(); eval_args=()
            ;;
        tiny)
            data=offline; depth=4; [ "$device_batch_size" = auto ] && device_batch_size=8
            vocab_size=8192; tok_args=(); seq_len=512; total_batch_size=8192
            base_args=(--num-iterations 24 --eval-every 12 --eval-tokens 16384 --sample-every 24 --save-every 8
                       --core-metric-every -1)
            loss_args=(--split-tokens 16384)
            mid_args=(--num-iterations 12 --eval-every 6 --eval-tokens 16384 --save-every 6)
            sft_args=(--device-batch-size 4 --target-examples-per-step 16 --num-iterations 10 --eval-every 5
                      --eval-steps 8 --eval-metrics-every -1 --save-every 5 --init-lr-frac 0.5)
            rl_args=(--num-iterations 6 --examples-per-step 4 --num-samples 4 --device-batch-size 8
                     --max-new-tokens 64 --eval-every 6 --eval-examples 16 --eval-samples 2 --save-every 3)
            eval_args=(--max-problems 20 --max-new-tokens 64)
            ;;
        smoke)
            data=offline; depth=2; [ "$device_batch_size" = auto ] && device_batch_size=4
            vocab_size=2048; tok_args=(--max-chars 20000000); seq_len=256; total_batch_size=2048
            base_args=(--num-iterations 8 --eval-every 4 --eval-tokens 4096 --sample-every 8 --save-every 4
                       --core-metric-every -1)
            loss_args=(--split-tokens 4096)
            mid_args=(--num-iterations 4 --eval-every 4 --eval-tokens 4096 --save-every 2)
            sft_args=(--device-batch-size 4 --target-examples-per-step 8 --num-iterations 4 --eval-every 4
                      --eval-steps 4 --eval-metrics-every -1 --save-every 2)
            rl_args=(--num-iterations 2 --examples-per-step 2 --num-samples 2 --device-batch-size 4
                     --max-new-tokens 32 --eval-every 2 --eval-examples 4 --eval-samples 2 --save-every 1)
            eval_args=(--max-problems 4 --max-new-tokens 32)
            ;;
    esac
}

# Sequences per forward pass that fit the GPU: activations grow with batch x depth^2, and
# upstream nanochat runs d20 at 32 x 2048 tokens on 80 GB cards (which report ~79 GiB, so the
# reference is 76 GiB); unified-memory GPUs (GB10) count
# system memory. A power of two, so it divides the 524,288-token batch.
auto_device_batch_size() {
    "$py" - "$depth" <<'EOF'
import sys
import psutil
import torch
depth = int(sys.argv[1])
if not torch.cuda.is_available():
    print(4)
    sys.exit()
props = torch.cuda.get_device_properties(0)
unified = "GB10" in props.name or getattr(props, "is_integrated", False)
gib = (psutil.virtual_memory().total if unified else props.total_memory) / 2**30
fit = 32 * (20 / depth) ** 2 * gib / 76
bs = 1
while bs * 2 <= min(fit, 32):
    bs *= 2
print(bs)
EOF
}

# run_stage NAME CMD...: run a stage once; its output goes to the terminal and logs/NAME.log,
# and a marker logs/NAME.done records that it finished: speedrun_dgx.sh skips finished stages
# when re-run; the single-stage scripts set rerun=1 and always run theirs.
run_stage() {
    local name="$1"; shift
    if [ "${rerun:-0}" = 0 ] && [ -f "$logs/$name.done" ]; then
        echo "[$name] finished in an earlier run, skipping (delete $logs/$name.done to redo it)"
        return 0
    fi
    echo "[$name] $(date '+%Y-%m-%d %H:%M:%S') $*"
    local start=$SECONDS
    "$@" 2>&1 | tee -a "$logs/$name.log"
    echo "[$name] done in $((SECONDS - start)) s"
    touch "$logs/$name.done"
}

# --resume when a stage's checkpoint directory already holds a checkpoint (an interrupted run)
resume_flag() {
    if compgen -G "$NANOCHAT_BASE_DIR/$1/$model_tag/meta_*.json" >/dev/null; then
        echo "--resume"
    fi
}

require() {
    if [ ! -e "$NANOCHAT_BASE_DIR/$1" ]; then
        echo "missing $NANOCHAT_BASE_DIR/$1: run $2 first" >&2
        exit 1
    fi
}

stage_pretrain() {
    require tokenizer/tokenizer.pkl "speedrun_dgx.sh (or python -m scripts.tok_train)"
    local resume
    resume=$(resume_flag base_checkpoints)
    run_stage base_train "${launch[@]}" scripts.base_train --depth "$depth" --max-seq-len "$seq_len" \
        --device-batch-size "$device_batch_size" --total-batch-size "$total_batch_size" --run "$run" \
        --model-tag "$model_tag" ${resume:+"$resume"} "${base_args[@]}" "${extra_args[@]}"
    run_stage base_loss "${launch[@]}" scripts.base_loss --model-tag "$model_tag" \
        --device-batch-size "$device_batch_size" "${loss_args[@]}"
    if [ "$data" = online ]; then
        run_stage base_eval "${launch[@]}" scripts.base_eval --model-tag "$model_tag"
    else
        echo "[base_eval] skipped: the CORE eval bundle is downloaded from the internet (offline run)"
    fi
}

stage_midtrain() {
    require "base_checkpoints/$model_tag" "pretrain.sh"
    if [ ! -f "$NANOCHAT_BASE_DIR/identity_conversations.jsonl" ]; then
        "$py" -m dev.gen_identity_data --output "$NANOCHAT_BASE_DIR/identity_conversations.jsonl"
    fi
    local resume
    resume=$(resume_flag mid_checkpoints)
    run_stage mid_train "${launch[@]}" scripts.mid_train --data "$data" --model-tag "$model_tag" \
        --max-seq-len "$seq_len" --device-batch-size "$device_batch_size" --total-batch-size "$total_batch_size" \
        --run "$run" ${resume:+"$resume"} "${mid_args[@]}" "${extra_args[@]}"
    run_stage chat_eval_mid "${launch[@]}" scripts.chat_eval -i mid --model-tag "$model_tag" --data "$data" \
        "${eval_args[@]}"
}

stage_sft() {
    require "mid_checkpoints/$model_tag" "midtrain.sh"
    local resume
    resume=$(resume_flag chatsft_checkpoints)
    run_stage chat_sft "${launch[@]}" scripts.chat_sft --data "$data" --model-tag "$model_tag" --run "$run" \
        ${resume:+"$resume"} "${sft_args[@]}" "${extra_args[@]}"
    run_stage chat_eval_sft "${launch[@]}" scripts.chat_eval -i sft --model-tag "$model_tag" --data "$data" \
        "${eval_args[@]}"
}

stage_rl() {
    require "chatsft_checkpoints/$model_tag" "sft.sh"
    local resume
    resume=$(resume_flag chatrl_checkpoints)
    run_stage chat_rl "${launch[@]}" scripts.chat_rl --data "$data" --model-tag "$model_tag" --run "$run" \
        ${resume:+"$resume"} "${rl_args[@]}" "${extra_args[@]}"
    run_stage chat_eval_rl "${launch[@]}" scripts.chat_eval -i rl --model-tag "$model_tag" --data "$data" \
        "${eval_args[@]}"
}
