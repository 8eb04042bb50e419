#!/usr/bin/env bash
# sft.sh: Supervised finetuning (chat_sft, chat_eval -i sft): one stage of speedrun_dgx.sh, with its flags (--help); resumes an interrupted run.
exec bash "$(dirname "${BASH_SOURCE[0]}")/speedrun_dgx.sh" --only sft "$@"
