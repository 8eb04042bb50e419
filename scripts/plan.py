"""
The plan of a run, from nanochat.run_shape (the same function base_train sizes itself with):
model size, batch, steps, tokens, FLOPs, memory and an estimated pretraining time. Runs in
seconds. speedrun_dgx.sh and the stage scripts call it twice: with --shell for their variables
(the shell layer computes nothing itself), and without to print the plan.

    python -m scripts.plan --depth 20
    python -m scripts.plan --preset tiny --depth 8 -- --num-iterations 5
    python -m scripts.plan --preset tiny --shell          # bash assignments: depth=4 ... base_args=(...)

Arguments after `--` are the extra arguments the user passes to every stage; base_train's shape
flags among them (--num-iterations, --max-seq-len, --total-batch-size, ...) change the plan
exactly as they change base_train.

The time is an estimate, labelled as one: on a GPU, peak bf16 FLOP/s x an assumed 40% MFU
(upstream nanochat measures ~40-50% on H100); on a CPU, a measured fp32 matmul rate x an
assumed 40% (a d4 model reaches ~40% of it on a 2-core CPU). Each stage prints its measured
speed and ETA once it runs.
"""

import argparse
import shlex
import sys

import torch

from nanochat.common import ArgumentParser, autodetect_device_type, format_duration, get_peak_flops, hub_reachable
from nanochat.run_shape import (GPU_DEFAULTS, PRESETS, SHAPE_FLAG_TYPES, RunShapeError, cpu_matmul_flops,
                                estimate_seconds, format_memory_candidates, run_shape, shape_flags)
from nanochat.tokenizer import get_tokenizer
from nanochat.training import RECIPES

parser = ArgumentParser(description="Print the plan of a run (or, with --shell, its shape as bash variables)")
parser.add_argument("--preset", default="gpu", choices=list(PRESETS))
parser.add_argument("--depth", type=int, default=None, help="default: the preset's")
parser.add_argument("--recipe", default=None, choices=list(RECIPES), help="default: the preset's")
parser.add_argument("--device-batch-size", type=int, default=None, help="default: the preset's, or what fits the GPU")
parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs)")
parser.add_argument("--data", default="auto", choices=["auto", "online", "offline"])
parser.add_argument("--shell", action="store_true", help="print bash variable assignments instead of the plan")
parser.add_argument("extra_args", nargs=argparse.REMAINDER, help="-- the extra arguments of every stage")
args = parser.parse_args()

# base_train's shape flags among the extra arguments: run_shape's flags (the vocabulary comes from
# the tokenizer, not a flag), parsed as base_train parses them
shape_parser = ArgumentParser(add_help=False)
for name in GPU_DEFAULTS:
    if name != "vocab_size":
        shape_parser.add_argument(f"--{name.replace('_', '-')}", type=SHAPE_FLAG_TYPES[name], default=None)
extra_args = args.extra_args[1:] if args.extra_args[:1] == ["--"] else args.extra_args
shape_parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)  # activation memory
extra, _ = shape_parser.parse_known_args(extra_args)
flags = {k: v for k, v in shape_flags(extra).items() if v is not None}
flags.setdefault("depth", args.depth)
flags.setdefault("recipe", args.recipe)
flags.setdefault("device_batch_size", args.device_batch_size)
# the model is sized with the trained tokenizer's vocabulary once there is one, as base_train sizes it
try:
    flags["vocab_size"] = get_tokenizer().get_vocab_size()
except FileNotFoundError:
    pass

device_type = autodetect_device_type()
data = args.data
preset_data = PRESETS[args.preset]["data"]
if preset_data and data not in ("auto", preset_data):
    sys.exit(f"plan: --{args.preset} builds its data on this machine; it cannot run with --data {data} "
             f"(drop --{args.preset} for a {data} run)")
try:
    shape = run_shape(args.preset, device_type, world_size=args.nproc, compile=extra.compile, **flags)
except RunShapeError as e:
    sys.exit(f"plan: {e}")
if data == "auto":
    data = preset_data or ("online" if hub_reachable() else "offline")
    if data == "offline" and not preset_data:  # a real run without the Hub: say so loudly, once
        print("*** huggingface.co is unreachable: using the OFFLINE data (the Debian-package corpus, chat tasks "
              "generated here), far smaller than FineWeb-EDU; pass --data online to insist on the Hub ***",
              file=sys.stderr)

if args.shell:
    def assign(name, value):
        if isinstance(value, list):
            print(f"{name}=({' '.join(shlex.quote(v) for v in value)})")
        else:
            print(f"{name}={shlex.quote(str(value))}")
    # base_train gets the preset and the resolved device batch; it resolves the rest with run_shape itself
    # (--recipe only when given: without it a resumed run keeps the recipe it started with)
    base_args = ["--preset", args.preset, *(["--recipe", args.recipe] if args.recipe else []), "--depth", str(shape.depth),
                 "--device-batch-size", str(shape.device_batch_size)]
    for name, value in [("depth", shape.depth), ("model_tag", shape.model_tag), ("seq_len", shape.max_seq_len),
                        ("vocab_size", PRESETS[args.preset]["base"]["vocab_size"]),  # what tok_train trains
                        ("device_batch_size", shape.device_batch_size),
                        ("total_batch_size", shape.total_batch_size), ("data", data), ("base_args", base_args),
                        *[(f"{stage}_args", shape.stage_args[stage]) for stage in shape.stage_args]]:
        assign(name, value)
    sys.exit(0)

# Achievable FLOP/s on this machine (estimate)
if device_type == "cuda":
    name = torch.cuda.get_device_name()
    peak = get_peak_flops(name)
    seconds = estimate_seconds(shape.training_flops, peak * args.nproc if peak else None)
    basis = f"{name}: peak x 40% MFU (assumed)" if peak else f"{name}: peak FLOP/s unknown, no estimate"
else:
    rate = cpu_matmul_flops()
    seconds = estimate_seconds(shape.training_flops, rate)
    basis = f"CPU: measured fp32 matmul {rate / 1e9:.0f} GFLOP/s x 40% (assumed)"

print(f"plan | model {shape.model_tag} ({shape.arch} architecture, recipe {shape.recipe}): {shape.num_params:,} parameters, "
      f"{shape.flops_per_token:.3e} FLOPs per token, "
      f"vocab {shape.vocab_size:,}, context {shape.max_seq_len}")
print(f"plan | batch: {shape.total_batch_size:,} tokens per step = {shape.device_batch_size} x {shape.max_seq_len} x "
      f"{shape.world_size} processes x {shape.grad_accum_steps} accumulation steps")
print(f"plan | pretraining ({shape.horizon}): {shape.num_iterations:,} steps x {shape.total_batch_size:,} tokens = "
      f"{shape.tokens:,} tokens ({shape.tokens / shape.ratio_params:.2f} per {'matmul ' if shape.ratio_params != shape.num_params else ''}"
      f"parameter), {shape.training_flops:.3e} FLOPs")
print(f"plan | memory: {shape.state_bytes / 2**30:.2f} GiB for weights, gradients and optimizer state; "
      + format_memory_candidates(shape.memory_candidates(), shape.device_batch_size, shape.memory_budget))
eta = format_duration(seconds) if seconds else "n/a"
print(f"plan | estimated pretraining time: {eta} ({basis}); midtraining, SFT and RL are "
      f"{'a few minutes each' if args.preset != 'gpu' else 'a few percent of it each'}; "
      "every stage prints its measured speed and ETA as it runs")
