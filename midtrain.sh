#!/usr/bin/env bash
# midtrain.sh: Midtrain (mid_train, chat_eval -i mid): one stage of speedrun_dgx.sh, with its flags (--help); resumes an interrupted run.
exec bash "$(dirname "${BASH_SOURCE[0]}")/speedrun_dgx.sh" --only midtrain "$@"
