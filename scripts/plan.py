"""
Print the plan of a speedrun before it starts: model size, tokens, FLOPs and an estimated
wall time for pretraining on this machine. Called by speedrun_dgx.sh; runs in seconds.

    python -m scripts.plan --depth 20
    python -m scripts.plan --depth 4 --max-seq-len 512 --vocab-size 8192 --total-batch-size 8192 -- --num-iterations 24

The time is an estimate, labelled as one: on a GPU, peak bf16 FLOP/s x an assumed 40% MFU
(upstream nanochat measures ~40-50% on H100); on a CPU, a measured fp32 matmul rate x an
assumed 40% (measured: a d4 model reaches ~40% of it on a 2-core CPU). Each stage prints its measured
speed and ETA once it runs.
"""

import argparse
import time

import torch

from nanochat.common import ArgumentParser, get_peak_flops
from nanochat.gpt import GPT, GPTConfig
from nanochat.training import format_duration

parser = ArgumentParser(description="Print the speedrun plan with estimated times")
parser.add_argument("--depth", type=int, default=20)
parser.add_argument("--max-seq-len", type=int, default=2048)
parser.add_argument("--vocab-size", type=int, default=65536)
parser.add_argument("--total-batch-size", type=int, default=524288)
parser.add_argument("--nproc", type=int, default=1)
parser.add_argument("--preset", default="gpu")
parser.add_argument("base_args", nargs=argparse.REMAINDER, help="-- the base_train arguments of the preset")
args = parser.parse_args()

# Model size and pretraining horizon (the same formulas as base_train)
with torch.device("meta"):
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.max_seq_len))
num_params = model.num_scaling_params()
flops_per_token = model.estimate_flops()
base_args = [a for a in args.base_args if a != "--"]
if "--num-iterations" in base_args:
    steps = int(base_args[base_args.index("--num-iterations") + 1])
else:
    steps = int(20 * num_params) // args.total_batch_size
tokens = steps * args.total_batch_size
flops = flops_per_token * tokens

# Achievable FLOP/s on this machine (estimate)
if torch.cuda.is_available():
    name = torch.cuda.get_device_name()
    peak = get_peak_flops(name)
    rate = peak * 0.40 * args.nproc if peak else None
    basis = f"{name}: peak x 40% MFU (assumed)" if peak else f"{name}: peak FLOP/s unknown, no estimate"
else:
    a = torch.randn(1024, 1024)
    a @ a  # warm up
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    matmul_rate = 10 * 2 * 1024 ** 3 / (time.perf_counter() - t0)
    rate = matmul_rate * 0.40
    basis = f"CPU: measured fp32 matmul {matmul_rate / 1e9:.0f} GFLOP/s x 40% (assumed)"

print(f"plan | model d{args.depth}: {num_params:,} parameters, {flops_per_token:.3e} FLOPs per token")
print(f"plan | pretraining: {steps:,} steps x {args.total_batch_size:,} tokens = {tokens:,} tokens "
      f"({tokens / num_params:.2f} per parameter), {flops:.3e} FLOPs")
eta = format_duration(flops / rate) if rate else "n/a"
print(f"plan | estimated pretraining time: {eta} ({basis}); midtraining, SFT and RL are "
      f"{'a few minutes each' if args.preset != 'gpu' else 'a few percent of it each'}; "
      "every stage prints its measured speed and ETA as it runs")
