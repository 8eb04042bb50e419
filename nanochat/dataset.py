"""
Pretraining text shards: list them, fingerprint them, iterate over them, and download
FineWeb-EDU shards from the Hugging Face Hub (upstream's nanochat/dataset.py).

A shard is `shard_XXXXX.parquet` with one string column `text`, one document per row, in row
groups (1024 documents in the offline corpus). All shards but the last are training data; the
last shard (highest index) present in the folder is the validation shard.

Not for: tokenizing or batching (dataloader.py), chat and task data (tasks/), building the
offline corpus from Debian packages (offline_corpus.py, which writes shards of this format).

Usage:
    python -m nanochat.dataset -n 8          # download FineWeb-EDU shards 0..7 (7 = validation)
    python -m nanochat.dataset --offline     # forwards to python -m nanochat.offline_corpus
"""

import hashlib
import os
import re
import sys
import time
from functools import partial
from multiprocessing.pool import ThreadPool

import pyarrow.parquet as pq
import requests

from nanochat.common import ArgumentParser, atomic_write, get_base_dir, print0

SHARD_PATTERN = re.compile(r"^shard_(\d{5})\.parquet$")
ROW_GROUP_SIZE = 1024  # documents per row group: the unit that parquets_iter_batched yields and DDP ranks stride over


def shard_name(index):
    """File name of shard `index`, e.g. 7 -> "shard_00007.parquet"."""
    return f"shard_{index:05d}.parquet"


def get_data_dir():
    """Return $NANOCHAT_BASE_DIR/base_data (str), where the shards live; created if needed."""
    data_dir = os.path.join(get_base_dir(), "base_data")
    os.makedirs(data_dir, exist_ok=True)
    return data_dir


def list_parquet_files(data_dir=None):
    """Return the sorted full paths of the `shard_XXXXX.parquet` files in `data_dir`.

    `data_dir` defaults to get_data_dir(). Temporary files of unfinished writes are not listed.
    The last path is the validation shard. Returns [] when there are none.
    """
    data_dir = data_dir or get_data_dir()
    if not os.path.isdir(data_dir):
        return []
    names = sorted(name for name in os.listdir(data_dir) if SHARD_PATTERN.match(name))
    return [os.path.join(data_dir, name) for name in names]


def shards_fingerprint(data_dir=None):
    """A short hex digest of the shards in `data_dir` (default get_data_dir()): their names, sizes
    and last 64 KiB (where parquet keeps its footer: row counts, column chunk offsets, statistics).

    Two sets of shards with the same digest hold the same rows for all practical purposes; it is
    cheap to compute (240 FineWeb-EDU shards: 15 MB read), unlike hashing their ~24 GB. Used to
    check that every node of a multi-node run trains on the same data.
    """
    digest = hashlib.sha256()
    for path in list_parquet_files(data_dir):
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(max(size - 65536, 0))
            digest.update(f"{os.path.basename(path)}:{size}:".encode() + f.read())
    return digest.hexdigest()[:16]


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield the documents of a split, one row group (up to 1024 documents) at a time, as list[str].

    split: "train" (every shard but the last) or "val" (the last shard).
    start, step: within each shard, read row groups start, start+step, ... so that DDP rank r
    of world size W passes start=r, step=W and the ranks read disjoint row groups.

    Raises:
        FileNotFoundError: no shards in the folder, or only one (then there is no train split);
            the message names the command that downloads or builds them.
        ValueError: an unknown split, or a shard without a `text` column.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    data_dir = data_dir or get_data_dir()
    paths = list_parquet_files(data_dir)
    if not paths:
        raise FileNotFoundError(
            f"no pretraining shards (shard_*.parquet) in {data_dir}. Download FineWeb-EDU shards with "
            f"`python -m nanochat.dataset -n 8`, or build the offline corpus with "
            f"`python -m nanochat.dataset --offline`")
    if split == "train" and len(paths) == 1:
        raise FileNotFoundError(
            f"only one shard in {data_dir}, and the last shard is the validation split, so there is no "
            f"training data. Download at least two shards: `python -m nanochat.dataset -n 2`")
    paths = paths[:-1] if split == "train" else paths[-1:]
    for path in paths:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names}); "
                             f"it is not a pretraining shard, move it out of {data_dir}")
        for rg_idx in range(start, pf.num_row_groups, step):
            yield pf.read_row_group(rg_idx, columns=["text"]).column("text").to_pylist()


class DatasetError(RuntimeError):
    """A problem the user can fix (network, missing packages, a folder in the way); the message says how.

    Raised here and by offline_corpus.py.
    """


# the offline corpus's manifest (offline_corpus.py writes it last): marks a folder that holds that corpus
OFFLINE_MANIFEST = "offline_manifest.json"


# -----------------------------------------------------------------------------
# Online: FineWeb-EDU shards from the Hugging Face Hub

# Karpathy's reshuffle of FineWeb-EDU (100B tokens) into 1823 parquet shards of ~100 MB each:
# https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle
BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822  # the last shard is shard_01822.parquet


def get_data_url():
    """The base URL of the shards: $NANOCHAT_DATA_URL if set (a mirror, a test server), else BASE_URL."""
    return os.environ.get("NANOCHAT_DATA_URL") or BASE_URL


def download_single_file(index, data_dir, base_url, max_attempts=5, backoff_s=2.0):
    """Download shard `index` into `data_dir` unless it is already there; return its path.

    The bytes stream into a temporary file (common.atomic_write) that replaces the shard only once
    it is complete and starts and ends with the parquet magic b"PAR1", so an interrupted download
    never leaves a partial shard. Failed attempts are retried after backoff_s * 2**k seconds
    (k = 0, 1, ...).

    Raises:
        DatasetError: the server has no such shard (HTTP 404), or all `max_attempts` failed.
    """
    filename = shard_name(index)
    path = os.path.join(data_dir, filename)
    if os.path.exists(path):
        return path
    url = f"{base_url}/{filename}"

    def stream_shard(f):
        head = tail = b""  # the first and the last 4 bytes seen, checked before the shard is renamed into place
        with requests.get(url, stream=True, timeout=(10, 60)) as response:
            if response.status_code == 404:
                raise DatasetError(f"{url} does not exist (HTTP 404); shard indices run from 0 to {MAX_SHARD}")
            response.raise_for_status()
            for chunk in response.iter_content(chunk_size=1 << 20):
                f.write(chunk)
                head = (head + chunk[:4])[:4]
                tail = (tail + chunk[-4:])[-4:]
        if head != b"PAR1" or tail != b"PAR1":
            raise ValueError("the response is not a parquet file")

    for attempt in range(1, max_attempts + 1):
        try:
            atomic_write(path, stream_shard)
            print0(f"downloaded {filename} ({os.path.getsize(path) / 1e6:.1f} MB)")
            return path
        except (requests.RequestException, OSError, ValueError) as e:
            if attempt == max_attempts:
                raise DatasetError(f"could not download {url} after {max_attempts} attempts: {e}") from e
            wait = backoff_s * 2 ** (attempt - 1)
            print0(f"attempt {attempt}/{max_attempts} for {filename} failed ({e}); retrying in {wait:.0f} s")
            time.sleep(wait)


def check_reachable(url):
    """Raise DatasetError, naming the offline alternative, if the server of `url` cannot be reached.

    Any HTTP answer counts as reachable (a 404 is reported per shard). This probes the server the
    shards come from, which $NANOCHAT_DATA_URL may point at a mirror or a test server, so it is
    not common.hub_reachable (that one asks $HF_ENDPOINT).

    Raises:
        DatasetError: no connection within 10 seconds.
    """
    try:
        requests.head(url, timeout=10, allow_redirects=True)
    except (requests.ConnectionError, requests.Timeout) as e:
        host = re.sub(r"^\w+://([^/]+).*$", r"\1", url)
        raise DatasetError(
            f"cannot reach {host} ({type(e).__name__}). Without internet access, run "
            f"`python -m nanochat.dataset --offline` to build the offline corpus instead") from e


def download_shards(num_files, data_dir=None, base_url=None, num_workers=4, max_attempts=5, backoff_s=2.0):
    """Download FineWeb-EDU shards 0..num_files-1 (-1: all 1823) in parallel, num_workers at a time; return their paths.

    Shards already present are skipped. The last shard downloaded is the validation shard, so
    `-n 8` then `-n 240` moves the validation split from shard 7 to shard 239 (as upstream).

    Raises:
        DatasetError: a bad `num_files`, a folder that holds the offline corpus, the server is
            unreachable, or a shard failed every attempt.
    """
    total = MAX_SHARD + 1
    if num_files == -1:
        num_files = total
    if not 1 <= num_files <= total:
        raise DatasetError(f"-n/--num-files must be between 1 and {total} (or -1 for all), not {num_files}")
    data_dir = data_dir or get_data_dir()
    base_url = (base_url or get_data_url()).rstrip("/")
    if os.path.exists(os.path.join(data_dir, OFFLINE_MANIFEST)):
        raise DatasetError(
            f"{data_dir} holds the offline corpus; FineWeb-EDU shards would mix with it. Remove it "
            f"(rm -r {data_dir}) or point NANOCHAT_BASE_DIR elsewhere, then download again")
    missing = [i for i in range(num_files) if not os.path.exists(os.path.join(data_dir, shard_name(i)))]
    print0(f"{num_files} shards wanted in {data_dir}: {num_files - len(missing)} present, "
           f"{len(missing)} to download from {base_url}")
    if missing:
        check_reachable(f"{base_url}/{shard_name(missing[0])}")
        fetch = partial(download_single_file, data_dir=data_dir, base_url=base_url,
                        max_attempts=max_attempts, backoff_s=backoff_s)
        with ThreadPool(max(1, min(num_workers, len(missing)))) as pool:  # network-bound: threads suffice
            pool.map(fetch, missing)
    return [os.path.join(data_dir, shard_name(i)) for i in range(num_files)]


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    """`python -m nanochat.dataset -n N`; a user error exits with its message, not a traceback.

    `--offline [flags]` forwards to `python -m nanochat.offline_corpus [flags]`, the command the
    README and older instructions give for building the offline corpus.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--offline" in argv:
        from nanochat import offline_corpus  # the builder is not on the training path: imported only here
        return offline_corpus.main([a for a in argv if a != "--offline"])
    parser = ArgumentParser(
        prog="python -m nanochat.dataset",
        description="Download FineWeb-EDU pretraining shards into $NANOCHAT_BASE_DIR/base_data; the last shard "
                    "is the validation shard. Without internet access build the offline corpus instead: "
                    "`python -m nanochat.offline_corpus` (or --offline here).")
    parser.add_argument("-n", "--num-files", type=int, default=None,
                        help=f"download FineWeb-EDU shards 0..N-1, ~100 MB each (-1: all {MAX_SHARD + 1}); "
                             f"from $NANOCHAT_DATA_URL if set, else {BASE_URL}")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    args = parser.parse_args(argv)
    if args.num_files is None:
        parser.error("pass either -n N (download N FineWeb-EDU shards) or --offline (build the offline corpus)")
    if args.num_workers < 1:
        parser.error("-w/--num-workers must be at least 1")
    try:
        download_shards(args.num_files, num_workers=args.num_workers)
    except (DatasetError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
