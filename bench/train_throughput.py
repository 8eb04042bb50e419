"""
Training throughput of one optimizer step (forward + backward + Muon/AdamW) at a given depth,
batch and sequence length: tok/s, MFU, peak memory and compile time. Synthetic tokens, so only
the model and the optimizers are measured, not the data loader.

Baseline, measured in the same run: the eager model (no torch.compile) in the default dtype
(bf16 autocast on CUDA sm80+, fp32 on CPU); every other mode is printed as a ratio against it:
"compile" (torch.compile), "bf16" (bf16 autocast forced, e.g. on a CPU with AMX), "fp8"
(compile + torchao float8 on the block matrices, CUDA sm_89+), "muon_bf16" (eager, with Muon's
orthogonalisation forced to bf16 as before Dec 2026: on a CPU without AMX that was most of a step;
run it under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 to see such a CPU on an AMX one). dev/device_check.py calls
measure_train_step for its GPU table.

    python -m bench.train_throughput --depth 4 --device-batch-size 8 --max-seq-len 512 --steps 10
    python -m bench.train_throughput --depth 20 --device-batch-size 32 --modes eager,compile   # on a GPU
"""

import argparse
import resource
import time
from contextlib import nullcontext
from unittest import mock

import torch

import nanochat.muon

from nanochat.common import autodetect_dtype, get_peak_flops
from nanochat.gpt import GPT, GPTConfig
from nanochat.training import get_muon_momentum, set_lr_and_momentum


def measure_train_step(depth, batch_size, max_seq_len, vocab_size, mode, steps=5, warmup_steps=2, device_type="cpu"):
    """Time `steps` training steps after `warmup_steps` untimed ones (compilation, allocator).

    mode: "eager", "compile", "bf16", "fp8" or "muon_bf16" (see the module docstring). Returns a dict: tok_s
    (tokens per second, median step), step_s (seconds), first_step_s (the first warm-up step,
    which includes compilation), peak_allocated / peak_reserved (bytes, CUDA; None elsewhere),
    peak_rss (bytes, the process's high-water mark, off CUDA), flops_per_token, num_params,
    losses (the timed steps', floats).

    Raises:
        torch.OutOfMemoryError: the shape does not fit the GPU.
        ValueError: "fp8" where nanochat.fp8 refuses it.
    """
    device = torch.device(device_type)
    torch.manual_seed(0)
    config = GPTConfig.from_depth(depth, vocab_size=vocab_size, sequence_len=max_seq_len)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if mode == "fp8":
        from nanochat.fp8 import convert_blocks_to_fp8, fp8_unsupported_reason
        reason = fp8_unsupported_reason(device)
        if reason:
            raise ValueError(reason)
        convert_blocks_to_fp8(model)
    optimizers = model.setup_optimizers()
    muon_dtype = (mock.patch.object(nanochat.muon, "orthogonalization_dtype", lambda device: torch.bfloat16)
                  if mode == "muon_bf16" else nullcontext())
    step_model = torch.compile(model, dynamic=False) if mode in ("compile", "fp8") else model
    dtype = torch.bfloat16 if mode == "bf16" else autodetect_dtype(device_type)
    ctx = torch.amp.autocast(device_type=device_type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (batch_size, max_seq_len), generator=generator).to(device)
    y = torch.randint(0, vocab_size, (batch_size, max_seq_len), generator=generator).to(device)
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    with muon_dtype:
        for step in range(warmup_steps + steps):
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
            times.append(time.perf_counter() - t0)
            if step >= warmup_steps:
                losses.append(loss.item())
    step_s = sorted(times[warmup_steps:])[steps // 2]  # median: robust to a stray slow step
    cuda = device_type == "cuda"
    return dict(tok_s=batch_size * max_seq_len / step_s, step_s=step_s, first_step_s=times[0],
                peak_allocated=torch.cuda.max_memory_allocated() if cuda else None,
                peak_reserved=torch.cuda.max_memory_reserved() if cuda else None,
                peak_rss=None if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                flops_per_token=model.estimate_flops(), num_params=model.num_scaling_params(), losses=losses)


if __name__ == "__main__":
    from nanochat.common import autodetect_device_type
    parser = argparse.ArgumentParser(description="Training step throughput: tok/s, MFU, peak memory")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--device-batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--modes", default=None,
                        help="comma list of eager,compile,bf16,fp8,muon_bf16 (default: eager,compile on CUDA, "
                             "eager,bf16 on CPU)")
    parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"])
    args = parser.parse_args()
    device_type = args.device_type or autodetect_device_type()
    device_name = torch.cuda.get_device_name() if device_type == "cuda" else "cpu"
    peak_flops = get_peak_flops(device_name) if device_type == "cuda" else None
    modes = (args.modes or ("eager,compile" if device_type == "cuda" else "eager,bf16")).split(",")
    print(f"device: {device_name} | depth {args.depth} | batch {args.device_batch_size} x {args.max_seq_len} tokens | "
          f"vocab {args.vocab_size} | torch {torch.__version__}")
    baseline = None
    for mode in modes:
        r = measure_train_step(args.depth, args.device_batch_size, args.max_seq_len, args.vocab_size, mode,
                               args.steps, args.warmup_steps, device_type)
        baseline = baseline or r["tok_s"]
        mfu = f"{100 * r['flops_per_token'] * r['tok_s'] / peak_flops:.1f}%" if peak_flops else "n/a"
        peak = r["peak_allocated"] if device_type == "cuda" else r["peak_rss"]
        print(f"{mode:8s} | params {r['num_params']:,} | {r['tok_s']:,.0f} tok/s | {r['step_s'] * 1000:.1f} ms/step | "
              f"MFU {mfu} | peak memory {peak / 2**30:.2f} GiB{' (process RSS)' if device_type != 'cuda' else ''} | "
              f"first step {r['first_step_s']:.1f} s | {r['tok_s'] / baseline:.2f}x vs {modes[0]}")
