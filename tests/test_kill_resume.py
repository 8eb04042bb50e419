"""kill -9 at any moment loses nothing beyond the last checkpoint: the four training stages (base,
mid, SFT, RL) run as a pipeline at tiny shapes, once straight through and once SIGKILLed twice per
stage, once the moment a checkpoint temp file is seen (a 0.5 ms poll; a write that ends between
two polls is missed, so the test asserts that most were caught) and once at a random moment of
the run (start-up included), each time re-run the way the shell scripts do it (--resume when the
stage has a complete checkpoint). After every kill no checkpoint file but a temporary one may be
incomplete, and every stage must end with the same weights as the uninterrupted pipeline, bit
for bit (CPU).
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch

from nanochat.checkpoint_manager import list_steps
from test_base_train import REPO, make_base_dir, run_env

# each stage: module, flags, checkpoint folder (under the tag d2), final step
STAGES = [
    ("scripts.base_train", ["--depth=2", "--max-seq-len=64", "--device-batch-size=2", "--total-batch-size=128",
                            "--num-iterations=8", "--eval-every=4", "--eval-tokens=128", "--sample-every=-1",
                            "--core-metric-every=-1", "--save-every=2", "--matrix-lr=0.05"], "base_checkpoints", 8),
    ("scripts.mid_train", ["--data=offline", "--device-batch-size=2", "--max-seq-len=64", "--total-batch-size=128",
                           "--num-iterations=6", "--eval-every=3", "--eval-tokens=512", "--save-every=2"], "mid_checkpoints", 6),
    ("scripts.chat_sft", ["--data=offline", "--device-batch-size=2", "--target-examples-per-step=4", "--max-seq-len=64",
                          "--num-iterations=6", "--eval-every=3", "--eval-steps=4", "--eval-metrics-every=-1",
                          "--save-every=2"], "chatsft_checkpoints", 6),
    ("scripts.chat_rl", ["--data=offline", "--num-iterations=4", "--examples-per-step=2", "--num-samples=4",
                         "--device-batch-size=4", "--max-new-tokens=8", "--eval-every=2", "--eval-examples=2",
                         "--eval-samples=2", "--save-every=1"], "chatrl_checkpoints", 4),
]


def stage_command(base_dir, module, flags, folder):
    """The stage as the shell scripts run it: --resume when it holds a complete checkpoint (common.sh resume_flag)."""
    resume = bool(list_steps(os.path.join(base_dir, folder, "d2")))
    return [sys.executable, "-m", module, *flags, *(["--resume"] if resume else [])]


def run_to_end(base_dir, module, flags, folder):
    proc = subprocess.run(stage_command(base_dir, module, flags, folder), cwd=REPO, env=run_env(base_dir),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def kill_when(base_dir, module, flags, folder, moment):
    """Start the stage and SIGKILL it at `moment` ("writing": as soon as a checkpoint temp file
    exists; a float: that many seconds after the start). Returns what it was doing then, or
    None if it finished first."""
    checkpoint_dir = os.path.join(base_dir, folder, "d2")
    proc = subprocess.Popen(stage_command(base_dir, module, flags, folder), cwd=REPO, env=run_env(base_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    caught = None
    while proc.poll() is None:
        if moment == "writing":
            names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
            if any(name.endswith(".tmp") for name in names):
                caught = "writing"
        elif time.monotonic() - start >= moment:
            caught = f"at {moment:.1f} s"
        if caught:
            proc.kill()
            break
        time.sleep(0.0005)
    proc.wait()
    return caught


def assert_no_incomplete_checkpoint_file(checkpoint_dir):
    """Every file a loader could pick up is complete: only temporary files may be torn."""
    if not os.path.isdir(checkpoint_dir):
        return
    for name in os.listdir(checkpoint_dir):
        path = os.path.join(checkpoint_dir, name)
        if name.endswith(".tmp"):
            assert name.startswith("."), name  # atomic_write's hidden temporary: nothing reads it
        elif name.endswith(".json"):
            with open(path) as f:
                json.load(f)
        else:
            torch.load(path, map_location="cpu", weights_only=False)


def final_weights(base_dir, folder, step):
    return torch.load(os.path.join(base_dir, folder, "d2", f"model_{step:06d}.pt"), map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_sigkill_at_any_moment_of_any_stage_loses_nothing(tmp_path):
    straight = make_base_dir(str(tmp_path / "straight"))
    killed = shutil.copytree(straight, str(tmp_path / "killed"))
    rng = random.Random(0)
    kills = []
    for module, flags, folder, last_step in STAGES:
        t0 = time.monotonic()
        run_to_end(straight, module, flags, folder)
        duration = time.monotonic() - t0
        for moment in ("writing", rng.uniform(0.2, 0.6) * duration):
            kills.append((module, kill_when(killed, module, flags, folder, moment)))
            assert_no_incomplete_checkpoint_file(os.path.join(killed, folder, "d2"))
        run_to_end(killed, module, flags, folder)
        a, b = final_weights(straight, folder, last_step), final_weights(killed, folder, last_step)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (module, key, kills)
    print("kills:", kills)
    assert sum(moment == "writing" for _, moment in kills) >= len(STAGES) // 2, kills  # most landed mid-write
