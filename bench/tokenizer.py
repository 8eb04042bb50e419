"""Benchmark tokenizer training: our rustbpe against the PyPI `rustbpe` and HuggingFace `tokenizers`.

Trains each on every train shard under $NANOCHAT_BASE_DIR/base_data (the last shard is held out)
at each vocabulary size, each run in its own subprocess so that the two `rustbpe` modules do not
clash and each run's peak RSS can be read from os.wait4. Reports training wall and CPU time, peak
RSS, bytes/token on the validation shard, and the tiktoken encode throughput of our tokenizer.
Not for: tokenizer quality beyond bytes/token (that is scripts.tok_eval).

    python -m bench.tokenizer                       # print the table
    python -m bench.tokenizer --write-results       # also update bench/RESULTS.md
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from nanochat.dataset import get_data_dir, parquets_iter_batched

# nanochat's split pattern: GPT-4's, with numbers in groups of 1-2 digits. It is passed to every
# trainer explicitly because the PyPI rustbpe defaults to GPT-4's 1-3 digits.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s+"""
)
TRAINERS = ("ours", "pypi", "hf")
# A worker that only loads the data: its peak RSS is the baseline that every trainer's includes.
BASELINE = "load"
RESULTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
SECTION = "## Tokenizer training"


def load_split(split):
    return [text for batch in parquets_iter_batched(split) for text in batch]


def make_tiktoken(mergeable_ranks):
    import tiktoken

    return tiktoken.Encoding(name="bench", pat_str=SPLIT_PATTERN, mergeable_ranks=mergeable_ranks, special_tokens={})


def train_hf(texts, vocab_size):
    """Byte-level BPE with HuggingFace tokenizers, split the same way; returns an encode_batch function."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    return lambda batch: [enc.ids for enc in tok.encode_batch(batch)]


def run_worker(trainer, vocab_size):
    """Train one tokenizer in this process and print its measurements as JSON."""
    texts = load_split("train")
    val = load_split("val")
    result = {"train_mb": sum(len(t.encode("utf-8")) for t in texts) / 1e6}
    if trainer == "load":
        print(json.dumps(result))
        return
    t0, c0 = time.perf_counter(), time.process_time()
    if trainer == "hf":
        encode_batch = train_hf(texts, vocab_size)
    else:
        import rustbpe

        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), vocab_size, pattern=SPLIT_PATTERN)
        enc = make_tiktoken({bytes(token): rank for token, rank in tok.get_mergeable_ranks()})
        encode_batch = enc.encode_ordinary_batch
    result["train_s"] = time.perf_counter() - t0
    result["train_cpu_s"] = time.process_time() - c0
    val_bytes = sum(len(t.encode("utf-8")) for t in val)
    result["val_bytes_per_token"] = val_bytes / sum(len(ids) for ids in encode_batch(val))
    if trainer == "ours":
        # Encode throughput of the trained vocabulary through tiktoken, one thread and batched.
        t0 = time.perf_counter()
        for text in val:
            enc.encode_ordinary(text)
        result["tiktoken_mb_s_1thread"] = val_bytes / 1e6 / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        tiktoken_ids = enc.encode_ordinary_batch(val, num_threads=os.cpu_count())
        result["tiktoken_mb_s_batch"] = val_bytes / 1e6 / (time.perf_counter() - t0)
        # Our own batch_encode, for comparison: it splits with the hand-written matcher.
        t0 = time.perf_counter()
        ours_ids = tok.batch_encode(val)
        result["rustbpe_batch_encode_mb_s"] = val_bytes / 1e6 / (time.perf_counter() - t0)
        result["same_ids_as_tiktoken"] = ours_ids == tiktoken_ids
    print(json.dumps(result))


def ensure_pypi_rustbpe(target):
    """Install the PyPI rustbpe into `target` (outside the venv) unless it is there already."""
    if not os.path.isdir(os.path.join(target, "rustbpe")):
        print(f"installing the PyPI rustbpe into {target}", flush=True)
        subprocess.run(["uv", "pip", "install", "--python", sys.executable, "--target", target, "rustbpe"],
                       check=True)


def run_child(trainer, vocab_size, pypi_dir):
    """Run one worker in a subprocess; returns its JSON result plus peak RSS and CPU time."""
    env = dict(os.environ)
    if trainer == "pypi":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pypi_dir, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "bench.tokenizer", "--worker", trainer, "--vocab-sizes", str(vocab_size)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(RESULTS_PATH)))
    out = proc.stdout.read()
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all children).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
    return result


def cpu_name():
    """The CPU model from /proc/cpuinfo, or the architecture where that is not available."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def format_section(rows, vocab_sizes, train_mb, load, baseline_mb):
    lines = [
        SECTION, "",
        f"Measured {datetime.date.today().isoformat()} on {os.cpu_count()}-core {platform.machine()} "
        f"({cpu_name()}), Python {platform.python_version()}, "
        f"1-minute load average {load:.1f} when the run started (the machine is shared: wall times are noisy, "
        f"CPU times less so). Training data: {train_mb:.1f} MB (all train shards of the offline corpus), "
        "split pattern = nanochat's (GPT-4 with 1-2 digit numbers) for every trainer. "
        "Train time includes building the tiktoken Encoding for the two rustbpe runs. Peak RSS is the "
        f"whole worker process, including {baseline_mb:.0f} MB for Python and the loaded train and validation "
        "text (ours also holds two encodings of the validation shard, for the encode comparison). "
        "Command: `python -m bench.tokenizer --write-results`.", "",
        "| vocab | trainer | train wall s | train CPU s | peak RSS MB | val bytes/token | ours / this (wall) |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"ours": "rustbpe (ours)", "pypi": "rustbpe (PyPI)", "hf": "HF tokenizers"}
    for vocab in vocab_sizes:
        ours = rows[(vocab, "ours")]["train_s"]
        for trainer in TRAINERS:
            r = rows[(vocab, trainer)]
            lines.append(f"| {vocab} | {names[trainer]} | {r['train_s']:.1f} | {r['train_cpu_s']:.1f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['val_bytes_per_token']:.3f} | {ours / r['train_s']:.2f} |")
    lines.append("")
    for vocab in vocab_sizes:
        r = rows[(vocab, "ours")]
        lines.append(f"tiktoken encode throughput with our vocab {vocab}: {r['tiktoken_mb_s_1thread']:.1f} MB/s "
                     f"on one thread, {r['tiktoken_mb_s_batch']:.1f} MB/s batched ({os.cpu_count()} threads); "
                     f"rustbpe's own batch_encode: {r['rustbpe_batch_encode_mb_s']:.1f} MB/s "
                     f"(ids identical to tiktoken's on the validation shard: {r['same_ids_as_tiktoken']}).")
    lines.append("")
    return "\n".join(lines)


def write_section(section):
    """Replace the tokenizer section of RESULTS.md (or append it), keeping the other sections."""
    text = open(RESULTS_PATH).read() if os.path.exists(RESULTS_PATH) else "# Benchmark results\n"
    start = text.find(SECTION)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("" if end == -1 else "\n" + text[end + 1:])
    with open(RESULTS_PATH, "w") as f:
        f.write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-sizes", "--vocab_sizes", type=int, nargs="+", default=[8192, 65536])
    parser.add_argument("--pypi-dir", "--pypi_dir", default=os.path.join(tempfile.gettempdir(), "pypi_rustbpe"),
                        help="where the PyPI rustbpe is (installed there if missing)")
    parser.add_argument("--write-results", "--write_results", action="store_true",
                        help="write the table into bench/RESULTS.md")
    parser.add_argument("--worker", choices=TRAINERS + (BASELINE,), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args.worker, args.vocab_sizes[0])
        return

    print(f"data: {get_data_dir()}", flush=True)
    ensure_pypi_rustbpe(args.pypi_dir)
    load = os.getloadavg()[0]
    baseline_mb = run_child(BASELINE, args.vocab_sizes[0], args.pypi_dir)["peak_rss_mb"]
    print(f"baseline (load the data only): peak RSS {baseline_mb:.0f} MB", flush=True)
    rows = {}
    for vocab in args.vocab_sizes:
        for trainer in TRAINERS:
            rows[(vocab, trainer)] = r = run_child(trainer, vocab, args.pypi_dir)
            print(f"vocab {vocab:6d} {trainer:5s}: train {r['train_s']:6.1f} s wall {r['train_cpu_s']:6.1f} s CPU, "
                  f"peak RSS {r['peak_rss_mb']:6.0f} MB, val {r['val_bytes_per_token']:.3f} bytes/token", flush=True)
        for trainer in ("pypi", "hf"):
            ratio = rows[(vocab, "ours")]["train_s"] / rows[(vocab, trainer)]["train_s"]
            print(f"vocab {vocab}: ours / {trainer} = {ratio:.2f} (wall)")
    train_mb = rows[(args.vocab_sizes[0], "ours")]["train_mb"]
    section = format_section(rows, args.vocab_sizes, train_mb, load, baseline_mb)
    print(section)
    if args.write_results:
        write_section(section)
        print(f"wrote {RESULTS_PATH}")


if __name__ == "__main__":
    main()
