"""
Check the accelerator for setup.sh: on an NVIDIA GPU print driver/CUDA/torch versions and the
compute capability, run a bf16 matmul and a torch.compile'd (Triton) kernel on it, and on a GB10
(sm_121) point Triton at the CUDA 13 ptxas when its bundled one rejects sm_121a. Settings that
the other scripts need are written as `export` lines to the file given as the first argument
(setup.sh passes .nanochat_env, which every shell script sources). When torch.compile cannot
build a kernel it says what to install and writes NANOCHAT_COMPILE=0 there, so training runs
without compiling (slower) instead of crashing; exits non-zero only when the GPU cannot run a
bf16 matmul at all.

    python dev/check_accelerator.py .nanochat_env

Not for: choosing the device or dtype of a run (nanochat/common.py does that at run time).
"""

import glob
import os
import subprocess
import sys

import torch

from nanochat.common import atomic_write

# The variables Triton reads for the ptxas it runs. Tritons that bundle a second, newer ptxas
# (bin/ptxas-blackwell) read TRITON_PTXAS_BLACKWELL_PATH for the newer GPUs, GB10's sm_121 among
# them (get_ptxas(arch) in triton/backends/nvidia/compiler.py: sm_90 and up in Triton 3.9), and
# ignore TRITON_PTXAS_PATH there; older Tritons read only TRITON_PTXAS_PATH. So both are set.
PTXAS_ENV_VARS = ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH")


def compile_works(env=None):
    """True when torch.compile can build and run a Triton kernel on the GPU (in a subprocess,
    so a crashing compiler cannot take this check down). env: variables added to the
    subprocess's environment (e.g. the ptxas to try). Returns (ok, error text)."""
    code = ("import torch\n"
            "f = torch.compile(lambda x: torch.relu(x) * 2)\n"
            "x = torch.randn(1024, device='cuda', dtype=torch.bfloat16)\n"
            "assert torch.equal(f(x), torch.relu(x) * 2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    return proc.returncode == 0, proc.stderr[-2000:]


def read_driver_version():
    """The NVIDIA driver version as nvidia-smi reports it, or a string saying why it is unknown."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (nvidia-smi not found)"


def bf16_matmul_error(device="cuda"):
    """Max abs difference between a (256, 256) bf16 matmul on `device` and the same product in
    fp32: a smoke test that bf16 kernels run at all (a wrong result would be off by O(10))."""
    a = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    return ((a @ a).float() - a.float() @ a.float()).abs().max().item()


def ptxas_candidates():
    """The CUDA 13 toolkits' ptxas paths to try, in order: versioned installs, then the default
    /usr/local/cuda (on DGX OS a link to CUDA 13). They may not exist."""
    return sorted(glob.glob("/usr/local/cuda-13*/bin/ptxas")) + ["/usr/local/cuda/bin/ptxas"]


def check_compile(name, capability, probe=None, candidates=None):
    """Check torch.compile on the GPU `name` of compute `capability` (major, minor) with `probe`
    (default: compile_works). When the probe fails on ptxas on sm_120 and up (GB10: Triton's bundled
    ptxas may predate sm_121a), retry it with the first existing path of `candidates` (default:
    ptxas_candidates()) in every PTXAS_ENV_VARS variable.

    Returns (ok, exports, message): whether torch.compile works, the `export` lines for the env
    file, and what to print (on failure: what to install; the training scripts then run without
    torch.compile, see main).
    """
    probe = compile_works if probe is None else probe
    ok, error = probe()
    ptxas = None
    if not ok and capability >= (12, 0) and "ptxas" in error.lower():
        candidates = ptxas_candidates() if candidates is None else candidates
        ptxas = next((p for p in candidates if os.path.exists(p)), None)
        if ptxas is None:
            return False, [], (
                "[setup] Triton's ptxas rejects this GPU and no CUDA 13 ptxas was found: install the CUDA 13 toolkit\n"
                "        (e.g. `sudo apt install cuda-toolkit-13-0` from NVIDIA's repository), then re-run ./setup.sh;\n"
                "        until then the training scripts run without torch.compile (slower)")
        ok, error = probe({var: ptxas for var in PTXAS_ENV_VARS})
    if not ok:
        return False, [], (f"[setup] torch.compile failed on {name}:\n{error}\n[setup] the training scripts run "
                           "without torch.compile (slower) until ./setup.sh finds it working; report the error "
                           "above if it persists")
    if ptxas is None:
        return True, [], "[setup] torch.compile (Triton) ok"
    return (True, [f"export {var}={ptxas}" for var in PTXAS_ENV_VARS],
            f"[setup] torch.compile (Triton) ok with {PTXAS_ENV_VARS[0]}={ptxas}")


def main(env_file):
    """Check the GPU, print what was found and write the env file. Returns the exit code."""
    if not torch.cuda.is_available():
        print(f"[setup] no CUDA GPU visible to torch {torch.__version__}: CPU runs work (bash speedrun_dgx.sh --tiny); "
              "for a GPU run check `nvidia-smi` and that torch has a CUDA build")
        return 0

    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    print(f"[setup] GPU: {name} (sm_{major}{minor}) | driver {read_driver_version()} | torch {torch.__version__} "
          f"| CUDA {torch.version.cuda}")

    # bf16 matmul
    err = bf16_matmul_error()
    if major < 8:
        print(f"[setup] warning: sm_{major}{minor} has no fast bf16; training runs in fp32 (slow)")
    print(f"[setup] bf16 matmul ok (max abs error vs fp32 {err:.3g})")

    # torch.compile (Triton). GB10 is sm_121: Triton's bundled ptxas may predate it.
    ok, exports, message = check_compile(name, (major, minor))
    print(message)
    if not ok:
        # a Spark whose Triton cannot build kernels still trains, eagerly, instead of every stage
        # crashing at its first compiled step (training.should_compile reads this)
        exports = ["export NANOCHAT_COMPILE=0"]
    atomic_write(env_file, "# written by setup.sh: GPU settings sourced by the nanochat shell scripts\n"
                 + "".join(e + "\n" for e in exports))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ".nanochat_env"))
