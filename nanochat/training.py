"""
What every training loop (base, mid, SFT, RL) shares: the stage setup (device, dtype,
autocast, peak FLOPs, wandb run, report, checkpoint dir, model tag) and the torch.compile
policy, the LR schedule and Muon momentum ramp, when to checkpoint, the loss log (smoothing,
non-finite stop), the progress meter (unit, MFU, ETA), the prefetching batch loader and the
optimizer step. The evaluation scripts use the compute part of the setup (init_compute).

Not for: the training loops themselves (each stage's script owns its recipe), checkpoint files
and resume (checkpoint_manager.py), or a stage's wall time and energy (energy.StageClock).
"""

import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import get_checkpoint_dir
from nanochat.common import (DiskFullError, RankMismatchError, autodetect_dtype, check_ranks_agree, compute_init,
                             dist_timeout_s, format_duration, get_peak_flops, init_wandb, print0)
from nanochat.report import get_report

# stage -> wandb project of its runs
WANDB_PROJECTS = {"base": "nanochat", "mid": "nanochat-mid", "sft": "nanochat-sft", "rl": "nanochat-rl"}


# -----------------------------------------------------------------------------
# Stage setup

@dataclass
class Compute:
    """Where and how this process computes (what init_compute returns).

    peak_flops: bf16 peak FLOP/s of all processes together (for MFU), None when unknown
    (CPU, MPS, or a GPU missing from common.GPU_PEAK_FLOPS_BF16). autocast_ctx: a reusable
    context for the forward passes (bf16 autocast, or nothing in fp32). synchronize(): waits
    for the device's queued work (a no-op off CUDA), for honest step timings.
    """
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype
    autocast_ctx: Any
    synchronize: Callable[[], None]
    peak_flops: Optional[float]

    @property
    def master_process(self):
        return self.rank == 0


# What a collective's error says when another rank went away (gloo: the socket; NCCL: its
# watchdog's timeout or a remote error) or stopped answering (the timeout); other errors that
# mention gloo or NCCL (a local CUDA error, a bug) keep their traceback
LOST_PEER_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Connection refused",
                     "Timed out waiting", "timed out", "remote process exited", "network error",
                     "Application timeout")  # gloo, when the timeout ends a pair mid-transfer


def _lost_peer(exc):
    """Whether `exc` is a collective that failed because another rank of the run went away or
    stopped answering (gloo raises plain RuntimeErrors, NCCL DistBackendErrors)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(exc, (RuntimeError, dist.DistError)) and any(marker in str(exc) for marker in LOST_PEER_MARKERS)


def _exit_with_message(excepthook):
    """An excepthook that ends the stage with a message instead of a traceback for what the user
    must fix and no traceback explains: a full disk (DiskFullError, wherever it was raised: a
    checkpoint, the report, a log), ranks with different inputs (RankMismatchError), a rank that
    lost the other processes of a distributed run. Others go to `excepthook`."""
    script = os.path.splitext(os.path.basename(sys.argv[0]))[0]  # base_train, as the other error messages say

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, (DiskFullError, RankMismatchError)):
            print(f"{script}: {exc}", file=sys.stderr, flush=True)
            return
        if _lost_peer(exc):
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc_type.__name__
            print(f"{script}: rank {dist.get_rank()} lost contact with the other processes of this run ({first_line}). "
                  "Another process or node died, was killed or stopped answering (its own log says why; one that "
                  f"hangs is given up on after {dist_timeout_s():g} s, NANOCHAT_DIST_TIMEOUT). Start the same command "
                  "again on every node: the stage resumes from its last checkpoint", file=sys.stderr, flush=True)
            return
        excepthook(exc_type, exc, tb)
    hook.exits_with_message = True
    return hook


def init_compute(device_type=None):
    """Initialise the process (common.compute_init: seeds, torchrun) and pick the precision; a
    full disk, ranks with different inputs or a lost rank end the process from here on with a
    message, not a traceback (exit status 1).

    Returns a Compute. Raises ValueError for an unknown or unavailable device_type.
    """
    if not getattr(sys.excepthook, "exits_with_message", False):
        sys.excepthook = _exit_with_message(sys.excepthook)
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    dtype = autodetect_dtype(device.type)
    autocast_ctx = torch.amp.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peak = get_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return Compute(ddp, rank, local_rank, world_size, device, dtype, autocast_ctx, synchronize,
                   peak * world_size if peak else None)


def check_chat_inputs_agree(tokenizer, datasets, source_meta):
    """Stop a chat stage (mid, SFT, RL) under torch.distributed whose ranks have another tokenizer,
    other task data (say two nodes that built their offline data from other package versions) or
    started from another checkpoint (each node loads the last one on its own disk).

    datasets: {name: indexable of conversation dicts}; each is fingerprinted by its length and
    a hash of 64 conversations spread over it. source_meta: the meta of the model the stage
    starts from (load_model's). A collective; nothing happens in one process.

    Raises:
        RankMismatchError: what differs, on which ranks and hosts, and how to fix it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    fingerprints = {"tokenizer": tokenizer.content_hash(),
                    "start checkpoint": f"{source_meta.get('model_tag')} step {source_meta.get('step')}"}
    for name, dataset in datasets.items():
        picks = sorted({i * len(dataset) // 64 for i in range(64)}) if len(dataset) else []
        blob = json.dumps([len(dataset)] + [dataset[i] for i in picks], sort_keys=True, default=str)
        fingerprints[name] = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
    check_ranks_agree(fingerprints, "Give every node the same $NANOCHAT_BASE_DIR/tokenizer and task data (the same "
                                    "--data; offline: copy the first node's base dir to the others), then start again")


CPU_COMPILE_MIN_STEPS = 100  # on a CPU, compile only runs this long: compiling costs ~30-60 s on 2 cores


def should_compile(flag, device_type, num_iterations=None):
    """The torch.compile policy of every training stage: --compile / --no-compile when given
    (flag True/False); else on for CUDA, and on a CPU for runs of at least CPU_COMPILE_MIN_STEPS
    optimizer steps when a C++ compiler is installed (inductor builds C++ kernels there); off
    on MPS and for short or unknown CPU runs (num_iterations None: mid, SFT, RL).

    Measured on a 2-core CPU (bench/RESULTS.md): base_train d4, 8 x 512 tokens, 3,650 tok/s
    compiled vs 2,400 eager (1.5x), after a one-off compile of ~30 s (seconds with inductor's
    cache warm). NANOCHAT_COMPILE=0 in the environment turns the default off: setup.sh writes it
    to .nanochat_env when torch.compile cannot build a kernel on this GPU (dev/check_accelerator.py).
    """
    if flag is not None:
        return flag
    if os.environ.get("NANOCHAT_COMPILE", "1") == "0":
        return False
    if device_type == "cuda":
        return True
    if device_type == "cpu" and num_iterations is not None and num_iterations >= CPU_COMPILE_MIN_STEPS:
        return any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "g++"), "c++", "clang++"))
    return False


@dataclass
class Stage(Compute):
    """A training stage's setup (what setup_stage returns): its Compute plus the stage name
    ("base", "mid", "sft", "rl"), whether to torch.compile, the wandb run, the report and
    the model tag its checkpoints go under.

    The chat stages learn their tag from the checkpoint they start from: set
    stage.model_tag = meta["model_tag"] after checkpoint_manager.load_model.
    """
    name: str
    use_compile: bool
    wandb_run: Any
    report: Any
    model_tag: Optional[str] = None

    @property
    def checkpoint_dir(self):
        """$NANOCHAT_BASE_DIR/<stage's checkpoints dir>/<model_tag>."""
        assert self.model_tag is not None, "set stage.model_tag before using its checkpoint_dir"
        return get_checkpoint_dir(self.name, self.model_tag)


def setup_stage(name, device_type, run, user_config, compile_flag=None, model_tag=None):
    """Set up a training stage: init_compute, the compile decision (should_compile), the
    wandb run (`run`, "dummy" = none, in WANDB_PROJECTS[name]) and the report; print the
    device line. Returns a Stage.

    Raises ValueError for an unknown or unavailable device_type.
    """
    compute = init_compute(device_type)
    use_compile = should_compile(compile_flag, compute.device.type)
    print0(f"device: {compute.device} x {compute.world_size} | dtype: {compute.dtype} | compile: {use_compile}")
    return Stage(**vars(compute), name=name, use_compile=use_compile,
                 wandb_run=init_wandb(run, WANDB_PROJECTS[name], user_config, compute.rank), report=get_report(),
                 model_tag=model_tag)


# -----------------------------------------------------------------------------
# Batch and schedules

# Pretraining recipes (base_train --recipe): every hyperparameter that is not the run's shape.
# Each entry is also a base_train flag of the same name, so one change can be measured alone
# (bench/recipe.py). The "jan2026" values are upstream nanochat's as of early 2026
# (scripts/base_train.py, nanochat/gpt.py and dev/LOG.md of github.com/karpathy/nanochat).

# upstream nanochat's Nov-2025 speedrun: this project's pretraining until Dec 2026
NOV2025 = dict(
    arch="classic", orthogonalizer="newton_schulz", normuon_beta2=0.0, weight_decay=0.0,
    embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5,
    adam_betas=(0.8, 0.95), embedding_betas=(0.8, 0.95), x0_beta1=0.8,
    warmup_steps=0, warmdown_ratio=0.2, final_lr_frac=0.0, lr_batch_scaling=False,
    momentum_ramp=(0.85, 0.95, 300), momentum_warmdown_end=None, wte_init_std=1.0, fc_init_scale=1.0,
    # horizon: 20 tokens per parameter, all parameters counted (Chinchilla); a fixed batch
    param_count="all", target_param_data_ratio=20.0, total_batch_size=524288, packing="stream",
)
RECIPES = {
    "nov2025": NOV2025,
    # upstream's 2026 recipe: Polar Express + NorMuon + cautious weight decay (0.2 at d12, x 1/width²,
    # dev/LOG.md 2026-01-10), the retuned learning rates and betas (2026-01-19..22), warmup 40
    # steps, a warmdown over 65% of the run to 5%, Muon momentum 0.85 -> 0.97 over 400 steps and
    # back to 0.90 over the warmdown; LRs x sqrt(B / 2^19) when the batch differs from the d12
    # reference (2026-02-05); the batch from the horizon by Power Lines; 12 tokens per matmul
    # parameter (its compute-optimal ratio for this count, measured by upstream's scaling sweeps);
    # training rows packed BOS-aligned best-fit (dataloader.bos_bestfit_data_loader, 2026-01-13).
    "jan2026": dict(
        arch="modern", orthogonalizer="polar_express", normuon_beta2=0.9, weight_decay=0.2,
        embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5,
        adam_betas=(0.8, 0.96), embedding_betas=(0.8, 0.995), x0_beta1=0.96,
        warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05, lr_batch_scaling=True,
        momentum_ramp=(0.85, 0.97, 400), momentum_warmdown_end=0.90, wte_init_std=1.0, fc_init_scale=1.0,
        param_count="matmul", target_param_data_ratio=12.0, total_batch_size=-1, packing="bestfit",
    ),
    # this project's default since Dec 2026: nov2025 plus the 2026 changes that won at equal FLOPs at
    # d4/d6/d8 on the offline corpus (bench/recipe.py, bench/RESULTS.md): BOS-aligned best-fit
    # packing, cautious weight decay, NorMuon, Polar Express. The 2026 learning rates and long
    # warmup/warmdown lost at these sizes and stay out; the architecture stays classic so that
    # transformers loads the model (hf.py; --arch modern trains better and does not export).
    "dec2026": dict(NOV2025, orthogonalizer="polar_express", normuon_beta2=0.9, weight_decay=0.2, packing="bestfit"),
}
DEFAULT_RECIPE = "dec2026"
WEIGHT_DECAY_REFERENCE_DEPTH = 12  # recipes give --weight-decay at d12; it scales as (12 / depth)^2


def resolve_recipe(name, **overrides):
    """The recipe `name` (RECIPES) with every override that is not None on top. Returns a dict.

    Raises:
        ValueError: an unknown recipe (the message lists them) or an unknown override name.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown --recipe {name!r}; pick one of {', '.join(RECIPES)}")
    unknown = set(overrides) - set(RECIPES[name])
    if unknown:
        raise ValueError(f"unknown recipe settings {sorted(unknown)}")
    return {**RECIPES[name], **{k: v for k, v in overrides.items() if v is not None}}


def scaled_weight_decay(weight_decay, depth):
    """Muon's cautious weight decay at `depth` from its value at d12: x (12 / depth)^2.

    Upstream swept the optimum at d8/d12/d16/d20 (0.40/0.22/0.10/0.08) and fit WD ∝ 1/width^1.97
    (dev/LOG.md 2026-01-10). Below d8 this extrapolates (d4: 9x the d12 value); bench/recipe.py
    measures whether it holds there.
    """
    return weight_decay * (WEIGHT_DECAY_REFERENCE_DEPTH / depth) ** 2


def get_lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0,
                      warmup_steps=None):
    """Multiplier on every param group's initial_lr at `step` (0-based).

    Linear warmup over the first warmup_steps steps (or, when warmup_steps is None, the first
    warmup_ratio of the steps), constant, then a linear warmdown over the last warmdown_ratio of
    the steps to final_lr_frac (upstream Nov 2025: no warmup, warmdown 0.2, final 0.0; 2026: 40
    warmup steps, 0.65, 0.05). Returns a float in (0, 1].
    """
    warmup_iters = warmup_steps if warmup_steps is not None else round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def get_muon_momentum(step, ramp_steps=300, start=0.85, end=0.95, num_iterations=None, warmdown_ratio=0.0,
                      warmdown_end=None):
    """Muon momentum at `step`: linear from `start` to `end` over the first ramp_steps steps
    (upstream Nov 2025: 0.85 -> 0.95 over 300), then, when warmdown_end is given, linear from
    `end` to warmdown_end over the LR warmdown (the last warmdown_ratio of num_iterations steps;
    upstream 2026: 0.85 -> 0.97 over 400, then to 0.90)."""
    if warmdown_end is not None:
        warmdown_iters = round(warmdown_ratio * num_iterations)
        warmdown_start = num_iterations - warmdown_iters
        if warmdown_iters > 0 and step >= warmdown_start:
            progress = (step - warmdown_start) / warmdown_iters
            return (1 - progress) * end + progress * warmdown_end
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end


def set_lr_and_momentum(optimizers, lr_multiplier, muon_momentum=None, muon_weight_decay=None):
    """Set lr = initial_lr * lr_multiplier on every param group, and Muon's momentum and
    (cautious) weight decay if given."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if "betas" not in group:  # a Muon group
                if muon_momentum is not None:
                    group["momentum"] = muon_momentum
                if muon_weight_decay is not None:
                    group["weight_decay"] = muon_weight_decay


def should_save(step, start_step, last_step, save_every):
    """Whether to checkpoint the model as it is after `step` optimizer steps: at the last step
    and every save_every steps (save_every <= 0: only at the last), never at start_step (the
    step the run started or resumed from, which needs no new checkpoint)."""
    return step > start_step and (last_step or (save_every > 0 and step % save_every == 0))


# -----------------------------------------------------------------------------
# Logging

class LossLog:
    """The training loss as the progress line shows it: an exponential moving average (beta
    0.9) divided by 1 - beta^(steps), the bias correction that keeps the first steps from
    being pulled towards the average's start at 0 (as Adam does for its moments).

    The average lives in loop_state["smooth_train_loss"], which travels with each checkpoint,
    so a resumed run continues the curve exactly. A non-finite loss stops the run with a
    message that names the step and `hint` (what the user can change).
    """

    def __init__(self, loop_state, script, hint, beta=0.9):
        self.loop_state, self.script, self.hint, self.beta = loop_state, script, hint, beta
        loop_state.setdefault("smooth_train_loss", 0.0)

    def update(self, step, loss):
        """Add the loss of optimizer step `step` (0-based) and return the smoothed loss.

        Raises:
            SystemExit: the loss is NaN or infinite.
        """
        if not math.isfinite(loss):
            sys.exit(f"{self.script}: the loss became {loss} at step {step + 1}; {self.hint}")
        self.loop_state["smooth_train_loss"] = self.beta * self.loop_state["smooth_train_loss"] + (1 - self.beta) * loss
        return self.loop_state["smooth_train_loss"] / (1 - self.beta ** (step + 1))


class ProgressMeter:
    """Times training steps and formats the per-step progress line.

    unit, units_per_step: the throughput shown, e.g. "tok/s" with the tokens of a step, or
    "conversations/s" with its conversations; None = timing and ETA only. A stage whose steps
    differ in size (SFT's padded conversations, RL's rollouts) leaves units_per_step None and
    passes each step's count as `units` to line/rate/mfu. flops_per_unit (GPT.estimate_flops()
    for tokens) and peak_flops give MFU = achieved FLOP/s / peak FLOP/s (PaLM paper, appendix
    B), shown as "n/a" when either is unknown (CPU, a GPU missing from common.GPU_PEAK_FLOPS_BF16).

    The first `skip_steps` steps (torch.compile warm-up, allocator growth) are excluded from the
    speed estimate, so the ETA and MFU reflect steady state.
    """

    def __init__(self, num_steps, start_step=0, unit=None, units_per_step=None, flops_per_unit=None, peak_flops=None,
                 skip_steps=2):
        self.num_steps = num_steps
        self.start_step = start_step
        self.unit = unit
        self.units_per_step = units_per_step
        self.flops_per_unit = flops_per_unit
        self.peak_flops = peak_flops
        self.skip_steps = skip_steps
        self.timed_steps = 0
        self.timed_seconds = 0.0
        self.total_seconds = 0.0
        self.t0 = None

    def start(self):
        """Call right before the step's work starts."""
        self.t0 = time.perf_counter()

    def stop(self, step):
        """Call after the step finished (after synchronising the device). Returns dt in seconds."""
        dt = time.perf_counter() - self.t0
        self.total_seconds += dt
        if step - self.start_step >= self.skip_steps:
            self.timed_steps += 1
            self.timed_seconds += dt
        return dt

    def seconds_per_step(self):
        """Mean steady-state seconds per step, or None before any timed step."""
        return self.timed_seconds / self.timed_steps if self.timed_steps else None

    def _units(self, units):
        units = self.units_per_step if units is None else units
        assert units is not None, "a ProgressMeter without units_per_step needs each step's units"
        return units

    def rate(self, dt, units=None):
        """Units (tokens, conversations, ...) per second for a step of dt seconds that did
        `units` of them (default units_per_step)."""
        return self._units(units) / dt

    def mfu(self, dt, units=None, flops=None):
        """Model FLOPs utilisation in percent for a step of dt seconds, or None when unknown.

        The step's FLOPs are `flops` when given (a step mixing work of different cost per unit),
        else flops_per_unit x units (default units_per_step).
        """
        if flops is None and self.flops_per_unit:
            flops = self.flops_per_unit * self._units(units)
        if not (self.peak_flops and flops):
            return None
        return 100 * flops / dt / self.peak_flops

    def speed(self, dt, units=None, flops=None):
        """'tok/s 80,123 | mfu 45.1%' for a step of dt seconds (arguments as for rate and mfu)."""
        mfu = self.mfu(dt, units, flops)
        return f"{self.unit} {self.rate(dt, units):,.0f} | mfu {'n/a' if mfu is None else f'{mfu:.1f}%'}"

    def eta_seconds(self, step):
        """Seconds left after finishing `step`, at the steady-state speed; None before it is known."""
        sps = self.seconds_per_step()
        return None if sps is None else sps * (self.num_steps - step - 1)

    def line(self, step, loss, lr_multiplier, dt, units=None):
        """'step 00012/00100 (12.00%) | loss 5.123456 | lrm 1.00 | dt 812ms | tok/s 80,123 | mfu 45.1% | eta 1m12s'.

        units: what the step did in the meter's unit (default units_per_step).
        """
        pct = 100 * (step + 1) / self.num_steps
        line = (f"step {step + 1:05d}/{self.num_steps:05d} ({pct:.2f}%) | loss {loss:.6f} | lrm {lr_multiplier:.2f} "
                f"| dt {dt * 1000:.0f}ms")
        if self.unit is not None:
            line += f" | {self.speed(dt, units)}"
        return line + f" | eta {format_duration(self.eta_seconds(step))}"


def halve_device_batch(script, step, device_batch_size, grad_accum_steps, world_size):
    """After a CUDA out-of-memory error in optimizer step `step`: a smaller device batch and more
    accumulation steps with the same tokens per optimizer step, so the optimisation stays the
    same: (d, grad_accum_steps * device_batch_size // d) for d the largest divisor of
    device_batch_size up to half of it (half for even sizes; 12 -> 6 -> 3 -> 1). The caller frees
    the step's tensors and goes back to its last checkpoint (the failed step's gradients are partial).

    Raises:
        SystemExit: device_batch_size is already 1, or several processes run (one rank cannot
            change its batch alone, and the others wait in a collective); the message says what to do.
    """
    if world_size > 1:
        sys.exit(f"{script}: out of GPU memory at step {step + 1} with --device-batch-size {device_batch_size} on "
                 f"{world_size} processes; re-run with --resume and --device-batch-size {max(device_batch_size // 2, 1)}")
    if device_batch_size == 1:
        sys.exit(f"{script}: out of GPU memory at step {step + 1} even with --device-batch-size 1; pick a smaller "
                 "--depth or --max-seq-len (validate_env.py prints the predicted memory)")
    smaller = max(d for d in range(1, device_batch_size // 2 + 1) if device_batch_size % d == 0)
    accumulation = grad_accum_steps * (device_batch_size // smaller)
    print0(f"{script}: out of GPU memory at step {step + 1} with --device-batch-size {device_batch_size}; going on "
           f"with {smaller} and {accumulation} accumulation steps (the same tokens per step) from the last checkpoint")
    return smaller, accumulation


# -----------------------------------------------------------------------------
# Data and the optimizer step

class PrefetchingLoader:
    """Hands out (inputs, targets) from a loader that yields (inputs, targets, loader_state), one batch ahead.

    The next batch is fetched right after a batch is handed out, so the host prepares it while
    the device computes. `loader_state` is always the position after the last batch handed out
    (what a checkpoint must store); it starts as the `loader_state` given (None = the beginning).
    """

    def __init__(self, loader, loader_state=None):
        self.loader = loader
        self.loader_state = loader_state
        self._batch = next(loader)

    def next(self):
        """The next (inputs, targets); afterwards `loader_state` is the position right after them."""
        inputs, targets, loader_state = self._batch
        self.loader_state = loader_state
        self._batch = next(self.loader)
        return inputs, targets


def train_step(model, batches, optimizers, grad_accum_steps, autocast_ctx, lr_multiplier, muon_momentum=None,
               grad_clip=0.0, muon_weight_decay=None):
    """One optimizer step: grad_accum_steps forward/backward passes, then every optimizer steps
    (after set_lr_and_momentum with lr_multiplier, muon_momentum and muon_weight_decay).

    batches: a PrefetchingLoader of (B, T) int64 (inputs, targets), targets -1 ignored.
    Returns the step's mean loss (float, nats per target token) over micro-batches and, under
    torch.distributed, over processes, so 1 process x 2k micro-batches and 2 processes x k
    micro-batches report the same number. Gradients are averaged across processes by the
    distributed optimizers (the model is not wrapped in DDP).
    """
    device = next(model.parameters()).device
    train_loss = torch.zeros((), device=device)
    for _ in range(grad_accum_steps):
        inputs, targets = batches.next()
        with autocast_ctx:
            # sum / count rather than the mean: a chat micro-batch may hold no assistant token at
            # all, and the mean over zero targets is NaN
            loss = model(inputs, targets, loss_reduction="sum") / (targets >= 0).sum().clamp(min=1)
        train_loss += loss.detach() / grad_accum_steps
        (loss / grad_accum_steps).backward()
    if grad_clip > 0:
        if dist.is_available() and dist.is_initialized():
            # clip by the norm of the gradient of the whole batch, not of this rank's share: average
            # first, in one all-reduce (the optimizers then average equal gradients again: clipping
            # costs a second reduction)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    set_lr_and_momentum(optimizers, lr_multiplier, muon_momentum, muon_weight_decay)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(train_loss)  # SUM: gloo has no AVG
        train_loss /= dist.get_world_size()
    return train_loss.item()
