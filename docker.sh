#!/usr/bin/env bash
# docker.sh: build the nanochat-spark image (Dockerfile) and run the pipeline's scripts in it, with
# the settings PyTorch on a GPU needs (--gpus all, the host's shared memory, unlimited locked
# memory, a 64 MB stack) and $NANOCHAT_BASE_DIR of the host mounted at /data. Each command
# mirrors a shell script and passes its flags on: `./docker.sh train base --depth 12` is
# `./pretrain.sh --depth 12` in the container. Nothing else is installed on the host.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: ./docker.sh [--image NAME] [--cpu] [--dry-run] COMMAND [flags]

Commands:
  build [--platform P]     build the image for this machine (or P: linux/arm64 for a DGX Spark,
                           linux/amd64), owned by your user id so that /data stays yours
  train STAGE [flags]      run a stage in the image: all (speedrun_dgx.sh), data, tokenizer,
                           base (pretrain.sh), mid (midtrain.sh), sft (sft.sh), rl (rl.sh); the flags go
                           to that script (--tiny, --depth N, --nnodes/--node-rank/--master-addr, ...)
  chat [--port P] [--public] [flags]
                           the web UI and OpenAI API (chat.sh) on http://127.0.0.1:P (default 8000);
                           --public publishes it on every interface of the host; flags go to chat.sh
  cli [flags]              terminal chat (chat_cli.sh)
  shell                    a bash shell in the image

Options:
  --image NAME   image name (default nanochat-spark)
  --cpu          run without --gpus all (a machine without NVIDIA GPUs: the CPU presets only)
  --dry-run      print the docker command instead of running it
  -h, --help     show this message

Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat) on the host is the container's /data:
data, tokenizer, checkpoints, logs and the report card stay on the host. NCCL_*, GLOO_SOCKET_IFNAME,
TORCH_NCCL_*, NANOCHAT_DIST_TIMEOUT and WANDB_API_KEY pass into the container when set;
NANOCHAT_DOCKER_ARGS adds options to docker run (e.g. "--name nanochat").
Training runs with the host's network (--network host) and /dev/infiniband when the host has it,
which two nodes need for NCCL over RoCE.
USAGE
}

image=nanochat-spark
gpus=(--gpus all)
dry_run=0
while [ $# -gt 0 ]; do
    case "$1" in
        --image) image="${2:?--image needs a name}"; shift ;;
        --cpu) gpus=() ;;
        --dry-run) dry_run=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "docker.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
    shift
done
[ $# -gt 0 ] || { usage >&2; exit 2; }
command="$1"; shift

cd "$(dirname "${BASH_SOURCE[0]}")"
base_dir="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"

# run CMD...: print it (--dry-run) or run it
run() {
    if [ "$dry_run" = 1 ]; then
        printf '%q ' "$@"; echo
    else
        "$@"
    fi
}

# What every container gets: removed when it ends, an init that forwards signals (Ctrl-C, docker
# stop) to the scripts, the GPUs, the host's shared memory (PyTorch's workers and NCCL use
# /dev/shm; Docker's default is 64 MB), unlimited locked memory (pinned host buffers, RDMA)
# and a 64 MB stack, as NVIDIA's PyTorch containers ask for, and the base dir.
container=(docker run --rm --init "${gpus[@]}" --ipc=host --ulimit memlock=-1 --ulimit stack=67108864
           -v "$base_dir:/data")
[ -t 0 ] && [ -t 1 ] && container+=(-it)
# the settings of a multi-node run (README "Two DGX Sparks") pass through when set on the host
while read -r name; do
    container+=(-e "$name")
done < <(compgen -e | grep -E '^(NCCL_|GLOO_SOCKET_IFNAME$|TORCH_NCCL_|NANOCHAT_DIST_TIMEOUT$|WANDB_API_KEY$)' || true)
# and anything else for docker run, e.g. NANOCHAT_DOCKER_ARGS="--name nanochat"
read -ra extra <<< "${NANOCHAT_DOCKER_ARGS:-}"
container+=("${extra[@]}")

case "$command" in
    build)
        platform=()
        if [ "${1:-}" = --platform ]; then
            platform=(--platform "${2:?--platform needs linux/arm64 or linux/amd64}")
        elif [ $# -gt 0 ]; then
            echo "docker.sh build: unknown flag '$1' (see --help)" >&2; exit 2
        fi
        uid=$(id -u); gid=$(id -g)
        if [ "$uid" = 0 ]; then uid=1000; gid=1000; fi  # the image never runs as root
        run docker build "${platform[@]}" --build-arg "UID=$uid" --build-arg "GID=$gid" -t "$image" .
        ;;
    train)
        stage="${1:-}"
        [ $# -gt 0 ] && shift
        case "$stage" in
            all) script=(bash speedrun_dgx.sh) ;;
            data|tokenizer) script=(bash speedrun_dgx.sh --only "$stage") ;;
            base) script=(bash pretrain.sh) ;;
            mid) script=(bash midtrain.sh) ;;
            sft) script=(bash sft.sh) ;;
            rl) script=(bash rl.sh) ;;
            *) echo "docker.sh train: STAGE must be one of all, data, tokenizer, base, mid, sft, rl; not '$stage'" >&2
               exit 2 ;;
        esac
        [ "$dry_run" = 1 ] || mkdir -p "$base_dir"
        rdma=()
        [ -e /dev/infiniband ] && rdma=(--device /dev/infiniband)  # RoCE for NCCL between two Sparks
        run "${container[@]}" --network host "${rdma[@]}" --no-healthcheck "$image" "${script[@]}" "$@"
        ;;
    chat)
        port=8000; publish=127.0.0.1
        while [ $# -gt 0 ]; do
            case "$1" in
                --port) port="${2:?--port needs a number}"; shift ;;
                --public) publish=0.0.0.0 ;;
                *) break ;;
            esac
            shift
        done
        run "${container[@]}" -p "$publish:$port:8000" "$image" ./chat.sh --host 0.0.0.0 --port 8000 "$@"
        ;;
    cli)
        run "${container[@]}" --no-healthcheck "$image" ./chat_cli.sh "$@"
        ;;
    shell)
        run "${container[@]}" --no-healthcheck "$image" bash
        ;;
    *)
        echo "docker.sh: unknown command '$command' (build, train, chat, cli, shell; see --help)" >&2
        exit 2
        ;;
esac
