"""
What every training loop (base, mid, SFT, RL) shares: the stage setup (device, dtype,
autocast, peak FLOPs, wandb run, report, checkpoint dir, model tag) and the torch.compile
policy, the LR schedule and Muon momentum ramp, when to checkpoint, the loss log (smoothing,
non-finite stop), the progress meter (unit, MFU, ETA), the prefetching batch loader and the
optimizer step. The evaluation scripts use the compute part of the setup (init_compute).

Not for: the training loops themselves (each stage's script owns its recipe), checkpoint files
and resume (checkpoint_manager.py), or a stage's wall time and energy (energy.StageClock).
"""

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import get_checkpoint_dir
from nanochat.common import (autodetect_dtype, compute_init, format_duration, get_peak_flops, init_wandb,
                             print0)
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


def init_compute(device_type=None):
    """Initialise the process (common.compute_init: seeds, torchrun) and pick the precision.

    Returns a Compute. Raises ValueError for an unknown or unavailable device_type.
    """
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    dtype = autodetect_dtype(device.type)
    autocast_ctx = torch.amp.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peak = get_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return Compute(ddp, rank, local_rank, world_size, device, dtype, autocast_ctx, synchronize,
                   peak * world_size if peak else None)


def should_compile(flag, device_type):
    """The torch.compile policy of every training stage: --compile / --no-compile when given
    (flag True/False), else on for CUDA and off elsewhere (on CPU and MPS the compile time
    outweighs the gain for the small models trained there). NANOCHAT_COMPILE=0 in the
    environment turns the CUDA default off: setup.sh writes it to .nanochat_env when
    torch.compile cannot build a kernel on this GPU (dev/check_accelerator.py)."""
    if flag is not None:
        return flag
    return device_type == "cuda" and os.environ.get("NANOCHAT_COMPILE", "1") != "0"


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

def get_lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Multiplier on every param group's initial_lr at `step` (0-based).

    Linear warmup over the first warmup_ratio of the steps, constant, then a linear warmdown over
    the last warmdown_ratio of the steps to final_lr_frac (upstream nanochat: no warmup,
    warmdown 0.2, final 0.0). Returns a float in [final_lr_frac, 1].
    """
    warmup_iters = round(warmup_ratio * num_iterations)
    warmdown_iters = round(warmdown_ratio * num_iterations)
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if step <= num_iterations - warmdown_iters:
        return 1.0
    progress = (num_iterations - step) / warmdown_iters
    return progress + (1 - progress) * final_lr_frac


def get_muon_momentum(step, ramp_steps=300, start=0.85, end=0.95):
    """Muon momentum at `step`: linear from 0.85 to 0.95 over the first 300 steps (upstream nanochat)."""
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end


def set_lr_and_momentum(optimizers, lr_multiplier, muon_momentum=None):
    """Set lr = initial_lr * lr_multiplier on every param group, and the Muon momentum if given."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if muon_momentum is not None and "momentum" in group and "betas" not in group:
                group["momentum"] = muon_momentum


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
               grad_clip=0.0):
    """One optimizer step: grad_accum_steps forward/backward passes, then every optimizer steps.

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
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    set_lr_and_momentum(optimizers, lr_multiplier, muon_momentum)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(train_loss)  # SUM: gloo has no AVG
        train_loss /= dist.get_world_size()
    return train_loss.item()
