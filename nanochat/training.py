"""
The pieces every training stage (base, mid, SFT, RL) shares: the LR schedule, the Muon
momentum ramp, and the per-step progress line (loss, lr, dt, tok/s, MFU, ETA).

Not for: the training loops themselves (each stage's script owns its recipe) or checkpoints
(checkpoint_manager.py).
"""

import time


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
