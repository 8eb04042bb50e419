#!/usr/bin/env bash
# rl.sh: Reinforcement learning (chat_rl, chat_eval -i rl): one stage of speedrun_dgx.sh, with its flags (--help); resumes an interrupted run.
exec bash "$(dirname "${BASH_SOURCE[0]}")/speedrun_dgx.sh" --only rl "$@"
