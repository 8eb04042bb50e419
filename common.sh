# common.sh: what speedrun_dgx.sh (and through it pretrain.sh, midtrain.sh, sft.sh, rl.sh) and
# chat.sh/chat_cli.sh share: the flags, the environment, logging, and one function per stage.
# The presets and every size live in Python (nanochat/run_shape.py); this file computes none.
# Sourced, never run on its own. Every path derives from NANOCHAT_BASE_DIR.
# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source this file

# the repository root, absolute: the scripts may be started from anywhere, by a relative path
NANOCHAT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

depth=""               # empty: the preset's (nanochat/run_shape.py)
recipe=""              # empty: training.DEFAULT_RECIPE, or the recipe an interrupted run started with
device_batch_size=""   # empty: the preset's, or what fits the GPU
run=dummy
data=auto
nproc=1
nnodes=1               # several machines (two DGX Sparks): torchrun across nodes, README "Two DGX Sparks"
node_rank=0
master_addr=""
master_port=29500
preset=gpu
skip_rl=0
only=""
num_shards=240
price_per_kwh=""
extra_args=()
# the run's shape, set by setup_env from `scripts.plan --shell`
model_tag=""; seq_len=""; vocab_size=""; total_batch_size=""
base_args=(); tok_args=(); loss_args=(); mid_args=(); sft_args=(); rl_args=(); eval_args=()

parse_flags() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --depth) depth="${2:?--depth needs a number}"; shift ;;
            --recipe) recipe="${2:?--recipe needs a name}"; shift ;;
            --device-batch-size) device_batch_size="${2:?--device-batch-size needs a number}"; shift ;;
            --run) run="${2:?--run needs a name}"; shift ;;
            --data) data="${2:?--data needs online or offline}"; shift ;;
            --nproc) nproc="${2:?--nproc needs a number}"; shift ;;
            --nnodes) nnodes="${2:?--nnodes needs a number}"; shift ;;
            --node-rank) node_rank="${2:?--node-rank needs a number}"; shift ;;
            --master-addr) master_addr="${2:?--master-addr needs a host}"; shift ;;
            --master-port) master_port="${2:?--master-port needs a number}"; shift ;;
            --tiny) preset=tiny ;;
            --smoke) preset=smoke ;;
            --skip-rl) skip_rl=1 ;;
            --only) only="${2:?--only needs a stage}"; shift ;;
            --num-shards) num_shards="${2:?--num-shards needs a number}"; shift ;;
            --price-per-kwh) price_per_kwh="${2:?--price-per-kwh needs a number}"; shift ;;
            --) shift; extra_args=("$@"); break ;;
            -h|--help) usage; exit 0 ;;
            *) echo "unknown flag '$1' (see --help)" >&2; exit 2 ;;
        esac
        shift
    done
    case "$data" in auto|online|offline) ;; *) echo "--data must be online or offline, not '$data'" >&2; exit 2 ;; esac
    case "$only" in ""|data|tokenizer|pretrain|midtrain|sft|rl) ;;
        *) echo "--only must be one of data, tokenizer, pretrain, midtrain, sft, rl; not '$only'" >&2; exit 2 ;;
    esac
    local n
    for n in "$nproc" "$nnodes" "$node_rank" "$master_port"; do
        case "$n" in ''|*[!0-9]*) echo "--nproc, --nnodes, --node-rank and --master-port take a number, not '$n'" >&2; exit 2 ;; esac
    done
    if [ "$nnodes" -gt 1 ] && [ -z "$master_addr" ]; then
        echo "--nnodes $nnodes needs --master-addr: the address of node 0 that every node can reach (README \"Two DGX Sparks\")" >&2
        exit 2
    fi
    if [ "$node_rank" -ge "$nnodes" ]; then
        echo "--node-rank $node_rank must be below --nnodes $nnodes (node ranks count from 0)" >&2
        exit 2
    fi
}

# The environment every script needs: the repo root as working directory, the base dir, the GPU
# settings setup.sh wrote (.nanochat_env), and the venv ($py). Used by chat.sh and chat_cli.sh too.
enter_env() {
    cd "$NANOCHAT_ROOT" || exit 1
    export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
    # shellcheck disable=SC1091  # written by setup.sh; optional
    [ -f .nanochat_env ] && source .nanochat_env
    py="$PWD/.venv/bin/python"
    if [ ! -x "$py" ]; then
        echo "no .venv in $PWD: run ./setup.sh first" >&2
        exit 1
    fi
}

# The run's shape comes from Python (nanochat/run_shape.py, through scripts/plan.py): depth,
# model_tag, seq_len, vocab_size, device_batch_size, total_batch_size, data, and the stages'
# argument arrays (base_args, tok_args, loss_args, mid_args, sft_args, rl_args, eval_args).
# The user's flags and extra arguments go in, so the shape is the one the stages then run.
plan_args() {
    plan=(--preset "$preset" --nproc "$((nproc * nnodes))" --data "$data")
    [ -n "$depth" ] && plan+=(--depth "$depth")
    [ -n "$recipe" ] && plan+=(--recipe "$recipe")
    [ -n "$device_batch_size" ] && plan+=(--device-batch-size "$device_batch_size")
    plan+=(-- "${extra_args[@]}")
}

setup_env() {
    enter_env
    mkdir -p "$NANOCHAT_BASE_DIR/logs"
    logs="$NANOCHAT_BASE_DIR/logs"
    plan_args
    local shape
    shape=$("$py" -m scripts.plan --shell "${plan[@]}") || exit 2
    eval "$shape"
    plan_args  # again, with the resolved shape and data mode (no second Hub probe)
    if [ "$nnodes" -gt 1 ]; then
        # static rendezvous at node 0 (its rank 0 hosts the store); every node runs the same command.
        # `--` ends torchrun's options: it would take the stage's --run for an abbreviation of --run-path
        launch=("$PWD/.venv/bin/torchrun" "--nnodes=$nnodes" "--node_rank=$node_rank" "--nproc_per_node=$nproc"
                "--master_addr=$master_addr" "--master_port=$master_port" -m --)
    elif [ "$nproc" -gt 1 ]; then
        launch=("$PWD/.venv/bin/torchrun" --standalone "--nproc_per_node=$nproc" -m --)
    else
        launch=("$py" -m)
    fi
}

# run_stage NAME CMD...: run a stage once; its output goes to the terminal and logs/NAME.log,
# and a marker logs/NAME.done records that it finished: speedrun_dgx.sh skips finished stages
# when re-run; with --only STAGE (the single-stage scripts) rerun=1 and the stage always runs.
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

stage_data() {
    if [ "$data" = online ]; then
        run_stage data "$py" -m nanochat.dataset -n "$num_shards"
    else
        run_stage data ./setup.sh --offline-data
    fi
}

stage_tokenizer() {
    run_stage tok_train "$py" -m scripts.tok_train --vocab-size "$vocab_size" "${tok_args[@]}"
    run_stage tok_eval "$py" -m scripts.tok_eval
}

stage_pretrain() {
    require tokenizer/tokenizer.pkl "speedrun_dgx.sh (or python -m scripts.tok_train)"
    local resume
    resume=$(resume_flag base_checkpoints)
    run_stage base_train "${launch[@]}" scripts.base_train "${base_args[@]}" --run "$run" --model-tag "$model_tag" \
        ${resume:+"$resume"} "${extra_args[@]}"
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
