#!/usr/bin/env bash
# The GPU device check on the device machine (Python 3.12 + torch preinstalled, no internet):
# installs the carried wheels next to the system's packages, copies the carried data
# into a scratch NANOCHAT_BASE_DIR, puts the word list and WordNet where the offline chat tasks
# read them, then runs dev/device_check.py. Results go to $OUT (the `run` tool brings them back).
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bash dev/device_check.sh [--part 1|2|3|all] [--budget-s S] [--cpu]

  --part 1     the stages on CUDA + d20 throughput (default); --part 2: the measurements;
               --part 3: serving (chat_web, batch 1 vs continuous batching, 1-64 clients)
  --budget-s   start no new item after S seconds (default: 300 for part 1, 150 for part 2, 300 for part 3)
  --cpu        CPU sizes, no GPU needed (what the tests run)

Prepare .device_pack/ here first with `bash dev/device_pack.sh`; bench/README.md has the `run` call.
USAGE
}
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --part|--budget-s) [ $# -ge 2 ] || { usage >&2; exit 2; }; args+=("$1" "$2"); shift ;;
        --cpu) args+=("$1") ;;
        *) echo "device_check.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.."
PACK=$PWD/.device_pack
[ -d "$PACK" ] || { echo "device_check.sh: no .device_pack/; run bash dev/device_pack.sh and carry .device_pack" >&2; exit 1; }
export OUT=${OUT:-$PWD/device_check_out}
mkdir -p "$OUT"

# 1. packages: the machine's torch, numpy, tiktoken, pyarrow; exactly the carried wheels for the
#    rest, into a folder of their own (--no-deps: pip resolves nothing, so it never reaches for
#    the network or for a numpy the pack leaves out)
site=${TMPDIR:-/tmp}/nanochat_device_site
if [ ! -d "$site/fastapi" ]; then
    python3 -m pip install --quiet --no-deps --no-index --target "$site" "$PACK"/wheels/*.whl
fi

# 2. data: a scratch copy, since the stages write their checkpoints into it
export NANOCHAT_BASE_DIR=${TMPDIR:-/tmp}/nanochat_device_base
[ -d "$NANOCHAT_BASE_DIR" ] || cp -r "$PACK/base_dir" "$NANOCHAT_BASE_DIR"

# 3. what the offline chat tasks read (Debian's wamerican and wordnet-base here)
if [ ! -e /usr/share/wordnet/data.noun ] || [ ! -e /usr/share/dict/words ]; then
    tar -C / -xJf "$PACK/share.tar.xz" 2>/dev/null \
        || echo "device_check.sh: warning: cannot write /usr/share (not root?): mid_train and chat_sft will fail" >&2
fi

export PYTHONPATH=$PWD:$site PYTHONUNBUFFERED=1
python3 dev/device_check.py --out "$OUT" "${args[@]}" 2>&1 | tee "$OUT/device_check.log"
