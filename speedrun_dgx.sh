#!/usr/bin/env bash
# speedrun_dgx.sh: the main job. Text -> tokenizer -> base model -> mid -> SFT -> RL, with
# evaluations and a report card, on one GPU (DGX Spark / H100), several (--nproc), or a CPU
# (--tiny). Launch it inside tmux or screen: the full run takes days on one GPU.
# Re-running after an interruption skips the stages that finished and resumes the one that
# was interrupted from its last checkpoint.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: bash speedrun_dgx.sh [flags]
$COMMON_USAGE
  --skip-rl               stop after SFT
  --num-shards N          FineWeb-EDU shards to download when online (default 240, ~24 GB)
  --price-per-kwh X       electricity price for the cost line of the report card

Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat) holds data, checkpoints, logs, report.
USAGE
}
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"

# Setup (idempotent: a fresh clone needs nothing else)
cd "$(dirname "${BASH_SOURCE[0]}")"
./setup.sh
setup_env
log="$logs/speedrun_$(date +%Y%m%d_%H%M%S).log"
exec > >(tee -a "$log") 2>&1

# The plan
echo "nanochat-spark speedrun | preset $preset | data $data | model $model_tag | seq $seq_len | device batch $device_batch_size | processes $nproc"
echo "base dir: $NANOCHAT_BASE_DIR | log: $log"
"$py" -m scripts.plan --depth "$depth" --max-seq-len "$seq_len" --vocab-size "$vocab_size" \
    --total-batch-size "$total_batch_size" --preset "$preset" --nproc "$nproc" -- "${base_args[@]}"

# Report: a new run starts a new report card (a resumed run keeps it)
if [ ! -f "$logs/report_reset.done" ]; then
    "$py" -m nanochat.report reset --config preset="$preset" depth="$depth" data="$data" \
        device_batch_size="$device_batch_size" nproc="$nproc" vocab_size="$vocab_size" seq_len="$seq_len"
    touch "$logs/report_reset.done"
fi

# Data
if [ "$data" = online ]; then
    run_stage data "$py" -m nanochat.dataset -n "$num_shards"
else
    run_stage data ./setup.sh --offline-data
fi

# Tokenizer
run_stage tok_train "$py" -m scripts.tok_train --vocab-size "$vocab_size" "${tok_args[@]}"
run_stage tok_eval "$py" -m scripts.tok_eval

# Pretraining, midtraining, SFT, RL (each with its evaluations)
stage_pretrain
stage_midtrain
stage_sft
last=sft
if [ "$skip_rl" = 0 ]; then
    stage_rl
    last=rl
fi

# Report card
"$py" -m nanochat.report generate ${price_per_kwh:+--price-per-kwh "$price_per_kwh"}
echo
echo "Done. Report card: $NANOCHAT_BASE_DIR/report/report.md (copied to ./report.md)"
echo "Chat with your model:  ./chat.sh --source $last     (web UI + OpenAI API on http://127.0.0.1:8000)"
echo "                       ./chat_cli.sh --source $last (terminal)"
