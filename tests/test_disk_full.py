"""A full disk during a checkpoint save or a report write: base_train stops with a message that
names the directory and the space needed (no traceback), the previous checkpoint stays loadable,
and the same command run again after space was freed resumes and ends bit-identical to a run
that never ran out. The small disks are tmpfs mounts (root only: CI runs as root).
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from test_base_train import REPO, losses, make_base_dir, run_env, run_train, train_args


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(name, size_bytes) -> a directory on a tmpfs of that size; unmounted afterwards."""
    mounts = []

    def mount(name, size_bytes):
        path = tmp_path / name
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (root only): {proc.stderr.decode().strip()}")
        mounts.append(path)
        return path
    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize(path, size_bytes):
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(path)], check=True)


def start(base_dir, *args):
    return subprocess.run([sys.executable, "-m", "scripts.base_train", *args], cwd=REPO, env=run_env(base_dir),
                          capture_output=True, text=True, timeout=600)


def checkpoint_bytes(checkpoint_dir, step):
    return sum(os.path.getsize(os.path.join(checkpoint_dir, name)) for name in os.listdir(checkpoint_dir)
               if re.fullmatch(rf"(model|optim|meta)_{step:06d}.*", name))


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_stops_clearly_and_a_rerun_resumes(tmp_path, small_disk):
    straight = make_base_dir(str(tmp_path / "straight"))
    run_train(straight, *train_args())  # 12 steps, a checkpoint every 4
    one_checkpoint = checkpoint_bytes(os.path.join(straight, "base_checkpoints", "d2"), 4)

    full = make_base_dir(str(tmp_path / "full"))
    disk = small_disk("checkpoints", one_checkpoint * 3 // 2)  # room for step 4, not for step 8 beside it
    os.symlink(disk, os.path.join(full, "base_checkpoints"))
    checkpoint_dir = os.path.join(full, "base_checkpoints", "d2")
    proc = start(full, *train_args())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    print(message)
    assert message.startswith(f"base_train: the disk is full: checkpoint step 8 did not fit in {checkpoint_dir} (it takes about ")
    assert "The checkpoints before it are intact" in message and "it resumes from the last checkpoint" in message
    # step 8's files were removed again, step 4 is complete and loads
    assert sorted(os.listdir(checkpoint_dir)) == ["meta_000004.json", "model_000004.pt", "optim_000004_rank0.pt"]
    torch.load(os.path.join(checkpoint_dir, "model_000004.pt"), weights_only=True)

    resize(disk, 64 * 2**20)  # the user freed space
    resumed = start(full, *train_args(), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint_dir} step 4\n" in resumed.stdout and sorted(losses(resumed.stdout)) == list(range(5, 13))
    a = torch.load(os.path.join(straight, "base_checkpoints", "d2", "model_000012.pt"), weights_only=True)
    b = torch.load(os.path.join(checkpoint_dir, "model_000012.pt"), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_full_disk_at_the_report_stops_clearly_and_keeps_the_checkpoints(tmp_path, small_disk):
    base = make_base_dir(str(tmp_path / "run"))
    disk = small_disk("report", 64 * 1024)
    with open(disk / "filler", "wb") as f:  # the disk is full before the run starts
        f.write(b"x" * (64 * 1024))
    os.symlink(disk, os.path.join(base, "report"))
    proc = start(base, *train_args(**{"num-iterations": 4}))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    report_dir = os.path.join(base, "report")
    assert re.search(rf"^base_train: no space left on the disk of {re.escape(report_dir)} while writing \S+ \([\d.]+ \w+ "
                     r"written, [\d.]+ \w+ free now\); free some space there and run the same command again$",
                     proc.stderr, re.MULTILINE), proc.stderr[-2000:]
    os.remove(disk / "filler")
    checkpoint_dir = os.path.join(base, "base_checkpoints", "d2")
    resume = ["--resume"] if os.path.isdir(checkpoint_dir) and os.listdir(checkpoint_dir) else []
    rerun = start(base, *train_args(**{"num-iterations": 4}), *resume)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert os.path.exists(os.path.join(base, "report", "base-model-training.md"))
