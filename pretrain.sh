#!/usr/bin/env bash
# pretrain.sh: Pretrain the base model (base_train, base_loss, base_eval): one stage of speedrun_dgx.sh, with its flags (--help); resumes an interrupted run.
exec bash "$(dirname "${BASH_SOURCE[0]}")/speedrun_dgx.sh" --only pretrain "$@"
