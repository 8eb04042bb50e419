#!/usr/bin/env bash
# dev/docker_entrypoint.sh: what a nanochat-spark container runs first (the Dockerfile's ENTRYPOINT).
# The image was built without a GPU, so the accelerator check of setup.sh (bf16, torch.compile,
# on a GB10 the CUDA 13 ptxas) runs again here, where the GPU is visible, and rewrites the
# settings in .nanochat_env that the shell scripts read. Then it runs the container's command.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.venv/bin/python dev/check_accelerator.py .nanochat_env >&2
exec "$@"
