"""Tests for dev/check_accelerator.py (run by setup.sh) without a GPU: the device properties, the
compile probe and the CUDA 13 ptxas are faked, so each machine setup.sh meets (none, H100, GB10
with and without a CUDA 13 toolkit, a pre-Ampere GPU) is checked on CPU."""

import importlib.util
import os
import runpy
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "dev", "check_accelerator.py")
PTXAS_ERROR = ("torch._inductor.exc.InductorError: PTXASError: PTXAS error: Internal Triton PTX codegen error\n"
               "`ptxas` stderr:\nptxas fatal   : Value 'sm_121a' is not defined for option 'gpu-name'\n")
HEADER = "# written by setup.sh: GPU settings sourced by the nanochat shell scripts\n"


@pytest.fixture
def check():
    """dev/check_accelerator.py, imported as a module (dev/ is not a package)."""
    spec = importlib.util.spec_from_file_location("check_accelerator", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_gpu(monkeypatch, check, name, capability, probe_results=None, ptxas_candidates=()):
    """Make `check` see one GPU: torch.cuda reports `name` and `capability`, the bf16 matmul and
    nvidia-smi are stubbed, compile_works returns `probe_results` in turn (default: it works) and
    records the env of each call, and ptxas_candidates returns `ptxas_candidates`.
    Returns the list of envs the probe was called with."""
    results = list(probe_results or [(True, "")])
    calls = []

    def probe(env=None):
        calls.append(env)
        return results.pop(0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(check, "bf16_matmul_error", lambda device="cuda": 0.0)
    monkeypatch.setattr(check, "read_driver_version", lambda: "580.95")
    monkeypatch.setattr(check, "compile_works", probe)
    monkeypatch.setattr(check, "ptxas_candidates", lambda: list(ptxas_candidates))
    return calls


def test_no_gpu_is_fine_for_cpu_runs(check, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env_file = tmp_path / ".nanochat_env"
    assert check.main(str(env_file)) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU visible" in out and "speedrun_dgx.sh --tiny" in out
    assert not env_file.exists()


def test_cli_without_gpu(monkeypatch, tmp_path, capsys):
    # as setup.sh runs it (`python dev/check_accelerator.py .nanochat_env`), in this process: a new
    # interpreter would spend seconds importing torch
    env_file = tmp_path / ".nanochat_env"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", [SCRIPT, str(env_file)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert exit_info.value.code == 0
    assert "no CUDA GPU visible" in capsys.readouterr().out
    assert not env_file.exists()


def test_h100_compile_works(check, monkeypatch, tmp_path, capsys):
    calls = fake_gpu(monkeypatch, check, "NVIDIA H100 80GB HBM3", (9, 0))
    env_file = tmp_path / ".nanochat_env"
    assert check.main(str(env_file)) == 0
    out = capsys.readouterr().out
    assert "GPU: NVIDIA H100 80GB HBM3 (sm_90) | driver 580.95" in out
    assert "bf16 matmul ok" in out and "warning" not in out
    assert "torch.compile (Triton) ok\n" in out
    assert calls == [None]  # one probe, with the environment as it is
    assert env_file.read_text() == HEADER


def test_gb10_uses_cuda13_ptxas(check, monkeypatch, tmp_path, capsys):
    ptxas = tmp_path / "cuda-13.0" / "bin" / "ptxas"
    ptxas.parent.mkdir(parents=True)
    ptxas.write_text("#!/bin/sh\n")
    missing = str(tmp_path / "cuda-13.1" / "bin" / "ptxas")  # listed first but absent: skipped
    env_file = tmp_path / ".nanochat_env"
    writes = []
    atomic_write = check.atomic_write

    def spy_atomic_write(path, data):
        writes.append(path)
        atomic_write(path, data)

    monkeypatch.setattr(check, "atomic_write", spy_atomic_write)
    for run in range(2):  # setup.sh is re-run: the file is rewritten, never appended to
        calls = fake_gpu(monkeypatch, check, "NVIDIA GB10", (12, 1), [(False, PTXAS_ERROR), (True, "")],
                         [missing, str(ptxas)])
        assert check.main(str(env_file)) == 0
        out = capsys.readouterr().out
        assert f"torch.compile (Triton) ok with TRITON_PTXAS_PATH={ptxas}" in out
        # the re-probe gets the ptxas through its environment, in both variables Triton reads
        assert calls == [None, {"TRITON_PTXAS_PATH": str(ptxas), "TRITON_PTXAS_BLACKWELL_PATH": str(ptxas)}]
        assert env_file.read_text() == (HEADER + f"export TRITON_PTXAS_PATH={ptxas}\n"
                                        + f"export TRITON_PTXAS_BLACKWELL_PATH={ptxas}\n")
    assert writes == [str(env_file)] * 2  # the crash-safe writer: a reader never sees half a file
    assert os.environ.get("TRITON_PTXAS_PATH") != str(ptxas)  # only the probe's subprocess got it


def test_gb10_without_cuda13_ptxas(check, monkeypatch, tmp_path, capsys):
    calls = fake_gpu(monkeypatch, check, "NVIDIA GB10", (12, 1), [(False, PTXAS_ERROR)],
                     [str(tmp_path / "cuda-13.0" / "bin" / "ptxas")])
    env_file = tmp_path / ".nanochat_env"
    assert check.main(str(env_file)) == 0  # setup goes on; training runs eagerly
    out = capsys.readouterr().out
    assert "no CUDA 13 ptxas was found: install the CUDA 13 toolkit" in out
    assert "cuda-toolkit-13-0" in out and "re-run ./setup.sh" in out
    assert "run without torch.compile (slower)" in out
    assert calls == [None]
    assert env_file.read_text() == HEADER + "export NANOCHAT_COMPILE=0\n"  # training.should_compile reads it


def test_gb10_ptxas_that_still_fails(check, monkeypatch, tmp_path, capsys):
    ptxas = tmp_path / "ptxas"
    ptxas.write_text("")
    fake_gpu(monkeypatch, check, "NVIDIA GB10", (12, 1), [(False, PTXAS_ERROR), (False, PTXAS_ERROR)], [str(ptxas)])
    assert check.main(str(tmp_path / ".nanochat_env")) == 0
    out = capsys.readouterr().out
    assert "torch.compile failed on NVIDIA GB10" in out and "sm_121a" in out and "without torch.compile" in out
    assert "NANOCHAT_COMPILE=0" in (tmp_path / ".nanochat_env").read_text()


def test_other_compile_errors_are_not_blamed_on_ptxas(check, monkeypatch, tmp_path, capsys):
    ptxas = tmp_path / "ptxas"
    ptxas.write_text("")
    calls = fake_gpu(monkeypatch, check, "NVIDIA H100 80GB HBM3", (9, 0), [(False, PTXAS_ERROR)], [str(ptxas)])
    assert check.main(str(tmp_path / ".nanochat_env")) == 0  # sm_90: Triton's ptxas knows it, so no retry
    assert calls == [None]
    calls = fake_gpu(monkeypatch, check, "NVIDIA GB10", (12, 1), [(False, "RuntimeError: out of memory")], [str(ptxas)])
    assert check.main(str(tmp_path / ".nanochat_env")) == 0
    assert calls == [None]
    assert "torch.compile failed on NVIDIA GB10" in capsys.readouterr().out


def test_pre_ampere_gpu_warns_about_bf16(check, monkeypatch, tmp_path, capsys):
    fake_gpu(monkeypatch, check, "Tesla V100-SXM2-16GB", (7, 0))
    assert check.main(str(tmp_path / ".nanochat_env")) == 0
    out = capsys.readouterr().out
    assert "warning: sm_70 has no fast bf16; training runs in fp32 (slow)" in out


def test_compile_probe_passes_ptxas_in_env(check, monkeypatch):
    seen = []

    def run(cmd, **kwargs):
        seen.append((cmd, kwargs["env"]))
        return subprocess.CompletedProcess(cmd, 1, "", "x" * 3000 + "ptxas fatal")

    monkeypatch.setattr(check.subprocess, "run", run)
    monkeypatch.setenv("KEEP_ME", "1")
    ok, error = check.compile_works({"TRITON_PTXAS_BLACKWELL_PATH": "/usr/local/cuda-13.0/bin/ptxas"})
    assert not ok and error.endswith("ptxas fatal") and len(error) == 2000
    (cmd, env), = seen
    assert cmd[0] == sys.executable and "torch.compile" in cmd[2]
    assert env["TRITON_PTXAS_BLACKWELL_PATH"] == "/usr/local/cuda-13.0/bin/ptxas"
    assert env["KEEP_ME"] == "1"  # the rest of the environment (PATH, CUDA_VISIBLE_DEVICES, ...) is kept
    assert "TRITON_PTXAS_BLACKWELL_PATH" not in os.environ  # this process is left as it was


def test_ptxas_candidates_prefer_versioned_cuda13(check, monkeypatch):
    monkeypatch.setattr(check.glob, "glob", lambda pattern: ["/usr/local/cuda-13.1/bin/ptxas",
                                                             "/usr/local/cuda-13.0/bin/ptxas"])
    assert check.ptxas_candidates() == ["/usr/local/cuda-13.0/bin/ptxas", "/usr/local/cuda-13.1/bin/ptxas",
                                        "/usr/local/cuda/bin/ptxas"]


def test_bf16_matmul_error_is_small_on_cpu(check):
    assert check.bf16_matmul_error("cpu") < 1.0


def test_compile_off_in_the_env_file_turns_the_cuda_default_off(monkeypatch):
    from nanochat.training import should_compile
    monkeypatch.setenv("NANOCHAT_COMPILE", "0")
    assert not should_compile(None, "cuda")
    assert should_compile(True, "cuda")  # --compile still wins
    monkeypatch.delenv("NANOCHAT_COMPILE")
    assert should_compile(None, "cuda")
