"""
base_train on a CUDA out-of-memory error (injected here: the model's training forward raises
torch.OutOfMemoryError for batches above a limit, as a GPU whose memory fits only that would):
the run halves the device batch, doubles the gradient accumulation, goes back to its last
checkpoint (or the fresh model) and ends where an uninterrupted run ends, instead of crashing.
"""

import subprocess
import sys

from test_base_train import B, REPO, losses, make_base_dir, run_env, train_args

# Runs base_train with GPT.forward raising torch.OutOfMemoryError once more than `after`
# training forwards have run, for every batch larger than `limit` rows.
INJECT = """
import runpy, sys, torch
from nanochat import gpt
limit, after = int(sys.argv[1]), int(sys.argv[2])
calls = [0]
forward = gpt.GPT.forward
def forward_with_limited_memory(self, idx, targets=None, **kwargs):
    if torch.is_grad_enabled() and targets is not None:
        calls[0] += 1
        if calls[0] > after and idx.size(0) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
    return forward(self, idx, targets, **kwargs)
gpt.GPT.forward = forward_with_limited_memory
sys.argv = ["scripts.base_train", *sys.argv[3:]]
runpy.run_module("scripts.base_train", run_name="__main__")
"""


def run_with_oom(base_dir, limit, after, *args):
    proc = subprocess.run([sys.executable, "-c", INJECT, str(limit), str(after), *args], cwd=REPO,
                          env=run_env(base_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_out_of_memory_halves_the_batch_and_goes_on_from_the_last_checkpoint(tmp_path):
    base_dir = make_base_dir(str(tmp_path / "base"))
    args = train_args(**{"device-batch-size": 2 * B, "total-batch-size": 4 * B * 32, "num-iterations": 8,
                         "save-every": 3, "eval-every": 4})
    reference = run_with_oom(base_dir, 99, 0, *args, "--model-tag=reference")  # never runs out
    # the 9th training forward is step 5's first micro-batch: after the checkpoint at step 3;
    # then only batches of B/2 rows fit, so the run halves twice (2B -> B, back at step 3, -> B/2)
    out = run_with_oom(base_dir, B // 2, 8, *args, "--model-tag=oom")
    assert "out of GPU memory at step 5 with --device-batch-size 4; going on with 2 and 4 accumulation steps" in out
    assert "out of GPU memory at step 4 with --device-batch-size 2; going on with 1 and 8 accumulation steps" in out
    assert out.count("resumed from") == 2 and "step 3" in out.split("resumed from")[1].splitlines()[0]
    ref, got = losses(reference), losses(out)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    # the same rows per optimizer step: the same curve, up to the summation order of the gradient, which
    # NorMuon's per-neuron normalisation and (on AMX CPUs) the bf16 orthogonalisation carry into the
    # 4th decimal by step 8 (measured 4e-4 at step 7); wrong rows would differ by 1e-2 or more
    for step in ref:
        assert abs(got[step] - ref[step]) < 2e-3, (step, got[step], ref[step])


def test_out_of_memory_before_any_checkpoint_starts_over_smaller(tmp_path):
    base_dir = make_base_dir(str(tmp_path / "base"))
    args = train_args(**{"num-iterations": 4, "save-every": -1, "eval-every": -1})
    reference = run_with_oom(base_dir, 99, 0, *args, f"--device-batch-size={B // 2}", "--model-tag=reference")
    out = run_with_oom(base_dir, B // 2, 0, *args, "--model-tag=oom")  # the very first forward runs out
    assert f"going on with {B // 2} and 4 accumulation steps" in out
    ref, got = losses(reference), losses(out)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:  # the same initial weights (re-initialised from the same RNG state) and tokens
        assert abs(got[step] - ref[step]) < 1e-5, (step, got[step], ref[step])


def test_out_of_memory_at_batch_one_stops_with_advice(tmp_path):
    base_dir = make_base_dir(str(tmp_path / "base"))
    proc = subprocess.run([sys.executable, "-c", INJECT, "0", "0", *train_args(**{"num-iterations": 2}),
                           "--device-batch-size=1"], cwd=REPO, env=run_env(base_dir), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "even with --device-batch-size 1; pick a smaller --depth or --max-seq-len" in proc.stderr


def test_halving_keeps_the_tokens_per_step_for_any_batch_size():
    from nanochat.training import halve_device_batch
    for batch, accumulation in ((32, 1), (12, 2), (6, 4), (3, 8), (7, 1)):
        smaller, more = halve_device_batch("base_train", 0, batch, accumulation, 1)
        assert smaller <= batch // 2 and smaller * more == batch * accumulation
    assert halve_device_batch("base_train", 0, 12, 2, 1) == (6, 4)
    assert halve_device_batch("base_train", 0, 3, 8, 1) == (1, 24)
