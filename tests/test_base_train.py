"""
scripts/base_train.py end to end on CPU: a tiny model trains and its loss falls, a run killed
mid-way and resumed ends bit-identical to an uninterrupted one, and torchrun with 2 gloo
processes follows the same loss curve as 1 process with twice the gradient accumulation.
First, the pieces of nanochat/training.py its loop (and the chat stages' loops) are made of.

The data is built so that every parquet row group holds one document of exactly B*T tokens
under a byte-level tokenizer (no merges: one token per ASCII character, plus <|bos|>). Then
1 process x 2 micro-batches and 2 processes x 1 micro-batch see the same documents per step.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.checkpoint_manager import find_last_step
from nanochat.tokenizer import RustBPETokenizer
from nanochat.run_shape import get_grad_accum_steps
from nanochat.training import (LossLog, ProgressMeter, setup_stage, should_compile,
                               should_save)
from test_core_eval import write_bundle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T = 2, 32
WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls watch quietly from old oak trees".split()


def make_base_dir(base_dir, num_shards=4, docs_per_shard=8):
    """Shards of one-document row groups (B*T-1 ASCII chars each) and a byte-level tokenizer."""
    data_dir = os.path.join(base_dir, "base_data")
    os.makedirs(data_dir)
    doc_id = 0
    for shard in range(num_shards):
        docs = []
        for _ in range(docs_per_shard):
            words = [WORDS[(doc_id * 7 + i * 3) % len(WORDS)] for i in range(40)]
            docs.append(" ".join(words)[: B * T - 1])
            doc_id += 1
        assert all(len(d) == B * T - 1 for d in docs)
        pq.write_table(pa.table({"text": docs}), os.path.join(data_dir, f"shard_{shard:05d}.parquet"), row_group_size=1)
    tokenizer = RustBPETokenizer.train_from_iterator(iter(["byte level"]), 256 + 9)
    tokenizer.save(os.path.join(base_dir, "tokenizer"))  # tokenizer.pkl and token_bytes.pt
    return base_dir


def train_args(**overrides):
    flags = {"depth": 2, "max-seq-len": T, "device-batch-size": B, "total-batch-size": 2 * B * T,
             "num-iterations": 12, "eval-every": 6, "eval-tokens": 4 * B * T, "sample-every": -1,
             "save-every": 4, "core-metric-every": -1, "matrix-lr": 0.05}
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


def run_env(base_dir, **extra):
    return dict(os.environ, NANOCHAT_BASE_DIR=base_dir, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def run_train(base_dir, *args, launcher=(sys.executable, "-m"), check=True):
    cmd = [*launcher, "scripts.base_train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(base_dir), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def start_stage(base_dir, module, *args, **extra_env):
    """`python -m <module> <args>` in the background (one thread: two of them share the CI's 2 cores);
    extra_env adds environment variables (e.g. NANOCHAT_DTYPE). Collect it with finish_stage."""
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=run_env(base_dir, **extra_env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_stage(proc):
    """Wait for a start_stage process; assert it succeeded and return (stdout, stderr)."""
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout, stderr


def losses(stdout):
    """{step: loss} from the progress lines."""
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+)/\d+ .*?\| loss ([\d.]+)", stdout)}


def val_bpbs(stdout):
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"step (\d+) \| val bpb ([\d.]+)", stdout)}


def load_model_state(base_dir, step, tag="d2"):
    path = os.path.join(base_dir, "base_checkpoints", tag, f"model_{step:06d}.pt")
    return torch.load(path, map_location="cpu", weights_only=True)


# -----------------------------------------------------------------------------
# nanochat/training.py

def test_loss_log_is_a_debiased_ema_that_resumes_exactly():
    losses_in = [5.0, 4.0, 3.5, 3.0, 2.8]
    loop_state = {"smooth_train_loss": 0.0}
    log = LossLog(loop_state, "base_train", "lower the learning rates")
    straight = [log.update(step, loss) for step, loss in enumerate(losses_in)]
    assert straight[0] == pytest.approx(5.0)  # debiased: the first value is the first loss, not 10% of it
    ema = 0.0
    for step, loss in enumerate(losses_in):
        ema = 0.9 * ema + 0.1 * loss
        assert straight[step] == pytest.approx(ema / (1 - 0.9 ** (step + 1)))
    saved = {"smooth_train_loss": 0.0}  # a run that checkpoints after step 2 and resumes from its loop_state
    first = LossLog(saved, "base_train", "")
    for step in range(3):
        first.update(step, losses_in[step])
    resumed = LossLog(dict(saved), "base_train", "")
    assert [resumed.update(step, losses_in[step]) for step in (3, 4)] == straight[3:]


def test_loss_log_stops_on_a_non_finite_loss():
    log = LossLog({}, "chat_sft", "lower --init-lr-frac")
    with pytest.raises(SystemExit, match=r"chat_sft: the loss became nan at step 8; lower --init-lr-frac"):
        log.update(7, float("nan"))


def test_progress_meter_line_in_any_unit():
    meter = ProgressMeter(100, unit="tok/s", units_per_step=1000, flops_per_unit=1e9, peak_flops=1e13)
    assert meter.line(11, 5.1234567, 1.0, 0.5) == ("step 00012/00100 (12.00%) | loss 5.123457 | lrm 1.00 | dt 500ms | "
                                                   "tok/s 2,000 | mfu 20.0% | eta ?")
    meter = ProgressMeter(10, start_step=4, unit="conversations/s", units_per_step=32, skip_steps=0)
    meter.start()
    dt = meter.stop(4)
    line = meter.line(4, 2.0, 0.5, dt)
    assert "| conversations/s " in line and "| mfu n/a |" in line and "tok/s" not in line
    assert meter.eta_seconds(4) == pytest.approx(5 * dt)
    timing_only = ProgressMeter(10).line(0, 2.0, 0.5, 0.25)
    assert timing_only == "step 00001/00010 (10.00%) | loss 2.000000 | lrm 0.50 | dt 250ms | eta ?"


def test_progress_meter_with_a_unit_count_per_step():
    """SFT and RL steps differ in tokens: each step's count comes with it, MFU follows the count."""
    meter = ProgressMeter(10, unit="tok/s", flops_per_unit=1e9, peak_flops=1e13)  # no units_per_step
    assert meter.line(0, 2.0, 1.0, 0.5, units=1000) == ("step 00001/00010 (10.00%) | loss 2.000000 | lrm 1.00 | "
                                                        "dt 500ms | tok/s 2,000 | mfu 20.0% | eta ?")
    assert "| tok/s 6,000 | mfu 60.0% |" in meter.line(1, 2.0, 1.0, 0.5, units=3000)
    assert meter.rate(0.5, units=3000) == 6000 and meter.mfu(0.5, units=3000) == pytest.approx(60.0)
    # a step whose tokens cost different FLOPs (RL: sampled ones only run forward) gives its FLOPs
    assert meter.speed(0.5, units=1000, flops=2.5e12) == "tok/s 2,000 | mfu 50.0%"
    no_peak = ProgressMeter(10, unit="tok/s", flops_per_unit=1e9)  # CPU: the peak is unknown
    assert "| tok/s 2,000 | mfu n/a |" in no_peak.line(0, 2.0, 1.0, 0.5, units=1000)
    assert no_peak.mfu(0.5, flops=1e12) is None


def test_should_save_and_should_compile():
    assert [s for s in range(0, 11) if should_save(s, 0, s == 10, 4)] == [4, 8, 10]
    assert [s for s in range(4, 11) if should_save(s, 4, s == 10, 4)] == [8, 10]  # resumed at 4: not again
    assert [s for s in range(0, 11) if should_save(s, 0, s == 10, -1)] == [10]
    assert should_compile(None, "cuda") and not should_compile(None, "cpu") and not should_compile(None, "mps")
    assert not should_compile(None, "cpu", num_iterations=99)  # a short CPU run: the compile would not pay off
    assert should_compile(None, "cpu", num_iterations=100) == bool(shutil.which("g++") or shutil.which("c++"))
    assert should_compile(True, "cpu") and not should_compile(False, "cuda")


def test_grad_accum_steps_name_the_flags():
    assert get_grad_accum_steps("--total-batch-size", 512, {"--device-batch-size": 2, "--max-seq-len": 64,
                                                            "processes": 2}) == 2
    with pytest.raises(ValueError, match=r"--target-examples-per-step 6 is not a multiple of --device-batch-size x "
                                         r"processes = 4 x 1 = 4"):
        get_grad_accum_steps("--target-examples-per-step", 6, {"--device-batch-size": 4, "processes": 1})


def test_setup_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    stage = setup_stage("mid", "cpu", "dummy", {}, compile_flag=None)
    assert "device: cpu x 1 | dtype: torch.float32 | compile: False" in capsys.readouterr().out
    assert (stage.device.type, stage.world_size, stage.master_process, stage.use_compile, stage.peak_flops) == \
        ("cpu", 1, True, False, None)
    stage.model_tag = "d7"
    assert stage.checkpoint_dir == str(tmp_path / "mid_checkpoints" / "d7")
    with pytest.raises(ValueError, match="--device-type"):
        setup_stage("base", "tpu", "dummy", {})


# -----------------------------------------------------------------------------
# scripts/base_train.py

def test_training_lowers_loss_and_writes_checkpoints(tmp_path):
    base = make_base_dir(str(tmp_path / "run"))
    write_bundle(os.path.join(base, "eval_bundle"))
    proc = run_train(base, *train_args(**{"num-iterations": 24, "eval-every": 12, "sample-every": 24,
                                          "core-metric-every": 12}))
    loss = losses(proc.stdout)
    assert sorted(loss) == list(range(1, 25))
    assert loss[24] < loss[1] - 0.5, loss
    bpb = val_bpbs(proc.stdout)
    assert bpb[24] < bpb[0], bpb
    assert "parameters:" in proc.stdout and "grad" not in proc.stderr.lower()  # the plan is printed
    assert "sample:" in proc.stdout
    core = re.findall(r"step (\d+) \| CORE metric: (-?[\d.]+)", proc.stdout)
    assert [int(step) for step, _ in core] == [12, 24] and all(-1 <= float(v) <= 1 for _, v in core)
    ckpt = os.path.join(base, "base_checkpoints", "d2")
    assert sorted(os.listdir(ckpt)) == [f"{kind}_{step:06d}{ext}" for kind, ext in
                                        (("meta", ".json"), ("model", ".pt"), ("optim", "_rank0.pt"))
                                        for step in (16, 20, 24)]  # saved every 4 steps, the last 3 kept
    assert os.path.exists(os.path.join(base, "report", "base-model-training.md"))

    # base_loss reads the last checkpoint back and measures it
    proc = subprocess.run([sys.executable, "-m", "scripts.base_loss", "--device-batch-size", str(B),
                           "--split-tokens", str(4 * B * T)], cwd=REPO, env=run_env(base), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Loaded base model d2 step 24" in proc.stdout
    split_bpb = {m.group(1): float(m.group(2)) for m in re.finditer(r"(train|val) bpb: ([\d.]+)", proc.stdout)}
    assert split_bpb["val"] == pytest.approx(bpb[24], abs=1e-3)  # same data, same model as the final eval
    assert 0 < split_bpb["train"] < 8
    assert os.path.exists(os.path.join(base, "report", "base-model-loss.md"))


@pytest.mark.parametrize("recipe", ["nov2025", "dec2026", "jan2026"])
def test_killed_run_resumes_bit_identical(tmp_path, recipe):
    straight = make_base_dir(str(tmp_path / "straight"))
    killed = make_base_dir(str(tmp_path / "killed"))
    # dec2026: best-fit packing, NorMuon, scheduled weight decay; jan2026: the modern arch too
    args = [*train_args(), f"--recipe={recipe}"]
    reference = run_train(straight, *args)

    # start the same run, SIGKILL it as soon as the step-4 checkpoint is complete, then resume
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *args], cwd=REPO,
                            env=run_env(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = os.path.join(killed, "base_checkpoints", "d2", "meta_000004.json")
    deadline = time.time() + 300
    while not os.path.exists(meta) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(meta)
    # the last complete checkpoint (its meta file is written last): 4, or 8 if the kill came late
    ckpt = os.path.join(killed, "base_checkpoints", "d2")
    last = find_last_step(ckpt)
    assert last < 12, "the run finished before the kill: nothing to resume"
    resumed = run_train(killed, *args, "--resume")
    # a resume, not a restart: it loaded step `last`, and ran exactly the steps after it
    assert f"resumed from {ckpt} step {last}\n" in resumed.stdout
    ref_loss, res_loss = losses(reference.stdout), losses(resumed.stdout)
    assert sorted(res_loss) == list(range(last + 1, 13)), sorted(res_loss)
    for step in res_loss:
        assert res_loss[step] == ref_loss[step], (step, res_loss[step], ref_loss[step])
    a, b = load_model_state(straight, 12), load_model_state(killed, 12)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_keeps_the_recipe_the_run_started_with(tmp_path):
    base = make_base_dir(str(tmp_path / "run"))
    run_train(base, *train_args(**{"num-iterations": 4}), "--recipe=nov2025")
    # a new default (no --recipe) does not change a run half-way: the stream loader state resumes as it was
    resumed = run_train(base, *train_args(**{"num-iterations": 6}), "--resume")
    assert "resume: keeping recipe nov2025" in resumed.stdout and "recipe nov2025: Muon newton_schulz" in resumed.stdout
    assert max(losses(resumed.stdout)) == 6
    # another recipe given explicitly is refused, naming the one to use
    other = run_train(base, *train_args(**{"num-iterations": 8}), "--resume", "--recipe=dec2026", check=False)
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert "this run started with recipe nov2025. Resume it with --recipe nov2025" in other.stderr
    # checkpoints from before recipes were recorded are nov2025's
    meta_path = os.path.join(base, "base_checkpoints", "d2", "meta_000006.json")
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["user_config"]["recipe"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    older = run_train(base, *train_args(**{"num-iterations": 8}), "--resume")
    assert "resume: keeping recipe nov2025" in older.stdout and max(losses(older.stdout)) == 8


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    base = make_base_dir(str(tmp_path / "run"))
    proc = run_train(base, *train_args(), "--resume", check=False)
    assert proc.returncode != 0
    assert "cannot resume" in proc.stderr and "Traceback" not in proc.stderr


def test_indivisible_batch_is_a_clear_error(tmp_path):
    base = make_base_dir(str(tmp_path / "run"))
    proc = run_train(base, *train_args(**{"total-batch-size": 3 * B * T + 1}), check=False)
    assert proc.returncode != 0
    assert "--total-batch-size" in proc.stderr and "Traceback" not in proc.stderr


def test_the_plan_is_the_run(tmp_path):
    """scripts.plan (what speedrun_dgx.sh prints) and base_train size a run with the same
    run_shape: a preset's defaults under the user's flags, extra arguments included."""
    base = make_base_dir(str(tmp_path / "run"))
    user = ["--depth", "2", "--max-seq-len", str(T), "--device-batch-size", str(B), "--total-batch-size",
            str(2 * B * T), "--num-iterations", "3", "--save-every", "-1"]
    plan = subprocess.run([sys.executable, "-m", "scripts.plan", "--preset", "tiny", "--", *user], cwd=REPO,
                          env=run_env(base), capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr
    proc = run_train(base, "--preset", "tiny", *user)
    assert "model: d2 " in proc.stdout and sorted(losses(proc.stdout)) == [1, 2, 3]
    assert f"pretraining (--num-iterations): 3 steps x {2 * B * T:,} tokens" in plan.stdout
    assert f"horizon (--num-iterations): 3 steps, {3 * 2 * B * T:,} tokens" in proc.stdout
    assert f"= {B} x {T} x 1 processes x 2 accumulation steps" in plan.stdout
    assert f"= {B} x {T} x 1 processes x 2 accumulation steps" in proc.stdout


@pytest.mark.slow
def test_torchrun_two_processes_match_one_with_accumulation(tmp_path):
    one = make_base_dir(str(tmp_path / "one"))
    two = make_base_dir(str(tmp_path / "two"))
    # one global order of rows (dataloader.py): rank r reads the row 1 process reads r-th in each
    # step, for best-fit rows (the default) as for the plain stream (tests/test_dataloader.py)
    args = train_args(**{"num-iterations": 8, "eval-every": 4, "save-every": 4})
    single = run_train(one, *args)  # 1 process x 2 micro-batches
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m")
    double = run_train(two, *args, launcher=torchrun)  # 2 processes x 1 micro-batch
    assert "x 2 processes x 1 accumulation steps" in double.stdout
    l1, l2 = losses(single.stdout), losses(double.stdout)
    assert sorted(l1) == sorted(l2) == list(range(1, 9))
    for step in l1:
        assert l1[step] == pytest.approx(l2[step], abs=1e-4), (step, l1[step], l2[step])
    b1, b2 = val_bpbs(single.stdout), val_bpbs(double.stdout)
    assert b1.keys() == b2.keys()
    for step in b1:
        assert b1[step] == pytest.approx(b2[step], abs=1e-4)
    a, b = load_model_state(one, 8), load_model_state(two, 8)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-3)

    # resume under torchrun: drop the final checkpoint, resume both ranks from step 4
    ckpt = os.path.join(two, "base_checkpoints", "d2")
    for name in ("meta_000008.json", "model_000008.pt", "optim_000008_rank0.pt", "optim_000008_rank1.pt"):
        os.remove(os.path.join(ckpt, name))
    resumed = run_train(two, *args, "--resume", launcher=torchrun)
    assert "resumed from" in resumed.stdout
    l3 = losses(resumed.stdout)
    assert sorted(l3) == [5, 6, 7, 8]
    for step in l3:
        assert l3[step] == l2[step], (step, l3[step], l2[step])
    c = load_model_state(two, 8)
    for k in b:
        assert torch.equal(b[k], c[k]), k


# -----------------------------------------------------------------------------
# The GPU's defaults on the CPU: bf16 autocast (NANOCHAT_DTYPE=bfloat16 overrides the CPU's fp32)
# and torch.compile (--compile; inductor builds C++ kernels on the CPU)

# bf16 rounds every matmul's inputs to 8 significant bits (relative 2^-9 ~ 0.2%), and the runs'
# weights drift apart a little with each step. Measured over these 8 steps: bf16 vs fp32 differ by
# <= 7e-4 in the (smoothed) loss and <= 3e-3 in val bpb, compiled vs eager bf16 by <= 2e-4 and
# <= 1.4e-3. 0.02 leaves room for other CPUs' bf16 kernels; a broken precision path (say, logits
# left in bf16 for the loss) or a compiled graph computing something else shows as far more.
STAGE_ATOL = 0.02
PRECISION_ARGS = train_args(**{"num-iterations": 8, "eval-every": 4, "save-every": -1})  # val bpb at 0, 4, 8


@pytest.fixture(scope="module")
def fp32_and_bf16_runs(tmp_path_factory):
    """base_train for 8 steps in fp32 and in bf16 autocast, uncompiled, side by side: {dtype: stdout}."""
    procs = {dtype: start_stage(make_base_dir(str(tmp_path_factory.mktemp(dtype) / "run")), "scripts.base_train",
                                *PRECISION_ARGS, "--no-compile", NANOCHAT_DTYPE=dtype)
             for dtype in ("float32", "bfloat16")}
    return {dtype: finish_stage(proc)[0] for dtype, proc in procs.items()}


def assert_runs_agree(stdout, reference, atol=STAGE_ATOL):
    """Same steps and evaluations, every loss and val bpb finite and within atol of the reference run's."""
    for curve in (losses, val_bpbs):
        got, want = curve(stdout), curve(reference)
        assert sorted(got) == sorted(want) and got, (got, want)
        for step in want:
            assert math.isfinite(got[step]) and abs(got[step] - want[step]) <= atol, (curve.__name__, step, got, want)


@pytest.mark.slow
def test_bf16_autocast_training_follows_fp32(fp32_and_bf16_runs):
    fp32, bf16 = fp32_and_bf16_runs["float32"], fp32_and_bf16_runs["bfloat16"]
    assert "| dtype: torch.float32 |" in fp32 and "| dtype: torch.bfloat16 |" in bf16
    assert sorted(val_bpbs(bf16)) == [0, 4, 8] and sorted(losses(bf16)) == list(range(1, 9))
    assert_runs_agree(bf16, fp32)
    assert losses(bf16)[8] < losses(bf16)[1] - 0.5  # and it learns


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")),
                    reason="torch.compile on the CPU (inductor) builds C++ kernels: no C++ compiler found "
                           "(apt-get install g++, or set CXX)")
def test_compiled_bf16_training_compiles_twice_and_follows_eager(fp32_and_bf16_runs, tmp_path):
    """base_train --compile in bf16 (the GPU's defaults) with val bpb before, between and after the
    steps. Dynamo traces GPT.forward exactly twice: once for evaluation (eval mode, no grad,
    per-token losses) at step 0, and once more when training starts (grad mode on: the recompile's
    guard failure). Every later step and evaluation reuses one of the two graphs: no recompile per
    step, none at the train/eval switches, no graph break. The losses follow the eager bf16 run."""
    base = make_base_dir(str(tmp_path / "run"))
    stdout, stderr = finish_stage(start_stage(base, "scripts.base_train", *PRECISION_ARGS, "--compile",
                                              NANOCHAT_DTYPE="bfloat16", TORCH_LOGS="dynamo,recompiles,graph_breaks"))
    assert "| dtype: torch.bfloat16 | compile: True" in stdout
    traced = re.findall(r"torchdynamo start tracing (\S+) (\S+):\d+", stderr)
    assert traced == [("forward", os.path.join(REPO, "nanochat", "gpt.py"))] * 2, (traced, stderr[-3000:])
    recompiles = re.findall(r"Recompiling function (\S+) .*\n.*triggered by.*\n.*?- 0/0: (.*)", stderr)
    assert len(recompiles) == 1 and recompiles[0][0] == "forward" and "grad_mode" in recompiles[0][1], recompiles
    assert "Graph break" not in stderr
    assert_runs_agree(stdout, fp32_and_bf16_runs["bfloat16"])
