"""
Check the accelerator for setup.sh: on an NVIDIA GPU print driver/CUDA/torch versions and the
compute capability, run a bf16 matmul and a torch.compile'd (Triton) kernel on it, and on a GB10
(sm_121) point Triton at the CUDA 13 ptxas when its bundled one rejects sm_121a. Settings that
the other scripts need are written as `export` lines to the file given as the first argument
(setup.sh passes .nanochat_env, which every shell script sources). Exits 1 when the GPU is
present but unusable, with what to install; 0 on success or when there is no GPU (CPU runs).

    python dev/check_accelerator.py .nanochat_env
"""

import glob
import os
import subprocess
import sys

import torch

from nanochat.common import atomic_write

env_file = sys.argv[1] if len(sys.argv) > 1 else ".nanochat_env"


def compile_works():
    """True when torch.compile can build and run a Triton kernel on the GPU (in a subprocess,
    so a crashing compiler cannot take this check down). Returns (ok, error text)."""
    code = ("import torch\n"
            "f = torch.compile(lambda x: torch.relu(x) * 2)\n"
            "x = torch.randn(1024, device='cuda', dtype=torch.bfloat16)\n"
            "assert torch.equal(f(x), torch.relu(x) * 2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    return proc.returncode == 0, proc.stderr[-2000:]


if not torch.cuda.is_available():
    print(f"[setup] no CUDA GPU visible to torch {torch.__version__}: CPU runs work (bash speedrun_dgx.sh --tiny); "
          "for a GPU run check `nvidia-smi` and that torch has a CUDA build")
    sys.exit(0)

name = torch.cuda.get_device_name(0)
major, minor = torch.cuda.get_device_capability(0)
try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"
except (OSError, subprocess.TimeoutExpired):
    driver = "unknown (nvidia-smi not found)"
print(f"[setup] GPU: {name} (sm_{major}{minor}) | driver {driver} | torch {torch.__version__} | CUDA {torch.version.cuda}")

# bf16 matmul
a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
err = ((a @ a).float() - a.float() @ a.float()).abs().max().item()
if major < 8:
    print(f"[setup] warning: sm_{major}{minor} has no fast bf16; training runs in fp32 (slow)")
print(f"[setup] bf16 matmul ok (max abs error vs fp32 {err:.3g})")

# torch.compile (Triton). GB10 is sm_121: Triton's bundled ptxas may predate it.
ok, error = compile_works()
exports = []
if not ok and (major, minor) >= (12, 0) and "ptxas" in error.lower():
    candidates = sorted(glob.glob("/usr/local/cuda-13*/bin/ptxas")) + ["/usr/local/cuda/bin/ptxas"]
    ptxas = next((p for p in candidates if os.path.exists(p)), None)
    if ptxas is None:
        print("[setup] Triton's ptxas rejects this GPU and no CUDA 13 ptxas was found: install the CUDA 13 toolkit\n"
              "        (e.g. `sudo apt install cuda-toolkit-13-0` from NVIDIA's repository), then re-run ./setup.sh")
        sys.exit(1)
    os.environ["TRITON_PTXAS_PATH"] = ptxas
    exports.append(f"export TRITON_PTXAS_PATH={ptxas}")
    ok, error = compile_works()
if not ok:
    print(f"[setup] torch.compile failed on {name}:\n{error}\n[setup] training still runs with --no-compile "
          "(slower); report the error above if it persists")
    sys.exit(1)
print("[setup] torch.compile (Triton) ok" + (f" with TRITON_PTXAS_PATH={exports[0].split('=', 1)[1]}" if exports else ""))

atomic_write(env_file, "# written by setup.sh: GPU settings sourced by the nanochat shell scripts\n"
             + "".join(e + "\n" for e in exports))
