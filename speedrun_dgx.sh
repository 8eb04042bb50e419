#!/usr/bin/env bash
# speedrun_dgx.sh: the main job. Text -> tokenizer -> base model -> mid -> SFT -> RL, with
# evaluations and a report card, on one GPU (DGX Spark / H100), several (--nproc), or a CPU
# (--tiny). Launch it inside tmux or screen: the full run takes days on one GPU.
# Re-running after an interruption skips the stages that finished and resumes the one that
# was interrupted from its last checkpoint. pretrain.sh, midtrain.sh, sft.sh and rl.sh are
# this script with --only STAGE.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bash speedrun_dgx.sh [flags] [-- extra args for every training script]

  --depth N               model depth (default: 20, or the preset's; width = 64 x depth)
  --device-batch-size N   sequences per forward pass (default: chosen for the GPU memory)
  --recipe NAME           pretraining recipe: optimizer, schedule, packing, batch, architecture
                          (dec2026 = default, nov2025, jan2026; README "Pretraining recipes");
                          an interrupted run resumes with the recipe it started with
  --run NAME              wandb run name (default: dummy = no wandb)
  --data online|offline   Hub datasets or data built on this machine (default: online if
                          huggingface.co answers, else offline)
  --nproc N               processes (GPUs) per node for torchrun (default 1)
  --nnodes N              machines the training stages run across (default 1; README "Two DGX Sparks");
                          run the same command on every node, each with its own --node-rank
  --node-rank R           this machine's rank, 0 .. N-1 (default 0; node 0 hosts the rendezvous)
  --master-addr HOST      address of node 0 that every node reaches (needed with --nnodes > 1)
  --master-port P         TCP port on node 0 for the rendezvous (default 29500)
  --tiny                  CPU preset: offline corpus, vocab 8192, d4, seq 512, short stages (~15 min)
  --smoke                 shorter CPU preset used by CI (~5 min): d2, seq 256, a few steps per stage
                          (a preset fills defaults, your flags win: --tiny --depth 8 trains a d8)
  --only STAGE            run one stage again (data, tokenizer, pretrain, midtrain, sft, rl), even if
                          it finished before; pretrain.sh, midtrain.sh, sft.sh, rl.sh do this
  --skip-rl               stop after SFT
  --num-shards N          FineWeb-EDU shards to download when online (default 240, ~24 GB)
  --price-per-kwh X       electricity price for the cost line of the report card
  -- ARGS...              extra arguments for every training script (base, mid, SFT, RL), e.g.
                          -- --num-iterations 5; one stage's own flags go to its script (pretrain.sh ...)
  --help                  show this message

Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat) holds data, checkpoints, logs, report.
USAGE
}
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"

# Setup (idempotent: a fresh clone needs nothing else)
cd "$NANOCHAT_ROOT"
./setup.sh
setup_env
log="$logs/speedrun_$(date +%Y%m%d_%H%M%S).log"
exec > >(tee -a "$log") 2>&1

# The plan (the same run_shape that base_train sizes itself with)
echo "nanochat-spark speedrun | preset $preset | data $data | model $model_tag | seq $seq_len | device batch $device_batch_size | processes $nproc x $nnodes nodes (this is node $node_rank)"
echo "base dir: $NANOCHAT_BASE_DIR | log: $log"
"$py" -m scripts.plan "${plan[@]}"

# One stage again, on its own (the stage scripts)
if [ -n "$only" ]; then
    rerun=1
    case "$only" in
        data) stage_data ;;
        tokenizer) stage_tokenizer ;;
        pretrain) stage_pretrain ;;
        midtrain) stage_midtrain ;;
        sft) stage_sft ;;
        rl) stage_rl ;;
    esac
    exit 0
fi

# Report: a new run starts a new report card (a resumed run keeps it)
if [ ! -f "$logs/report_reset.done" ]; then
    "$py" -m nanochat.report reset --config preset="$preset" depth="$depth" data="$data" \
        device_batch_size="$device_batch_size" nproc="$nproc" nnodes="$nnodes" vocab_size="$vocab_size" seq_len="$seq_len"
    touch "$logs/report_reset.done"
fi

stage_data
stage_tokenizer
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
