"""
Pretraining recipes side by side: final val bpb and tok/s of scripts.base_train runs on the same
shards, tokenizer and validation tokens, one row per (depth, variant, seed), at equal FLOPs (the
default), at a long horizon in steps (--steps), or at equal wall-clock minutes of training
(--minutes: each variant first runs 10 steps to measure its step time and compile cost, twice
when compiled so that the measured compile is the warm one the timed run pays; then the steps
that fit).

Baseline, measured in the same run: "nov2025", the recipe this project trained with until
Dec 2026 (training.RECIPES). The other variants: that recipe plus one change (its flags below),
"dec2026" (the default since Dec 2026) with and without the modern architecture, upstream's whole
2026 recipe ("jan2026", architecture included), and upstream nanochat HEAD itself when
--upstream points at a checkout of it (bench/upstream.py runs its own base_train on our data
with its own recipe at our batch; the row is skipped without one). The bpb column's delta is
against the baseline's mean; the spread column is the range over seeds, so a delta smaller than
the spread is noise.

Two validation numbers per run, on the last shard's first EVAL_TOKENS tokens: "val bpb", rows cut
from the document stream (what base_train prints), and "best-fit val bpb", rows packed
BOS-aligned best-fit (dataloader.bos_bestfit_data_loader), the way upstream HEAD evaluates. Only
the second compares with upstream's row, whose number is its own best-fit rows (it crops the
shortest document where ours crops the earliest read, so the rows differ slightly). Every run
of ours is eager (--no-compile) unless --compile is given, so tok/s compares recipes, not
compilation; upstream's row always compiles (its default). Equal wall clock (--minutes) is a
user's comparison only with --compile, as base_train compiles long runs by default.

    python -m bench.recipe --depths 4 --seeds 1,2 --out bench/recipe_d4.json
    python -m bench.recipe --depths 4,6,8 --variants nov2025,dec2026 --upstream /path/to/nanochat \\
        --upstream-python /path/to/venv/bin/python
    python -m bench.recipe --depths 2 --steps 2000 --batch 2048 --variants nov2025,dec2026 --seeds 1
    python -m bench.recipe --depths 4 --minutes 4 --compile --variants nov2025,dec2026 --seeds 1 --upstream ...

Needs $NANOCHAT_BASE_DIR (or --base-dir) with base_data/ and a trained tokenizer, e.g. after
`bash speedrun_dgx.sh --tiny --only data` and `--only tokenizer`. Runs write their checkpoints
to a scratch dir.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

# flags on top of the shared command: the baseline "nov2025" and each change alone on top of it, the
# default since Dec 2026 (with and without the modern architecture), and upstream's 2026 recipe whole
NOV2025 = ["--recipe", "nov2025"]
VARIANTS = {
    "nov2025": NOV2025,
    "+polar_express": NOV2025 + ["--orthogonalizer", "polar_express"],
    "+normuon": NOV2025 + ["--normuon-beta2", "0.9"],
    "+cautious_wd": NOV2025 + ["--weight-decay", "0.2"],
    "+lrs": NOV2025 + ["--embedding-lr", "0.3", "--unembedding-lr", "0.008"],
    "+schedule": NOV2025 + ["--warmup-steps", "40", "--warmdown-ratio", "0.65", "--final-lr-frac", "0.05"],
    "+modern_arch": NOV2025 + ["--arch", "modern"],
    "+bestfit": NOV2025 + ["--packing", "bestfit"],
    "+init": NOV2025 + ["--wte-init-std", "0.8", "--fc-init-scale", "0.4"],
    "dec2026": ["--recipe", "dec2026"],
    "dec2026+modern_arch": ["--recipe", "dec2026", "--arch", "modern"],
    "dec2026+init": ["--recipe", "dec2026", "--wte-init-std", "0.8", "--fc-init-scale", "0.4"],
    "dec2026+schedule": ["--recipe", "dec2026", "--warmup-steps", "40", "--warmdown-ratio", "0.65", "--final-lr-frac", "0.05"],
    "jan2026": ["--recipe", "jan2026", "--total-batch-size", "-1"],  # its own batch (Power Lines), LR x batch
    "jan2026@batch": ["--recipe", "jan2026"],  # at the bench's batch (--batch), LR x sqrt(batch / 2^19): as upstream's row runs
    "jan2026@batch+classic_arch": ["--recipe", "jan2026", "--arch", "classic"],  # its schedule and LRs, exportable architecture
    "jan2026@batch-lr_scaling": ["--recipe", "jan2026", "--no-lr-batch-scaling"],  # its d12 LRs as they are at any batch
}
# FLOPs per run at each depth: about 2-4 minutes each on a 2-core CPU
DEFAULT_FLOPS = {2: 5e12, 4: 2e13, 6: 4e13, 8: 6e13}
MAX_SEQ_LEN = 512
TOTAL_BATCH_SIZE = 8192  # the tiny preset's, today's CPU recipe (Power Lines variants choose their own)
DEVICE_BATCH_SIZE = 8
EVAL_TOKENS = 65536


def device_batch_size(total_batch_size):
    """Rows per forward pass for `total_batch_size` tokens per step: DEVICE_BATCH_SIZE, fewer for a small step."""
    return min(DEVICE_BATCH_SIZE, total_batch_size // MAX_SEQ_LEN)


def parse_base_train(output, tokens_per_step=None):
    """{val_bpb, steps, tok_s, losses, train_s} from base_train's stdout. tok_s: median over the
    steps after the first two (compilation, allocator warm-up) of tokens per step / dt; train_s:
    the sum of every step's dt, seconds. Raises ValueError when the output has no final val bpb."""
    bpbs = re.findall(r"^step (\d+) \| val bpb ([\d.]+)", output, re.M)
    if not bpbs:
        raise ValueError("no 'val bpb' line in the output")
    steps = re.findall(r"^step (\d+)/(\d+) .*\| loss ([\d.]+) .*\| dt (\d+)ms \| tok/s ([\d,]+)", output, re.M)
    rates = [int(r[4].replace(",", "")) for r in steps[2:]] or [int(r[4].replace(",", "")) for r in steps]
    return dict(val_bpb=float(bpbs[-1][1]), steps=int(bpbs[-1][0]), tok_s=statistics.median(rates) if rates else None,
                losses=[float(r[2]) for r in steps], train_s=sum(int(r[3]) for r in steps) / 1000)


def evaluate_bestfit_bpb(base_dir, eval_tokens):
    """Bits per byte of the last base checkpoint in base_dir on best-fit packed validation rows
    (MAX_SEQ_LEN tokens, DEVICE_BATCH_SIZE rows per pass, pool 1000 as upstream's buffer)."""
    import torch
    from nanochat.checkpoint_manager import load_model
    from nanochat.dataloader import bos_bestfit_data_loader, without_state
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes
    previous = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = base_dir
    try:
        model, tokenizer, _ = load_model("base", torch.device("cpu"), phase="eval")
        batches = without_state(bos_bestfit_data_loader(DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "val", device="cpu",
                                                        tokenizer=tokenizer, rank=0, world_size=1))
        return evaluate_bpb(model, batches, eval_tokens // (DEVICE_BATCH_SIZE * MAX_SEQ_LEN), get_token_bytes("cpu"))
    finally:
        os.environ["NANOCHAT_BASE_DIR"] = previous or ""
        if previous is None:
            del os.environ["NANOCHAT_BASE_DIR"]


def run_variant(python, base_dir, depth, horizon, variant_flags, seed, timeout_s, total_batch_size=TOTAL_BATCH_SIZE,
                bestfit_eval=True, compile=False):
    """One base_train run in a scratch base dir that links base_dir's data and tokenizer. horizon:
    base_train's horizon flags, e.g. ["--target-flops", "2e13"] or ["--num-iterations", "2000"].
    compile: torch.compile the model (default: eager). Returns parse_base_train's dict plus wall_s,
    total_batch_size and bestfit_val_bpb (None without bestfit_eval). Raises RuntimeError with the output's tail on failure."""
    with tempfile.TemporaryDirectory(prefix="recipe_") as scratch:
        for name in ("base_data", "tokenizer"):
            os.symlink(os.path.join(base_dir, name), os.path.join(scratch, name))
        cmd = [python, "-m", "scripts.base_train", "--preset", "tiny", "--depth", str(depth),
               "--max-seq-len", str(MAX_SEQ_LEN), "--target-flops", "-1", "--num-iterations", "-1", *horizon,
               "--eval-every", "-1", "--eval-tokens", str(EVAL_TOKENS), "--core-metric-every", "-1",
               "--sample-every", "-1", "--save-every", "-1", "--keep-checkpoints", "1", "--seed", str(seed),
               "--model-tag", "bench", "--compile" if compile else "--no-compile"]
        if "--total-batch-size" not in variant_flags:  # a fixed batch; Power Lines variants choose their own
            cmd += ["--total-batch-size", str(total_batch_size),
                    "--device-batch-size", str(device_batch_size(total_batch_size))]
        t0 = time.time()
        proc = subprocess.run(cmd + variant_flags, env={**os.environ, "NANOCHAT_BASE_DIR": scratch},
                              capture_output=True, text=True, timeout=timeout_s,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if proc.returncode != 0:
            raise RuntimeError(f"base_train failed ({' '.join(variant_flags)}):\n" + (proc.stdout + proc.stderr)[-3000:])
        result = parse_base_train(proc.stdout)
        batch = re.search(r"^batch: ([\d,]+) tokens per step", proc.stdout, re.M)
        result.update(wall_s=time.time() - t0, total_batch_size=int(batch.group(1).replace(",", "")))
        result["bestfit_val_bpb"] = evaluate_bestfit_bpb(scratch, EVAL_TOKENS) if bestfit_eval else None
        return result


def run_upstream(upstream_dir, python, base_dir, depth, horizon, timeout_s, total_batch_size=TOTAL_BATCH_SIZE):
    """Upstream HEAD's base_train with its own recipe at our batch (bench/upstream.py), as a row of
    this table: its val rows are best-fit packed, so its number goes in the best-fit column.
    Raises what run_upstream_base_train raises (FileNotFoundError, RuntimeError)."""
    from bench.upstream import run_upstream_base_train
    flag, value = horizon
    r = run_upstream_base_train(upstream_dir, base_dir, python=python, depth=depth, max_seq_len=MAX_SEQ_LEN,
                                device_batch_size=device_batch_size(total_batch_size),
                                total_batch_size=total_batch_size,
                                num_iterations=int(value) if flag == "--num-iterations" else -1,
                                eval_tokens=EVAL_TOKENS, eval_every=10**9,  # step 0 and the last
                                extra_args=(f"--target-flops={value}",) if flag == "--target-flops" else (),
                                timeout_s=timeout_s)
    return dict(val_bpb=None, bestfit_val_bpb=r["val_bpb"], steps=r["num_steps"], tok_s=r["tok_s"], losses=r["losses"],
                wall_s=r["wall_s"], train_s=sum(r["step_s"]), total_batch_size=total_batch_size)


def summarize(rows, baseline="nov2025"):
    """Markdown table: per depth and variant, mean final val bpb, spread over seeds, delta vs the
    baseline's mean, best-fit val bpb (mean), tok/s (median over seeds), steps, batch, and the
    training seconds (median; the wall clock without start-up and final evaluation)."""
    lines = ["| depth | variant | seeds | val bpb (mean) | spread | vs nov2025 | best-fit val bpb | tok/s | steps | batch "
             "| train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for depth in sorted({r["depth"] for r in rows}):
        at_depth = [r for r in rows if r["depth"] == depth]
        base = [r["val_bpb"] for r in at_depth if r["variant"] == baseline and r["val_bpb"] is not None]
        base_mean = statistics.mean(base) if base else None
        for variant in dict.fromkeys(r["variant"] for r in at_depth):
            rs = [r for r in at_depth if r["variant"] == variant]
            bpb = [r["val_bpb"] for r in rs if r["val_bpb"] is not None]
            mean = f"{statistics.mean(bpb):.4f}" if bpb else "n/a"
            spread = f"{max(bpb) - min(bpb):.4f}" if len(bpb) > 1 else ""
            delta = f"{statistics.mean(bpb) - base_mean:+.4f}" if bpb and base_mean and variant != baseline else ""
            bestfit = statistics.mean(r["bestfit_val_bpb"] for r in rs)
            tok_s = statistics.median(r["tok_s"] for r in rs if r["tok_s"]) if any(r["tok_s"] for r in rs) else 0
            train_s = [r["train_s"] for r in rs if r.get("train_s")]
            lines.append(f"| d{depth} | {variant} | {len(rs)} | {mean} | {spread} | {delta} | {bestfit:.4f} | "
                         f"{tok_s:,.0f} | {rs[0]['steps']} | {rs[0]['total_batch_size']:,} | "
                         f"{statistics.median(train_s) if train_s else 0:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Pretraining recipes at equal FLOPs: val bpb and tok/s")
    parser.add_argument("--depths", default="4,6,8")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="1,2", help="init seeds; each variant runs once per seed")
    horizon = parser.add_mutually_exclusive_group()
    horizon.add_argument("--flops", type=float, default=None, help="training FLOPs per run (default: per depth)")
    horizon.add_argument("--steps", type=int, default=None, help="optimizer steps per run instead (a long horizon)")
    horizon.add_argument("--minutes", type=float, default=None,
                         help="equal wall clock instead: each variant runs the steps that fit this many minutes of "
                              "training at its speed, measured by a short run of it first")
    parser.add_argument("--batch", type=int, default=TOTAL_BATCH_SIZE, help="tokens per step of the fixed-batch rows")
    parser.add_argument("--compile", action="store_true", help="compile our runs too (upstream's always compile)")
    parser.add_argument("--base-dir", default=os.environ.get("NANOCHAT_BASE_DIR"), help="with base_data/ and tokenizer/")
    parser.add_argument("--upstream", default=None, help="a checkout of upstream nanochat: adds its row")
    parser.add_argument("--upstream-python", default=sys.executable, help="the interpreter of upstream's environment")
    parser.add_argument("--out", default=None, help="JSON of every run, rewritten after each")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    args = parser.parse_args()
    if not args.base_dir or not os.path.isdir(os.path.join(args.base_dir, "tokenizer")):
        sys.exit("bench.recipe: set NANOCHAT_BASE_DIR (or --base-dir) to a base dir with base_data/ and a trained "
                 "tokenizer/, e.g. after `bash speedrun_dgx.sh --tiny --only tokenizer`")
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"bench.recipe: unknown variant {v!r}; pick from {', '.join(VARIANTS)}")
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        jobs = [(v, seed) for v in variants for seed in [int(s) for s in args.seeds.split(",")]]
        if args.upstream:
            jobs.append(("upstream HEAD", None))
        speeds = {}  # --minutes: variant -> (seconds per step, seconds of compilation and warm-up)
        for variant, seed in jobs:
            def run(horizon, bestfit_eval=True):
                if variant == "upstream HEAD":
                    return run_upstream(args.upstream, args.upstream_python, args.base_dir, depth, horizon, args.timeout,
                                        args.batch)
                return run_variant(sys.executable, args.base_dir, depth, horizon, VARIANTS[variant], seed or 1,
                                   args.timeout, args.batch, bestfit_eval, args.compile)
            if args.minutes:
                if variant not in speeds:  # 10 steps: the median step, and what the first (compiling) ones cost on top
                    # compiled, twice: the first probe pays a cold compile (about 40 s at d4) and fills
                    # inductor's cache, the second pays what the timed run will, a warm one
                    for _ in range(2 if args.compile or variant == "upstream HEAD" else 1):
                        probe = run(["--num-iterations", "10"], bestfit_eval=False)
                    step_s = probe["total_batch_size"] / probe["tok_s"]
                    speeds[variant] = step_s, max(0.0, probe["train_s"] - 10 * step_s)
                step_s, overhead_s = speeds[variant]
                horizon = ["--num-iterations", str(max(1, round((args.minutes * 60 - overhead_s) / step_s)))]
            elif args.steps:
                horizon = ["--num-iterations", str(args.steps)]
            else:
                horizon = ["--target-flops", f"{args.flops or DEFAULT_FLOPS[depth]:g}"]
            result = run(horizon)
            rows.append(dict(depth=depth, variant=variant, seed=seed, horizon=horizon, **result))
            print(f"d{depth} {variant:16s} seed {seed} | val bpb {result['val_bpb'] or float('nan'):.4f} | best-fit "
                  f"{result['bestfit_val_bpb']:.4f} | steps {result['steps']} | tok/s {result['tok_s'] or 0:,.0f} | "
                  f"train {result['train_s'] or 0:.0f} s | {result['wall_s']:.0f} s", flush=True)
            if args.out:
                with open(args.out + ".tmp", "w") as f:
                    json.dump(rows, f, indent=1)
                os.replace(args.out + ".tmp", args.out)
    print(summarize(rows))
