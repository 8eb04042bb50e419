"""
Training throughput of one optimizer step (forward + backward + Muon/AdamW) at a given depth,
batch and sequence length: tok/s, MFU and peak memory. Synthetic tokens, so only the model and
the optimizers are measured, not the data loader.

Baseline, measured in the same run: the eager model (no torch.compile) in the default dtype
(bf16 autocast on CUDA sm80+, fp32 on CPU); every other mode is printed as a ratio against it:
"compile" (torch.compile), "bf16" (bf16 autocast forced, e.g. on a CPU with AMX).

    python -m bench.train_throughput --depth 4 --device-batch-size 8 --max-seq-len 512 --steps 10
    python -m bench.train_throughput --depth 20 --device-batch-size 32 --modes eager,compile   # on a GPU
"""

import resource
import time
from contextlib import nullcontext

import torch

from nanochat.common import ArgumentParser, autodetect_device_type, autodetect_dtype, get_peak_flops
from nanochat.gpt import GPT, GPTConfig
from nanochat.training import get_muon_momentum, set_lr_and_momentum

parser = ArgumentParser(description="Training step throughput: tok/s, MFU, peak memory")
parser.add_argument("--depth", type=int, default=4)
parser.add_argument("--device-batch-size", type=int, default=8)
parser.add_argument("--max-seq-len", type=int, default=512)
parser.add_argument("--vocab-size", type=int, default=65536)
parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (compilation, allocator)")
parser.add_argument("--modes", default=None,
                    help="comma list of eager,compile,bf16 (default: eager,compile on CUDA, eager,bf16 on CPU)")
parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"])
args = parser.parse_args()

device_type = args.device_type or autodetect_device_type()
device = torch.device(device_type)
dtype = autodetect_dtype(device_type)
autocast_ctx = torch.amp.autocast(device_type=device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
device_name = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
peak_flops = get_peak_flops(device_name) if device_type == "cuda" else None
modes = (args.modes or ("eager,compile" if device_type == "cuda" else "eager,bf16")).split(",")


def measure(mode):
    """Return (tok/s, seconds per step, peak memory in GiB or None) for one mode."""
    torch.manual_seed(0)
    config = GPTConfig.from_depth(args.depth, vocab_size=args.vocab_size, sequence_len=args.max_seq_len)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    optimizers = model.setup_optimizers()
    step_model = torch.compile(model, dynamic=False) if mode == "compile" else model
    ctx = torch.amp.autocast(device_type=device_type, dtype=torch.bfloat16) if mode == "bf16" else autocast_ctx
    B, T = args.device_batch_size, args.max_seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=device)
    y = torch.randint(0, args.vocab_size, (B, T), device=device)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup_steps + args.steps):
        synchronize()
        t0 = time.perf_counter()
        with ctx:
            loss = step_model(x, y)
        loss.backward()
        set_lr_and_momentum(optimizers, 1.0, get_muon_momentum(step))
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        synchronize()
        if step >= args.warmup_steps:
            times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]  # median: robust to a stray slow step
    if device_type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, process-wide high-water mark
    return B * T / dt, dt, peak_mem, model.estimate_flops(), model.num_scaling_params()


print(f"device: {device_name} | dtype: {dtype} | depth {args.depth} | batch {args.device_batch_size} x "
      f"{args.max_seq_len} tokens | vocab {args.vocab_size} | torch {torch.__version__}")
results = {}
for mode in modes:
    tok_s, dt, peak_mem, flops_per_token, num_params = measure(mode)
    mfu = f"{100 * flops_per_token * tok_s / peak_flops:.1f}%" if peak_flops else "n/a"
    results[mode] = tok_s
    ratio = f"{tok_s / results[modes[0]]:.2f}x vs {modes[0]}"
    print(f"{mode:8s} | params {num_params:,} | {tok_s:,.0f} tok/s | {dt * 1000:.1f} ms/step | MFU {mfu} | "
          f"peak memory {peak_mem:.2f} GiB{' (process RSS)' if device_type != 'cuda' else ''} | {ratio}")
