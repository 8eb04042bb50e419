"""
validate_env.py: the decision of every check on hand-made facts (unknown GPU, low disk, no
venv, GB10's ptxas, unified memory, ...), the run's size for a known depth, and the script
itself run on this machine: table, --json, and an exit status that matches the FAIL rows.
"""

import json
import os
import subprocess
import sys

import pytest

import validate_env as ve
from nanochat.run_shape import model_size

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_NAMES = ["OS/arch", "Python", "venv", "packages", "optional packages", "GPU", "compute capability", "memory",
             "torch CUDA build", "bf16", "Triton/ptxas", "disk", "data", "wandb", "batch"]
GB10 = {"name": "NVIDIA GB10", "count": 1, "capability": (12, 1), "memory_bytes": 128 * 2**30, "unified": True}
H100 = {"name": "NVIDIA H100 80GB HBM3", "count": 1, "capability": (9, 0), "memory_bytes": 80 * 2**30, "unified": False}


def test_wall_time_estimate_needs_a_known_gpu():
    assert ve.estimate_wall_time(1e18, None) is None  # CPU
    assert ve.estimate_wall_time(1e18, "Some Future GPU 9000") is None
    assert ve.estimate_wall_time(1e18, H100["name"]) == pytest.approx(1e18 / (989e12 * 0.4))


def test_d20_size_and_gb10_estimate():
    params, flops_per_token, state_bytes, optimizer_bytes, _ = model_size(20, 65536, 2048)
    assert params == 560_988_160  # upstream's "d20 is 561M parameters"
    adamw = 2 * 65536 * 1280  # wte + lm_head
    assert optimizer_bytes == 8 * adamw + 4 * (params - adamw)
    assert state_bytes == 8 * params + optimizer_bytes
    days = ve.estimate_wall_time(flops_per_token * 20 * params, GB10["name"]) / 86400
    assert 5 < days < 15  # seeds report 9-10 days for d20 on a DGX Spark


def test_disk_estimate_and_decision():
    need, detail, shards = ve.estimate_disk(params=1e9, optimizer_bytes=5e9, tokens=20e9, shards_present=10,
                                            download=True, save_every=1000, total_batch_size=524288)
    assert shards == 385  # ceil(20e9 * 4.8 / 250e6) + 1 validation shard
    checkpoints = 4 + ve.CHAT_CHECKPOINTS  # 39 base saves, of which the last 3 are kept (+1 while saving)
    assert need == pytest.approx(375 * 100e6 + checkpoints * 9e9)
    assert "375 shards" in detail
    offline_need, _, _ = ve.estimate_disk(1e9, 5e9, 20e9, 10, download=False, save_every=1000,
                                          total_batch_size=524288)
    assert offline_need == pytest.approx(checkpoints * 9e9)
    assert ve.check_disk(free_bytes=10e9, need_bytes=need, path="/data", detail=detail).status == "FAIL"
    ok = ve.check_disk(free_bytes=2 * need, need_bytes=need, path="/data", detail=detail)
    assert ok.status == "PASS" and "/data" in ok.reason


def test_venv_decision(tmp_path):
    project = str(tmp_path / ".venv")
    assert ve.check_venv(project, "/usr", project).status == "PASS"
    other = ve.check_venv("/opt/conda/envs/x", "/usr", project)
    assert other.status == "WARN" and "uv sync" in other.fix
    none = ve.check_venv("/usr", "/usr", project)
    assert none.status == "FAIL" and "uv sync" in none.fix


def test_os_python_packages():
    assert ve.check_os("Linux", "aarch64").status == "PASS"
    assert ve.check_os("Darwin", "arm64").status == "WARN"
    assert ve.check_python((3, 10, 0)).status == "PASS"
    assert ve.check_python((3, 9, 18)).status == "FAIL"

    def fake_import(name):
        if name in ("rustbpe", "pynvml"):
            raise ImportError(f"No module named {name!r}")
    packages = ve.check_packages(fake_import)
    assert packages.status == "FAIL" and "rustbpe" in packages.reason and "torch" not in packages.reason
    optional = ve.check_optional_packages(fake_import)
    assert optional.status == "WARN" and "pynvml" in optional.reason and "matplotlib" not in optional.reason


def test_gpu_rows_on_cpu_skip_or_warn():
    assert ve.check_gpu(None).status == "WARN"
    for check in (ve.check_capability(None), ve.check_torch_cuda("13.0", None, []), ve.check_bf16(None, False),
                  ve.check_triton(None, None, None, None)):
        assert check.status == "SKIP"


def test_memory_decision():
    from nanochat.run_shape import run_shape
    d32_cpu = run_shape("gpu", "cpu", depth=32)
    small = ve.check_memory(None, system_memory_bytes=8 * 2**30, shape=d32_cpu)
    assert small.status == "FAIL" and "--depth" in small.fix
    spark = run_shape("gpu", "cuda", gpu_memory_gib=128, unified=True, depth=20)
    unified = ve.check_memory(GB10, system_memory_bytes=GB10["memory_bytes"], shape=spark)
    assert unified.status == "PASS" and "128.0 GiB unified memory" in unified.reason
    assert "predicted peak" in unified.reason and "budget" in unified.reason
    h100 = run_shape("gpu", "cuda", gpu_memory_gib=80, depth=20)
    assert "80.0 GiB GPU memory" in ve.check_memory(H100, 0, h100).reason
    too_big = ve.check_memory(H100, 0, run_shape("gpu", "cuda", gpu_memory_gib=80, depth=20, device_batch_size=64))
    assert too_big.status == "WARN" and "halves it itself" in too_big.fix


def test_plan_prints_predicted_memory_per_batch_size():
    from nanochat.run_shape import format_memory_candidates
    line = format_memory_candidates({"1": 2**30, "2": 3 * 2**30}, 2, 10 * 2**30)
    assert line == "predicted peak memory per device batch size: 1: 1.0, 2: 3.0 (chosen) GiB; budget 10.0 GiB"


def test_torch_cuda_build_decision():
    assert ve.check_torch_cuda("13.0", H100, ["sm_80", "sm_90", "sm_100"]).status == "PASS"
    compatible = ve.check_torch_cuda("12.8", GB10, ["sm_90", "sm_100", "sm_120"])
    assert compatible.status == "PASS" and "sm_120" in compatible.reason  # binary compatible within major 12
    assert ve.check_torch_cuda("12.6", GB10, ["sm_80", "sm_90"]).status == "FAIL"
    assert ve.check_torch_cuda(None, H100, []).status == "FAIL"


def test_triton_decision_on_gb10():
    assert ve.check_triton(GB10, None, None, None).status == "PASS"
    error = "ptxas fatal   : Value 'sm_121a' is not defined for option 'gpu-name'"
    unset = ve.check_triton(GB10, error, None, None)
    assert unset.status == "WARN" and "TRITON_PTXAS_PATH" in unset.fix and "sm_121a" in unset.reason
    old = ve.check_triton(GB10, error, "/usr/local/cuda-12.8/bin/ptxas", (12, 8))
    assert old.status == "WARN" and "is CUDA 12.8" in old.reason
    missing = ve.check_triton(GB10, error, "/nope/ptxas", None)
    assert missing.status == "WARN" and "does not run" in missing.reason
    other = ve.check_triton(H100, "RuntimeError: boom", None, None)
    assert other.status == "WARN" and "--no-compile" in other.fix


def test_ptxas_release(tmp_path):
    fake = tmp_path / "ptxas"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    fake.chmod(0o755)
    assert ve.ptxas_release(str(fake)) == (13, 0)
    assert ve.ptxas_release(str(tmp_path / "missing")) is None


def test_data_wandb_batch(tmp_path):
    assert ve.check_data(True, 0, 240, "/d").status == "PASS"
    assert ve.check_data(False, 0, 240, "/d").status == "FAIL"
    assert ve.check_data(False, 10, 240, "/d").status == "WARN"  # the offline corpus, smaller than the run
    assert ve.check_data(False, 300, 240, "/d").status == "PASS"
    netrc = tmp_path / "netrc"
    assert ve.check_wandb("", str(netrc)).status == "WARN"  # no file
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert ve.check_wandb("", str(netrc)).status == "PASS"
    assert ve.check_wandb("key", "/nope").status == "PASS"
    batch = ve.check_batch(*ve.resolve_shape(20, 32, H100))
    assert batch.status == "PASS" and "8 gradient accumulation steps" in batch.reason
    assert ve.check_batch(*ve.resolve_shape(20, 24, H100)).status == "FAIL"
    auto = ve.check_batch(*ve.resolve_shape(20, None, H100))  # left out: what the memory model fits in 80 GB
    assert auto.status == "PASS" and "--device-batch-size 16 " in auto.reason


def run_script(tmp_path, *args):
    data_dir = tmp_path / "base_data"
    data_dir.mkdir(exist_ok=True)
    for i in range(2):  # only their names are looked at
        (data_dir / f"shard_{i:05d}.parquet").write_bytes(b"")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "validate_env.py"), "--depth", "2", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_script_json_on_this_machine(tmp_path):
    out = run_script(tmp_path, "--json")
    result = json.loads(out.stdout)
    assert [c["name"] for c in result["checks"]] == ROW_NAMES
    for check in result["checks"]:
        assert check["status"] in ("PASS", "WARN", "FAIL", "SKIP") and check["reason"] and check["fix"]
    fails = [c for c in result["checks"] if c["status"] == "FAIL"]
    assert out.returncode == (1 if fails else 0) and result["ok"] == (not fails)
    assert result["plan"]["depth"] == 2 and result["plan"]["parameters"] > 0
    statuses = {c["name"]: c["status"] for c in result["checks"]}
    assert statuses["data"] in ("PASS", "WARN")  # the two shards made above
    if statuses["GPU"] == "WARN":  # a CPU machine
        assert result["plan"]["estimated_wall_time_s"] is None


@pytest.mark.slow
def test_script_table_on_this_machine(tmp_path):
    out = run_script(tmp_path)
    lines = out.stdout.splitlines()
    for name in ROW_NAMES:
        assert any(line.startswith(name + " ") for line in lines), name
    assert "d2 run:" in out.stdout and "estimated pretraining wall time:" in out.stdout
    assert out.returncode == (1 if any("  FAIL  " in line for line in lines) else 0)
