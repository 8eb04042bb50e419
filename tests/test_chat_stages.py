"""
scripts/mid_train.py and scripts/chat_sft.py on CPU with the offline task data: each trains
from the previous stage's checkpoint, lowers its validation loss, and a run resumed from an
intermediate checkpoint ends bit-identical to the uninterrupted run; SFT prints tok/s and MFU
per step; the base model is of the modern architecture. mid_train writes under the tag of the base model it loaded, and the identity
conversations both stages mix in are generated when missing and taken as they are when the
user has edited them.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tasks.identity import generate_conversations
from tasks.mixtures import mid_mixture, sft_mixture
from test_base_train import REPO, STAGE_ATOL, finish_stage, make_base_dir, run_env, start_stage


def run(base_dir, module, *args):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=run_env(base_dir),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def drop_step(checkpoint_dir, step):
    """Remove one checkpoint, as if the run had been killed before writing it."""
    for name in os.listdir(checkpoint_dir):
        if re.fullmatch(rf"(model|meta|optim)_{step:06d}.*", name):
            os.remove(os.path.join(checkpoint_dir, name))


def assert_resumed_at(stdout, checkpoint_dir, step, num_steps):
    """A resume, not a restart: the run loaded checkpoint `step` and trained exactly the steps
    after it (a deterministic restart from 0 would also end bit-identical)."""
    assert f"resumed from {checkpoint_dir} step {step}\n" in stdout, stdout[-2000:]
    trained = [int(v) for v in re.findall(rf"^step (\d{{5}})/{num_steps:05d} ", stdout, re.MULTILINE)]
    assert trained == list(range(step + 1, num_steps + 1)), trained


def assert_same_model(dir_a, dir_b, step):
    a = torch.load(os.path.join(dir_a, f"model_{step:06d}.pt"), weights_only=True)
    b = torch.load(os.path.join(dir_b, f"model_{step:06d}.pt"), weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base dir with a d2 base checkpoint of the modern architecture (value embeddings and
    per-layer scalars, which mid and SFT must carry and optimise) and no identity conversations yet."""
    base = make_base_dir(str(tmp_path_factory.mktemp("chat") / "base"))
    run(base, "scripts.base_train", "--depth=2", "--arch=modern", "--max-seq-len=64", "--device-batch-size=2",
        "--total-batch-size=128", "--num-iterations=4", "--eval-every=-1", "--eval-tokens=128",
        "--sample-every=-1", "--core-metric-every=-1")
    return base


@pytest.mark.slow
def test_mid_train_learns_and_resumes_exactly(base_dir, tmp_path):
    flags = ["--data=offline", "--device-batch-size=2", "--max-seq-len=64", "--total-batch-size=256",
             "--num-iterations=8", "--eval-every=8", "--eval-tokens=512", "--save-every=4", "--matrix-lr=0.05"]
    identity = os.path.join(base_dir, "identity_conversations.jsonl")
    assert not os.path.exists(identity)
    proc = run(base_dir, "scripts.mid_train", *flags)
    assert "Loaded base model d2 step 4" in proc.stdout
    assert f"no identity conversations at {identity}: wrote the default 500" in proc.stdout
    assert os.path.exists(identity)
    bpb = [float(v) for v in re.findall(r"val bpb ([\d.]+)", proc.stdout)]
    assert len(bpb) == 2 and bpb[1] < bpb[0], bpb
    ckpt = os.path.join(base_dir, "mid_checkpoints", "d2")
    reference = str(tmp_path / "reference")
    shutil.copytree(ckpt, reference)
    drop_step(ckpt, 8)
    resumed = run(base_dir, "scripts.mid_train", *flags, "--resume")
    assert_resumed_at(resumed.stdout, ckpt, 4, 8)
    assert_same_model(reference, ckpt, 8)
    assert os.path.exists(os.path.join(base_dir, "report", "midtraining.md"))


@pytest.mark.slow
def test_mid_train_writes_under_the_tag_it_loaded(base_dir, tmp_path):
    """Without --model-tag mid_train starts from the largest base tag, and its checkpoints go
    under that tag, whatever the model's depth (a downloaded d34 may be renamed, for example).
    Without batch flags it takes the pretraining run's batch."""
    base_dir = shutil.copytree(base_dir, str(tmp_path / "tags"))
    shutil.rmtree(os.path.join(base_dir, "mid_checkpoints"), ignore_errors=True)
    shutil.copytree(os.path.join(base_dir, "base_checkpoints", "d2"), os.path.join(base_dir, "base_checkpoints", "d7"))
    proc = run(base_dir, "scripts.mid_train", "--data=offline", "--num-iterations=1", "--eval-every=-1", "--eval-tokens=512")
    assert "Loaded base model d7 step 4" in proc.stdout
    assert os.listdir(os.path.join(base_dir, "mid_checkpoints")) == ["d7"]
    # no batch flags: the pretraining run's batch, not upstream's GPU-sized one
    assert "batch: 128 tokens per step = 2 x 64 x 1 processes x 1 accumulation steps" in proc.stdout


@pytest.mark.slow
def test_chat_sft_learns_and_resumes_exactly(base_dir, tmp_path):
    base_dir = shutil.copytree(base_dir, str(tmp_path / "sft"))  # independent of the mid test's checkpoints
    shutil.rmtree(os.path.join(base_dir, "mid_checkpoints"), ignore_errors=True)
    run(base_dir, "scripts.mid_train", "--data=offline", "--device-batch-size=2", "--max-seq-len=64",
        "--total-batch-size=128", "--num-iterations=2", "--eval-every=-1", "--eval-tokens=512")
    flags = ["--data=offline", "--device-batch-size=2", "--target-examples-per-step=4", "--max-seq-len=64",
             "--num-iterations=8", "--eval-every=8", "--eval-steps=8", "--eval-metrics-every=-1",
             "--save-every=4", "--init-lr-frac=1.0"]
    proc = run(base_dir, "scripts.chat_sft", *flags)
    assert "Loaded mid model d2" in proc.stdout
    # every step's line has its tokens per second (the step's non-padding tokens) and MFU (no peak on CPU)
    speeds = re.findall(r"^step \d{5}/00008 .*\| tok/s ([\d,]+) \| mfu n/a \| eta ", proc.stdout, re.MULTILINE)
    assert len(speeds) == 8 and all(int(v.replace(",", "")) > 0 for v in speeds), proc.stdout
    losses = [float(v) for v in re.findall(r"val loss ([\d.]+)", proc.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    ckpt = os.path.join(base_dir, "chatsft_checkpoints", "d2")
    reference = str(tmp_path / "reference")
    shutil.copytree(ckpt, reference)
    drop_step(ckpt, 8)
    resumed = run(base_dir, "scripts.chat_sft", *flags, "--resume")
    assert_resumed_at(resumed.stdout, ckpt, 4, 8)
    assert_same_model(reference, ckpt, 8)
    assert os.path.exists(os.path.join(base_dir, "report", "chat-sft.md"))


@pytest.mark.slow
def test_mid_train_in_bf16_follows_fp32(base_dir, tmp_path):
    """6 midtraining steps in bf16 autocast (the GPU's default, NANOCHAT_DTYPE=bfloat16 here) and in
    fp32 from the same base checkpoint: finite losses and val bpb, each within STAGE_ATOL (the
    tolerance of test_base_train's bf16 run, which says why) of fp32's. Measured: <= 3e-3 in the
    smoothed loss, <= 4e-3 in val bpb."""
    flags = ["--data=offline", "--device-batch-size=2", "--max-seq-len=64", "--total-batch-size=128",
             "--num-iterations=6", "--eval-every=3", "--eval-tokens=512", "--save-every=-1"]
    procs = {}
    for dtype in ("float32", "bfloat16"):  # each in its own copy: mid_train writes the identity file and checkpoints
        copy = shutil.copytree(base_dir, str(tmp_path / dtype))
        procs[dtype] = start_stage(copy, "scripts.mid_train", *flags, "--no-compile", NANOCHAT_DTYPE=dtype)
    out = {dtype: finish_stage(proc)[0] for dtype, proc in procs.items()}
    assert "| dtype: torch.bfloat16 |" in out["bfloat16"] and "| dtype: torch.float32 |" in out["float32"]
    curves = {dtype: ([float(v) for v in re.findall(r"^step \d{5}/\d{5} .*?\| loss ([\d.]+)", text, re.MULTILINE)],
                      [float(v) for v in re.findall(r"val bpb ([\d.]+)", text)]) for dtype, text in out.items()}
    for got, want in zip(curves["bfloat16"], curves["float32"]):
        assert len(got) == len(want) > 0 and all(math.isfinite(v) for v in got), (got, want)
        assert max(abs(a - b) for a, b in zip(got, want)) <= STAGE_ATOL, (got, want)
    assert [len(c) for c in curves["bfloat16"]] == [6, 3]  # 6 steps; val bpb at 0, 3 and 6


OFFLINE_SIZES = {"define_word": 2, "definition_mc": 2, "arithmetic": 2, "simple_spelling": 2, "spelling_bee": 2}


def test_missing_identity_file_is_generated_and_an_edited_one_is_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    path = tmp_path / "identity_conversations.jsonl"
    mixture = sft_mixture("offline", "train", sizes=OFFLINE_SIZES)
    out = capsys.readouterr().out
    assert f"no identity conversations at {path}: wrote the default 500" in out and "dev.gen_identity_data" in out
    assert path.read_text(encoding="utf-8").splitlines() == [json.dumps(c, ensure_ascii=False)
                                                             for c in generate_conversations()]
    assert len(mixture) == 10 + 500

    edited = {"messages": [{"role": "user", "content": "Who are you?"},
                           {"role": "assistant", "content": "Bob's model."}]}
    path.write_text(json.dumps(edited) + "\n", encoding="utf-8")
    mixture = mid_mixture("offline", "train", sizes=OFFLINE_SIZES)
    assert len(mixture) == 10 + 2  # the one edited conversation, listed twice
    assert edited in [mixture[i] for i in range(len(mixture))]
    assert "identity" not in capsys.readouterr().out
    assert path.read_text(encoding="utf-8") == json.dumps(edited) + "\n"


def test_gen_identity_data_writes_the_default_set(tmp_path):
    """`python -m dev.gen_identity_data` with no flags writes what the stages generate by themselves."""
    out = tmp_path / "id.jsonl"
    proc = subprocess.run([sys.executable, "-m", "dev.gen_identity_data", "--output", str(out)], cwd=REPO,
                          env=run_env(str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text(encoding="utf-8").splitlines() == [json.dumps(c, ensure_ascii=False)
                                                            for c in generate_conversations()]
