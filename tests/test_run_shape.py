"""
nanochat/run_shape.py, the one source of a run's shape, and the shell layer that asks it:
presets fill defaults but never override the user, impossible combinations are refused by
name, GPU-sized defaults stay off the CPU, and the plan the shell prints is the run.
"""

import os
import subprocess
import sys

import pytest

from nanochat.run_shape import PRESETS, RunShapeError, auto_device_batch_size, run_shape

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_preset_is_upstreams_d20_speedrun():
    shape = run_shape("gpu", "cuda", gpu_memory_gib=79.1)  # an 80 GB H100 reports ~79 GiB
    assert shape.num_params == 560_988_160 and shape.num_iterations == 21_400  # 20 tokens per parameter
    assert (shape.device_batch_size, shape.max_seq_len, shape.total_batch_size) == (32, 2048, 524_288)
    assert shape.grad_accum_steps == 8 and shape.eval_tokens == 20 * 524_288
    assert shape.horizon.startswith("--target-param-data-ratio")


def test_presets_fill_defaults_and_the_user_wins():
    tiny = run_shape("tiny")
    assert (tiny.depth, tiny.max_seq_len, tiny.num_iterations, tiny.data) == (4, 512, 24, "offline")
    d8 = run_shape("tiny", depth=8)
    assert d8.depth == 8 and d8.model_tag == "d8" and d8.num_params > tiny.num_params
    assert d8.num_iterations == 24  # the rest of the preset stays
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


def test_gpu_sized_defaults_stay_off_the_cpu():
    cpu = run_shape("gpu", "cpu", depth=4)
    assert cpu.device_batch_size == 4 and cpu.eval_tokens == 8 * 4 * 2048  # not 10.5M tokens
    assert run_shape("gpu", "cpu", depth=4, eval_tokens=1_000_000).eval_tokens == 1_000_000  # unless asked for


def test_auto_device_batch_size_fits_memory_and_divides_the_step():
    assert auto_device_batch_size(20, 2048, 524_288, 1, 79) == 32  # H100 80 GB
    assert auto_device_batch_size(20, 2048, 524_288, 1, 119) == 32  # GB10 128 GB (upstream's max)
    assert auto_device_batch_size(32, 2048, 524_288, 1, 79) == 8
    assert auto_device_batch_size(20, 2048, 524_288, 1, 20) == 8
    assert auto_device_batch_size(60, 2048, 524_288, 1, 8) == 1
    assert auto_device_batch_size(20, 2048, 3 * 2048 * 4, 1, 79) == 4  # halved until it divides the step


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
    assert base_args == "--preset tiny --depth 8 --device-batch-size 8"
    assert mid_args.startswith("--num-iterations 12")
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
