#!/usr/bin/env bash
# setup.sh: make this checkout ready to run. Idempotent: safe to re-run at any time.
#   - installs uv (from PyPI) if it is missing
#   - creates .venv with `uv sync` (which also compiles the rustbpe extension with cargo)
#   - checks the GPU (bf16, torch.compile; on a GB10 the CUDA 13 ptxas) and writes .nanochat_env
#   - installs the Debian packages the chat tasks need (dev/apt_packages.txt: the word list, WordNet,
#     bubblewrap for the code sandbox)
#   - with --offline-data: installs the Debian text packages and builds the offline corpus
# It never edits your shell start-up files.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: ./setup.sh [--offline-data] [--help]

  --offline-data   also apt-get install the Debian text packages listed in
                   dev/offline_packages.txt and build the offline pretraining corpus
                   into $NANOCHAT_BASE_DIR/base_data
  --help           show this message

Debian packages are installed with apt-get (through sudo when you are not root) only when
missing: dev/apt_packages.txt always, dev/offline_packages.txt with --offline-data.

Environment: NANOCHAT_BASE_DIR (default ~/.cache/nanochat) is where data and checkpoints go.
USAGE
}

offline_data=0
while [ $# -gt 0 ]; do
    case "$1" in
        --offline-data) offline_data=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup.sh: unknown flag '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "${BASH_SOURCE[0]}")"
export PATH="$HOME/.cargo/bin:$HOME/.local/bin:$PATH"

# 1. uv (the Python package manager), from PyPI
if ! command -v uv >/dev/null 2>&1; then
    echo "[setup] installing uv from PyPI into ~/.local"
    python3 -m pip install --user --quiet uv 2>/dev/null \
        || python3 -m pip install --user --quiet --break-system-packages uv
fi
command -v uv >/dev/null 2>&1 || { echo "[setup] uv was installed but is not on PATH; add ~/.local/bin to PATH and re-run" >&2; exit 1; }

# 2. the Rust toolchain that builds rustbpe (we never download rustup behind your back)
if ! command -v cargo >/dev/null 2>&1; then
    cat >&2 <<'MSG'
[setup] cargo (the Rust toolchain) is missing; it is needed to build the rustbpe tokenizer trainer.
        Install it with rustup (https://rustup.rs: curl --proto '=https' -sSf https://sh.rustup.rs | sh)
        then open a new shell (or `source ~/.cargo/env`) and re-run ./setup.sh
MSG
    exit 1
fi

# 3. the virtual environment: every runtime + test dependency, and the rustbpe extension
echo "[setup] uv sync (creates .venv, builds rustbpe)"
uv sync --quiet
.venv/bin/python -c "import torch, rustbpe, tiktoken, nanochat"

# 4. the accelerator: versions, a bf16 matmul and a compiled kernel; GPU settings -> .nanochat_env
.venv/bin/python dev/check_accelerator.py .nanochat_env

# 5. Debian packages, installed only when missing: what the chat tasks read, and with
#    --offline-data the text packages of the offline corpus
apt_install_missing() {
    local p missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "[setup] missing Debian packages: ${missing[*]}; install them as root: apt-get install ${missing[*]}" >&2
            exit 1
        fi
        sudo="sudo"
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "[setup] missing Debian packages ${missing[*]} and no apt-get here: install them, or what they" \
             "hold, with your system's package manager" >&2
        exit 1
    fi
    echo "[setup] apt-get install ${missing[*]}"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}
packages() { grep -v -e '^#' -e '^$' "$1"; }

# the chat tasks' files: installed with apt where there is one; elsewhere a warning that names them
pkgs=()
while read -r pkg path; do
    [ -e "$path" ] || pkgs+=("$pkg")
done < <(packages dev/apt_packages.txt)
if [ ${#pkgs[@]} -gt 0 ] && ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] WARNING: no apt-get here, and the chat tasks need what Debian's ${pkgs[*]} install" \
         "(dev/apt_packages.txt lists the paths): install those with your system's package manager" >&2
elif [ ${#pkgs[@]} -gt 0 ]; then
    apt_install_missing "${pkgs[@]}"
fi
if [ "$offline_data" = 1 ]; then
    mapfile -t pkgs < <(packages dev/offline_packages.txt)
    apt_install_missing "${pkgs[@]}"
    .venv/bin/python -m nanochat.offline_corpus
fi
