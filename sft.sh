#!/usr/bin/env bash
# sft.sh: Supervised finetuning (chat_sft, chat_eval sft), one stage of speedrun_dgx.sh.
# Resumes from the stage's last checkpoint when it was interrupted.
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
usage() { stage_usage; }
parse_flags "$@"
setup_env
rerun=1  # run explicitly: redo the stage even if an earlier run finished it
stage_sft
