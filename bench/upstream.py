"""
Upstream nanochat's pretraining, run as its own program on our data, for a row beside ours.

run_upstream_base_train() points a checkout of upstream (karpathy/nanochat) at a scratch
NANOCHAT_BASE_DIR that holds our shards (symlinked as base_data_climbmix/, last shard = val, as
in ours) and our tokenizer re-saved in upstream's format (a pickled tiktoken.Encoding: the same
merges, pattern and special ids, so every token id is the same), runs its scripts/base_train.py
with our shapes and upstream's recipe defaults otherwise, and parses what it prints.

Not for: importing upstream code (it runs in its own process, from its own checkout, with the
interpreter given), nor for anything upstream needs the internet for: CORE and sampling are
off, wandb is the "dummy" run, and HF_HUB_OFFLINE=1 makes its FA3 kernel lookup on CUDA fail
fast into its SDPA fallback.

    python -m bench.upstream --upstream-dir /tmp/upstream_head --depth 4 --num-iterations 15
"""

import argparse
import json
import os
import pickle
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from nanochat.dataset import list_parquet_files
from nanochat.tokenizer import RustBPETokenizer

STEP_RE = re.compile(r"^step (\d+)/(\d+) .*\| loss: ([\d.]+) \|.*\| dt: ([\d.]+)ms \|")
VAL_RE = re.compile(r"^Step (\d+) \| Validation bpb: ([\d.]+)")
PARAMS_RE = re.compile(r"^total\s*: ([\d,]+)")
FLOPS_RE = re.compile(r"^Estimated FLOPs per token: ([\d.e+-]+)")


def make_upstream_base_dir(base_dir, out_dir):
    """Fill `out_dir` as upstream's NANOCHAT_BASE_DIR: our shards of base_dir/base_data symlinked
    under base_data_climbmix/ (same names, so the same last shard is val), and tokenizer/ with
    tokenizer.pkl (our tokenizer as a pickled tiktoken.Encoding) and token_bytes.pt (ours).

    Raises:
        FileNotFoundError: base_dir has no shards or no tokenizer.
    """
    shards = list_parquet_files(os.path.join(base_dir, "base_data"))
    if len(shards) < 2:
        raise FileNotFoundError(f"{base_dir}/base_data needs at least 2 shards (train + val), found {len(shards)}; "
                                "run `python -m nanochat.dataset` or `python -m nanochat.offline_corpus` first")
    tokenizer = RustBPETokenizer.from_directory(os.path.join(base_dir, "tokenizer"))
    os.makedirs(os.path.join(out_dir, "base_data_climbmix"))
    for path in shards:
        os.symlink(os.path.abspath(path), os.path.join(out_dir, "base_data_climbmix", os.path.basename(path)))
    tok_dir = os.path.join(out_dir, "tokenizer")
    os.makedirs(tok_dir)
    with open(os.path.join(tok_dir, "tokenizer.pkl"), "wb") as f:
        pickle.dump(tokenizer.enc, f)  # upstream unpickles a tiktoken.Encoding; ours is named "rustbpe" as theirs
    # raw byte length per id, int32, 0 for the specials: what upstream's tok_train writes too
    torch.save(tokenizer.compute_token_bytes(), os.path.join(tok_dir, "token_bytes.pt"))


def parse_base_train_output(text, total_batch_size, warmup_steps):
    """The numbers base_train.py prints -> dict (see run_upstream_base_train)."""
    steps, losses, step_s, val_bpbs, num_params, flops_per_token = [], [], [], {}, None, None
    for line in text.splitlines():
        line = line.strip()
        if m := STEP_RE.match(line):
            steps.append(int(m[1]))
            losses.append(float(m[3]))
            step_s.append(float(m[4]) / 1000)
        elif m := VAL_RE.match(line):
            val_bpbs[int(m[1])] = float(m[2])
        elif (m := PARAMS_RE.match(line)) and num_params is None:
            num_params = int(m[1].replace(",", ""))
        elif m := FLOPS_RE.match(line):
            flops_per_token = float(m[1])
    timed = step_s[warmup_steps:]
    return dict(
        val_bpb=val_bpbs[max(val_bpbs)] if val_bpbs else None, val_bpbs=val_bpbs,
        losses=losses, step_s=step_s, num_steps=len(steps),
        tok_s=total_batch_size / statistics.median(timed) if timed else None,
        first_step_s=step_s[0] if step_s else None,
        num_params=num_params, flops_per_token=flops_per_token,
    )


def run_upstream_base_train(upstream_dir, base_dir, *, python=sys.executable, depth, max_seq_len,
                            device_batch_size, total_batch_size, num_iterations, eval_tokens,
                            eval_every=None, warmup_steps=3, extra_args=(), env=None, timeout_s=3600):
    """Pretrain with upstream's scripts/base_train.py (cwd = upstream_dir, run by `python`) on the
    shards and tokenizer of our `base_dir`, and return what it printed.

    Shapes are in tokens: max_seq_len, total_batch_size (per optimizer step, a multiple of
    device_batch_size * max_seq_len), eval_tokens (per validation). eval_every defaults to
    num_iterations (val bpb at step 0 and at the end). extra_args are more base_train flags
    (e.g. "--window-pattern=L"); env adds environment variables. The scratch base dir, with the
    checkpoint upstream always writes at the end, is deleted afterwards.

    Returns a dict: val_bpb (the last validation, bits per byte), val_bpbs ({step: bpb}), losses
    (per step, upstream's printed loss: a debiased EMA of the train loss, not the raw one),
    step_s (seconds per step, upstream's own timing), tok_s (total_batch_size / median step_s
    after the first `warmup_steps`, which include compilation), first_step_s, num_steps,
    num_params, flops_per_token, wall_s (the whole process, seconds), output (its stdout+stderr).

    Raises:
        FileNotFoundError: upstream_dir has no scripts/base_train.py, or base_dir no data/tokenizer.
        RuntimeError: upstream failed, timed out or printed no step (the message names
            upstream_dir and ends with its output's tail).
    """
    script = os.path.join(upstream_dir, "scripts", "base_train.py")
    if not os.path.exists(script):
        raise FileNotFoundError(f"no {script}: pass the root of an upstream nanochat checkout, e.g. `git --git-dir="
                                "<mirror> archive HEAD | tar -x -C <dir>`")
    args = [python, "-m", "scripts.base_train", "--run=dummy", f"--depth={depth}", f"--max-seq-len={max_seq_len}",
            f"--device-batch-size={device_batch_size}", f"--total-batch-size={total_batch_size}",
            f"--num-iterations={num_iterations}", f"--eval-every={eval_every or num_iterations}",
            f"--eval-tokens={eval_tokens}", "--core-metric-every=-1", "--sample-every=-1", *extra_args]
    with tempfile.TemporaryDirectory(prefix="upstream_base_") as scratch:
        make_upstream_base_dir(base_dir, scratch)
        # no PYTHONPATH: a regular `scripts` package on it (ours) would shadow upstream's namespace one
        drop = ("PYTHONPATH", "RANK", "LOCAL_RANK", "WORLD_SIZE")
        child_env = {k: v for k, v in os.environ.items() if k not in drop}
        child_env.update(NANOCHAT_BASE_DIR=scratch, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        child_env.update(env or {})
        log_path = os.path.join(scratch, "base_train.log")
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            # own session: on timeout the whole group goes, inductor's compile workers included
            proc = subprocess.Popen(args, cwd=upstream_dir, env=child_env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        wall_s = time.perf_counter() - t0
        with open(log_path) as f:
            output = f.read()
    result = parse_base_train_output(output, total_batch_size, warmup_steps)
    if rc != 0 or result["num_steps"] == 0:
        why = f"timed out after {timeout_s} s" if rc is None else f"exited {rc}" if rc else "printed no training step"
        tail = "\n".join(output.splitlines()[-40:])
        raise RuntimeError(f"upstream base_train in {upstream_dir} {why}: {' '.join(args)}\n--- output tail ---\n{tail}")
    return dict(result, wall_s=wall_s, output=output)


if __name__ == "__main__":
    from nanochat.common import get_base_dir
    parser = argparse.ArgumentParser(description="Run upstream nanochat's base_train on our shards and "
                                     "tokenizer ($NANOCHAT_BASE_DIR); any other flag goes to base_train")
    parser.add_argument("--upstream-dir", required=True, help="root of an upstream nanochat checkout")
    parser.add_argument("--python", default=sys.executable, help="interpreter with upstream's dependencies")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--device-batch-size", type=int, default=8)
    parser.add_argument("--total-batch-size", type=int, default=4096, help="tokens per optimizer step")
    parser.add_argument("--num-iterations", type=int, default=15)
    parser.add_argument("--eval-tokens", type=int, default=8 * 4096)
    args, extra = parser.parse_known_args()
    r = run_upstream_base_train(args.upstream_dir, get_base_dir(), python=args.python, depth=args.depth,
                                max_seq_len=args.max_seq_len, device_batch_size=args.device_batch_size,
                                total_batch_size=args.total_batch_size, num_iterations=args.num_iterations,
                                eval_tokens=args.eval_tokens, extra_args=extra)
    del r["output"]
    print(json.dumps(r, indent=1))
