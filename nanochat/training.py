"""
The pieces every training stage (base, mid, SFT, RL) shares: the LR schedule, the Muon
momentum ramp, and the per-step progress line (loss, lr, dt, tok/s, MFU, ETA).

Not for: the training loops themselves (each stage's script owns its recipe) or checkpoints
(checkpoint_manager.py).
"""

import time

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import (capture_rng_state, find_last_step, load_checkpoint, restore_rng_state,
                                         save_checkpoint)
from nanochat.common import get_dist_info, print0
from nanochat.energy import EnergyMeter, energy_for_report


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


def format_duration(seconds):
    """12345 -> '3h25m45s'; '?' for None."""
    if seconds is None:
        return "?"
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressMeter:
    """Times training steps and formats the per-step progress line.

    The first `skip_steps` steps (torch.compile warm-up, allocator growth) are excluded from the
    speed estimate, so the ETA and MFU reflect steady state. MFU = achieved FLOP/s / peak FLOP/s,
    with FLOPs per token from GPT.estimate_flops() (PaLM paper, appendix B); "n/a" when the GPU's
    peak is unknown (CPU, or a GPU missing from common.GPU_PEAK_FLOPS_BF16).
    """

    def __init__(self, num_steps, tokens_per_step, flops_per_token, peak_flops, start_step=0, skip_steps=2):
        self.num_steps = num_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.start_step = start_step
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

    def tokens_per_second(self, dt):
        """Tokens (or, for SFT, conversations) per second for a step of dt seconds."""
        return self.tokens_per_step / dt

    def mfu(self, dt):
        """Model FLOPs utilisation in percent for a step of dt seconds, or None when unknown."""
        if not self.peak_flops:
            return None
        return 100 * self.flops_per_token * self.tokens_per_step / dt / self.peak_flops

    def eta_seconds(self, step):
        """Seconds left after finishing `step`, at the steady-state speed; None before it is known."""
        sps = self.seconds_per_step()
        return None if sps is None else sps * (self.num_steps - step - 1)

    def line(self, step, loss, lr_multiplier, dt):
        """'step 00012/00100 (12.00%) | loss 5.123 | lrm 1.00 | dt 812ms | tok/s 80,123 | mfu 45.1% | eta 1m12s'."""
        mfu = self.mfu(dt)
        mfu_str = "n/a" if mfu is None else f"{mfu:.1f}%"
        pct = 100 * (step + 1) / self.num_steps
        return (f"step {step + 1:05d}/{self.num_steps:05d} ({pct:.2f}%) | loss {loss:.6f} | lrm {lr_multiplier:.2f} "
                f"| dt {dt * 1000:.0f}ms | tok/s {self.tokens_per_second(dt):,.0f} | mfu {mfu_str} "
                f"| eta {format_duration(self.eta_seconds(step))}")


def save_training_state(checkpoint_dir, step, model, optimizers, meta, loader_state):
    """Checkpoint a training run after `step` optimizer steps, so that it can resume exactly.

    A collective under torch.distributed (every rank calls it): each rank's data position is
    gathered into meta["dataloader_state"] (a list indexed by rank), each rank saves its own
    optimizer shard, and rank 0 saves the model, the RNG states and the meta. `meta` must hold
    "model_config" (checkpoint_manager.save_checkpoint's contract).
    """
    ddp, rank, _, world_size = get_dist_info()
    loader_states = [None] * world_size
    if ddp:
        dist.all_gather_object(loader_states, loader_state)
    else:
        loader_states[0] = loader_state
    meta = {**meta, "dataloader_state": loader_states, "rng_state": capture_rng_state()}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), [opt.state_dict() for opt in optimizers], meta,
                    rank=rank)


def load_training_state(checkpoint_dir, step, model, optimizers, device):
    """Restore model, optimizers and RNG from a save_training_state checkpoint, in place, and
    print which one. step None = the last complete checkpoint in checkpoint_dir.

    Returns (step, meta, loader_state): loader_state is this rank's data position.

    Raises:
        FileNotFoundError: no checkpoint there, or not that step (the message lists the steps there are).
        ValueError: the checkpoint was written by a different number of processes, or its
            model does not fit `model` (the message names both shapes).
    """
    _, rank, _, world_size = get_dist_info()
    if step is None:
        step = find_last_step(checkpoint_dir)
    model_data, optim_data, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
    saved_world = len(meta["dataloader_state"])
    if saved_world != world_size:
        raise ValueError(f"the checkpoint {checkpoint_dir} step {step} was written by {saved_world} processes and this "
                         f"run has {world_size}; resume with --nproc_per_node={saved_world}")
    if meta["model_config"] != model.config.__dict__:
        raise ValueError(f"the checkpoint {checkpoint_dir} step {step} holds a {meta['model_config']} model, but this "
                         f"run builds {model.config.__dict__}; use the flags of the original run")
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in model_data.items()}, strict=True)
    for opt, state in zip(optimizers, optim_data):
        opt.load_state_dict(state)
    restore_rng_state(meta["rng_state"])
    print0(f"resumed from {checkpoint_dir} step {step}")
    return step, meta, meta["dataloader_state"][rank]


class PrefetchingLoader:
    """Hands out (inputs, targets) from a loader that yields (inputs, targets, state), one batch ahead.

    The next batch is fetched right after a batch is handed out, so the host prepares it while
    the device computes. `state` is always the position after the last batch handed out (what
    a checkpoint must store); it starts as `resume_state` (None = the beginning).
    """

    def __init__(self, loader, resume_state=None):
        self.loader = loader
        self.state = resume_state
        self._batch = next(loader)

    def next(self):
        """The next (inputs, targets); afterwards `state` is the position right after them."""
        inputs, targets, state = self._batch
        self.state = state
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


class StageClock:
    """A stage's wall time (s) and GPU energy (Wh, via NVML when available) for the report card,
    accumulated in `loop_state` so that a resumed run reports the total over all its attempts.

    Call update() before each checkpoint save (so the totals travel with the checkpoint) and
    report_items() at the end for the two keys report.py sums: "wall time (s)", "energy (Wh)".
    """

    def __init__(self, loop_state, device_index=0):
        self.loop_state = loop_state
        loop_state.setdefault("wall_time_s", 0.0)
        loop_state.setdefault("energy_wh", 0.0)
        self.meter = EnergyMeter(device_index=device_index)
        self.meter.start()
        self.last_time, self.last_wh = time.time(), 0.0

    def update(self):
        """Add the wall time and energy since the last update to loop_state."""
        now, wh = time.time(), self.meter.elapsed_wh()
        self.loop_state["wall_time_s"] += now - self.last_time
        if wh is not None:
            self.loop_state["energy_wh"] += wh - self.last_wh
            self.last_wh = wh
        self.last_time = now

    def report_items(self):
        """Stop the meter; {"wall time (s)": float, "energy (Wh)": float or "n/a"} for the report."""
        self.update()
        wh = self.meter.stop()
        return {"wall time (s)": round(self.loop_state["wall_time_s"], 1),
                "energy (Wh)": energy_for_report(self.loop_state["energy_wh"] if wh is not None else None)}
