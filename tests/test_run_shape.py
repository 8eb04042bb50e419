"""
nanochat/run_shape.py, the one source of a run's shape, and the shell layer that asks it:
presets fill defaults but never override the user, impossible combinations are refused by
name, GPU-sized defaults stay off the CPU, and the plan the shell prints is the run.
"""

import os
import subprocess
import sys

import pytest

from nanochat.run_shape import (PRESETS, RunShapeError, auto_device_batch_size, memory_budget, power_lines_batch_size,
                                predict_peak_memory, run_shape)

GiB = 2**30

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_preset_is_upstreams_d20_speedrun():
    shape = run_shape("gpu", "cuda", gpu_memory_gib=139.8)  # an H200 (141 GB) reports ~139.8 GiB
    assert shape.num_params == 560_988_160 and shape.num_iterations == 21_400  # 20 tokens per parameter
    assert (shape.device_batch_size, shape.max_seq_len, shape.total_batch_size) == (32, 2048, 524_288)
    assert shape.grad_accum_steps == 8 and shape.eval_tokens == 20 * 524_288
    assert shape.horizon.startswith("--target-param-data-ratio")


def test_presets_fill_defaults_and_the_user_wins():
    tiny = run_shape("tiny")
    assert (tiny.depth, tiny.max_seq_len, tiny.num_iterations, tiny.data) == (4, 512, 48, "offline")
    d8 = run_shape("tiny", depth=8)
    assert d8.depth == 8 and d8.model_tag == "d8" and d8.num_params > tiny.num_params
    assert d8.num_iterations == 48  # the rest of the preset stays
    assert run_shape("tiny", num_iterations=5).num_iterations == 5
    assert run_shape("smoke", device_batch_size=2).grad_accum_steps == 4


def test_impossible_combinations_are_refused_by_name():
    with pytest.raises(RunShapeError, match=r"--device-batch-size 3.*smoke preset"):
        run_shape("smoke", device_batch_size=3)
    with pytest.raises(RunShapeError, match="--depth must be >= 1"):
        run_shape("tiny", depth=0)
    with pytest.raises(RunShapeError, match="gives 0 steps"):
        run_shape("gpu", depth=2, target_param_data_ratio=0.001)
    with pytest.raises(RunShapeError, match="unknown preset"):
        run_shape("huge")
    with pytest.raises(TypeError):
        run_shape("gpu", depht=20)


def test_jan2026_recipe_sizes_the_batch_by_power_lines_and_counts_matmul_parameters():
    # upstream's table (dev/LOG.md 2026-02-05, vocab 32K): d8 2^18, d10-16 2^19, d18-26 2^20
    sizes = {d: run_shape("gpu", "cuda", gpu_memory_gib=80, recipe="jan2026", depth=d, vocab_size=32768)
             for d in (8, 12, 16, 20, 26)}
    assert [s.total_batch_size for s in sizes.values()] == [2**18, 2**19, 2**19, 2**20, 2**20]
    d20 = sizes[20]
    assert d20.arch == "modern" and d20.horizon.startswith("--target-param-data-ratio 12")
    assert d20.ratio_params < d20.num_params  # the value embeddings are not counted
    assert d20.tokens == pytest.approx(12 * d20.ratio_params, rel=d20.total_batch_size / d20.tokens)
    # the user's batch and architecture win; Power Lines needs a horizon in tokens
    assert run_shape("gpu", "cpu", recipe="jan2026", total_batch_size=2**19).total_batch_size == 2**19
    assert run_shape("gpu", "cpu", recipe="jan2026", arch="classic").arch == "classic"
    with pytest.raises(RunShapeError, match="horizon must be in tokens"):
        run_shape("tiny", recipe="jan2026", total_batch_size=-1)
    tiny = run_shape("tiny", total_batch_size=-1, num_iterations=-1, target_flops=1e12)
    assert tiny.total_batch_size == power_lines_batch_size(1e12 / tiny.flops_per_token, 20 * run_shape(
        "tiny", depth=12).num_params)
    assert tiny.total_batch_size % (tiny.device_batch_size * 512) == 0
    with pytest.raises(RunShapeError, match="unknown --recipe 'dec2099'"):
        run_shape("gpu", recipe="dec2099")


def test_power_lines_batch_grows_as_tokens_to_the_0_383():
    assert power_lines_batch_size(1e9, 1e9) == 2**19
    assert power_lines_batch_size(10e9, 1e9) == 2**20  # 10x the tokens: 2.4x the batch, rounded to a power of two
    assert power_lines_batch_size(1e9 * 2 ** (1 / 0.383), 1e9) == 2**20


def test_gpu_sized_defaults_stay_off_the_cpu():
    cpu = run_shape("gpu", "cpu", depth=4)
    assert cpu.device_batch_size == 4 and cpu.eval_tokens == 8 * 4 * 2048  # not 10.5M tokens
    assert run_shape("gpu", "cpu", depth=4, eval_tokens=1_000_000).eval_tokens == 1_000_000  # unless asked for


def test_auto_device_batch_size_fits_the_memory_model_and_divides_the_step():
    h100, h200 = memory_budget(int(79.1 * GiB), False), memory_budget(int(139.8 * GiB), False)
    assert auto_device_batch_size(20, 2048, 524_288, 1, h200) == 32
    assert auto_device_batch_size(20, 2048, 524_288, 1, h100) == 16  # the model predicts 95 GiB for 32
    assert auto_device_batch_size(12, 2048, 524_288, 1, h100) == 32
    assert auto_device_batch_size(60, 2048, 524_288, 1, 8 * GiB) == 1  # nothing fits: 1, and base_train says so
    assert auto_device_batch_size(20, 2048, 3 * 2048 * 4, 1, h200) == 4  # halved until it divides the step
    for depth in (4, 12, 20, 26, 32):
        for budget in (h100, h200):
            bs = auto_device_batch_size(depth, 2048, 524_288, 1, budget)
            assert bs == 1 or predict_peak_memory(depth, 2048, bs).total <= budget
            assert bs == 32 or predict_peak_memory(depth, 2048, 2 * bs).total > budget


def test_memory_model_terms():
    one, two = predict_peak_memory(20, 2048, 8), predict_peak_memory(20, 2048, 16)
    assert two.activations == 2 * one.activations and two.logits == 2 * one.logits  # per token
    assert two.weights == one.weights == 4 * 560_988_160 and one.grads == one.weights  # fp32
    assert predict_peak_memory(20, 2048, 8, world_size=8).optimizer == one.optimizer // 8  # sharded
    assert predict_peak_memory(20, 2048, 8, bf16=False, compile=False).weight_copies == 0
    assert predict_peak_memory(20, 2048, 8, compile=False).total > one.total  # compile recomputes


def test_memory_model_matches_what_autograd_saves():
    """The saved-tensor constants, measured here on shapes the fit never saw (a d5 with 4 heads
    of 80, vocab 1000, 3 x 96 tokens): the prediction's saved part is within 3% of the bytes
    autograd really keeps. Fails when the model's forward starts keeping more (or less)."""
    from bench.memory_model import build_model, saved_tensor_bytes
    from nanochat.run_shape import LOGITS_BACKWARD_BYTES
    for bf16 in (True, False):
        model = build_model(5, 1000, 96, "cpu")
        measured = saved_tensor_bytes(model, 3, bf16, compile=False)
        est = predict_peak_memory(5, 96, 3, 1000, bf16=bf16, compile=False)
        predicted = est.weight_copies + est.activations + est.logits - 3 * 96 * 1000 * LOGITS_BACKWARD_BYTES[bf16, False]
        assert abs(predicted / measured - 1) < 0.03, (bf16, predicted, measured)


def test_unified_memory_budget_is_conservative():
    """GB10: 128 GB shared with the OS; the budget leaves 24 GiB to the system and a larger
    margin than on a discrete card of the same size."""
    gb10 = 119.7 * GiB  # psutil's total on a DGX Spark
    assert memory_budget(int(gb10), True) < memory_budget(int(gb10), False) - 24 * GiB
    spark = run_shape("gpu", "cuda", gpu_memory_gib=119.7, unified=True)
    assert spark.memory_budget == memory_budget(int(gb10), True)
    assert spark.peak_memory.total <= spark.memory_budget
    assert run_shape("gpu", "cuda", gpu_memory_gib=119.7, unified=True, device_batch_size=32).device_batch_size == 32


def test_every_preset_resolves():
    for preset in PRESETS:
        shape = run_shape(preset, "cpu")
        assert shape.tokens == shape.num_iterations * shape.total_batch_size > 0
        assert set(shape.stage_args) == {"tok", "loss", "mid", "sft", "rl", "eval"}


def shell(*flags, base_dir):
    """Source common.sh as speedrun_dgx.sh does and print the shape variables it got."""
    script = ('source common.sh; parse_flags "$@"; setup_env; '
              'echo "$model_tag|$seq_len|$device_batch_size|$data|${base_args[*]}|${mid_args[*]}"')
    return subprocess.run(["bash", "-c", script, "shell", *flags], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}, timeout=120)


@pytest.mark.slow
def test_shell_layer_takes_its_shape_from_python(tmp_path):
    out = shell("--tiny", "--depth", "8", base_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    model_tag, seq_len, dbs, data, base_args, mid_args = out.stdout.strip().split("|")
    assert (model_tag, seq_len, dbs, data) == ("d8", "512", "8", "offline")  # --tiny --depth 8 is a d8
    assert base_args == "--preset tiny --depth 8 --device-batch-size 8"  # no --recipe: a resume keeps its own
    assert mid_args.startswith("--num-iterations 12")
    out = shell("--tiny", "--recipe", "jan2026", base_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("|")[4] == "--preset tiny --recipe jan2026 --depth 4 --device-batch-size 8"
    bad = shell("--smoke", "--device-batch-size", "3", base_dir=tmp_path)
    assert bad.returncode != 0 and "--device-batch-size 3" in bad.stderr and "Traceback" not in bad.stderr
    online = shell("--tiny", "--data", "online", base_dir=tmp_path)
    assert online.returncode != 0 and "cannot run with --data online" in online.stderr


@pytest.mark.slow
def test_plan_sees_the_extra_arguments():
    out = subprocess.run([sys.executable, "-m", "scripts.plan", "--preset", "tiny", "--", "--num-iterations", "5",
                          "--init-lr-frac", "0.5"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pretraining (--num-iterations): 5 steps x 8,192 tokens" in out.stdout


def test_gb10_device_properties_give_the_unified_budget(monkeypatch):
    """A faked GB10 (integrated, 128 GB of system memory; cudaMemGetInfo would say less): run_shape
    reads the system total through common.gpu_memory_bytes and sizes the batch for the unified
    budget, not for the card's reported memory."""
    import types

    import psutil
    import torch
    props = types.SimpleNamespace(name="NVIDIA GB10", total_memory=40 * GiB, is_integrated=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(total=int(119.7 * GiB)))
    spark = run_shape("gpu", "cuda", depth=20)
    assert spark.memory_budget == memory_budget(int(119.7 * GiB), True)
    assert spark.device_batch_size == 16 and spark.peak_memory.total <= spark.memory_budget
    props.name, props.is_integrated = "NVIDIA H100 80GB HBM3", False  # a discrete card: its own memory
    props.total_memory = int(79.1 * GiB)
    assert run_shape("gpu", "cuda", depth=20).memory_budget == memory_budget(int(79.1 * GiB), False)
