"""
Check that this machine can run the nanochat-spark pipeline before hours of downloads and
training find out otherwise, and estimate what a run at --depth costs here.

    python validate_env.py                                # the d20 speedrun
    python validate_env.py --depth 26 --device-batch-size 16
    python validate_env.py --json                         # one JSON object, for scripts

Prints one row per check, PASS / WARN / FAIL / SKIP (SKIP: does not apply here, e.g. the
GPU rows on a CPU machine), each with the reason and, unless it passed, the fix; then the
run's size: parameters, tokens, FLOPs and an estimated wall time. Exit status 0 when no row
FAILs, 1 otherwise.

Not for: fixing anything (each row says how) or measuring speed (bench/ does that).
"""

import argparse
import importlib
import json
import math
import netrc
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))

REQUIRED_PACKAGES = ["torch", "rustbpe", "tiktoken", "fastapi", "uvicorn", "pyarrow", "datasets", "wandb", "psutil"]
# module -> what is lost without it (the pipeline runs either way)
OPTIONAL_PACKAGES = {"matplotlib": "the report's loss plots", "pynvml": "the report's GPU energy (nvidia-ml-py)"}

# The run's shape (model size, batch, steps, checkpoints) comes from nanochat/run_shape.py, as for base_train.
# Pretraining data, from upstream's speedrun.sh (https://github.com/karpathy/nanochat/blob/master/speedrun.sh):
# the tokenizer gives ~4.8 chars/token on FineWeb-EDU, and a shard holds ~250M chars in ~100 MB.
CHARS_PER_TOKEN = 4.8
CHARS_PER_SHARD = 250e6
SHARD_BYTES = 100e6
# Checkpoints the chat stages keep (every one holds model + optimizer state, none is pruned):
# mid and SFT run ~800 steps at --save-every 500 (2 each); RL one pass over GSM8K's 7,473
# problems at 16 per step is 467 steps at --save-every 60 (8).
CHAT_CHECKPOINTS = 12

PTXAS_RELEASE = re.compile(r"release (\d+)\.(\d+)")
# Compiled and run in a child process, so a Triton crash or hang cannot take this script down.
COMPILE_PROBE = """
import torch
f = torch.compile(lambda x: torch.relu(x) * 2 + 1)
x = torch.randn(256, device="cuda")
assert torch.allclose(f(x), torch.relu(x) * 2 + 1)
torch.cuda.synchronize()
"""


@dataclass
class Check:
    name: str
    status: str  # PASS, WARN, FAIL or SKIP
    reason: str
    fix: str = "-"


# -----------------------------------------------------------------------------
# The checks: each takes what it decides on as arguments (so tests can hand in fakes) and
# returns one Check.

def check_os(system, machine):
    if system == "Linux" and machine in ("x86_64", "aarch64", "arm64"):
        return Check("OS/arch", "PASS", f"{system} {machine}")
    if system == "Darwin":
        return Check("OS/arch", "WARN", f"macOS {machine}: no CUDA, training runs on MPS or CPU (tiny models only)",
                     "use a Linux machine with an NVIDIA GPU for real runs")
    return Check("OS/arch", "WARN", f"{system} {machine} is untested",
                 "use Linux (on Windows: WSL2) on x86_64 or aarch64")


def check_python(version):
    text = ".".join(map(str, version))
    if tuple(version[:2]) >= (3, 10):
        return Check("Python", "PASS", text)
    return Check("Python", "FAIL", f"Python {text} is older than 3.10", "run `uv sync` (it installs a suitable Python into .venv)")


def check_venv(prefix, base_prefix, project_venv):
    if os.path.realpath(prefix) == os.path.realpath(project_venv):
        return Check("venv", "PASS", f"running in {project_venv}")
    if prefix != base_prefix:
        return Check("venv", "WARN", f"running in another environment ({prefix}); its packages may not match uv.lock",
                     f"run `uv sync` in {REPO_ROOT}, then `source .venv/bin/activate`")
    return Check("venv", "FAIL", f"not in a virtual environment ({prefix})",
                 f"run `uv sync` in {REPO_ROOT}, then `source .venv/bin/activate` (or run .venv/bin/python)")


def check_packages(import_module):
    missing = []
    for name in REQUIRED_PACKAGES:
        try:
            import_module(name)
        except Exception as e:  # a broken install raises anything (ImportError, OSError from a .so, ...)
            missing.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if not missing:
        return Check("packages", "PASS", ", ".join(REQUIRED_PACKAGES))
    return Check("packages", "FAIL", "not importable: " + "; ".join(missing),
                 "run `uv sync` (rustbpe: `uv sync` builds it, which needs Rust: https://rustup.rs)")


def check_optional_packages(import_module):
    missing = []
    for name, loss in OPTIONAL_PACKAGES.items():
        try:
            import_module(name)
        except Exception:  # as in check_packages
            missing.append(f"{name} ({loss})")
    if not missing:
        return Check("optional packages", "PASS", ", ".join(OPTIONAL_PACKAGES))
    return Check("optional packages", "WARN", "missing, so no " + "; no ".join(missing), "run `uv sync`")


def check_gpu(gpu):
    """`gpu`: report.gpu_info()'s dict, or None without a CUDA GPU."""
    if gpu is None:
        return Check("GPU", "WARN", "no CUDA GPU: training runs on CPU, fine for a tiny demo, far too slow for d20",
                     "install the NVIDIA driver, and a CUDA build of torch (`uv sync`)")
    return Check("GPU", "PASS", f"{gpu['name']} x {gpu['count']}")


def check_capability(gpu):
    if gpu is None:
        return Check("compute capability", "SKIP", "no CUDA GPU")
    major, minor = gpu["capability"]
    if major >= 8:
        return Check("compute capability", "PASS", f"sm_{major}{minor}")
    return Check("compute capability", "WARN", f"sm_{major}{minor}: older than Ampere (sm_80), so no bf16; fp32 is "
                 "slower and needs twice the activation memory", "use an Ampere or newer GPU, or a smaller --depth")


def check_memory(gpu, system_memory_bytes, shape):
    """Whether the d`shape.depth` run fits: the weights, gradients and optimizer state must fit
    the memory at all (else FAIL), and on a GPU the memory model's predicted peak for the chosen
    device batch (shape.peak_memory, nanochat/run_shape.py) must fit the budget it allows on this
    GPU (shape.memory_budget; else WARN: base_train halves the device batch on out-of-memory)."""
    unified = gpu is not None and gpu["unified"]
    if gpu is None:
        where, total = "system memory (CPU run)", system_memory_bytes
    elif unified:
        where, total = "unified memory (GPU and CPU share the system's)", gpu["memory_bytes"]
    else:
        where, total = "GPU memory", gpu["memory_bytes"]
    peak = shape.peak_memory.total
    reason = (f"{total / 2**30:.1f} GiB {where}; d{shape.depth} needs {shape.state_bytes / 2**30:.1f} GiB for weights, "
              f"gradients and optimizer state; predicted peak {peak / 2**30:.1f} GiB at --device-batch-size "
              f"{shape.device_batch_size}")
    if shape.state_bytes > total:
        return Check("memory", "FAIL", reason, "pick a smaller --depth")
    if shape.memory_budget is not None and peak > shape.memory_budget:
        return Check("memory", "WARN", reason + f", over the {shape.memory_budget / 2**30:.1f} GiB budget",
                     "leave --device-batch-size out (the run picks one that fits) or halve it; on out-of-memory "
                     "base_train halves it itself and goes on from its last checkpoint")
    budget = f" (budget {shape.memory_budget / 2**30:.1f} GiB)" if shape.memory_budget is not None else ""
    return Check("memory", "PASS", reason + budget)


def check_torch_cuda(cuda_version, gpu, arch_list):
    """`cuda_version`: torch.version.cuda; `arch_list`: torch.cuda.get_arch_list()."""
    if gpu is None:
        return Check("torch CUDA build", "SKIP", f"no CUDA GPU (torch built for CUDA {cuda_version or 'none'})")
    if cuda_version is None:
        return Check("torch CUDA build", "FAIL", "torch is a CPU-only build on a machine with a CUDA GPU",
                     "run `uv sync` (it installs the CUDA build)")
    major, minor = gpu["capability"]
    if f"sm_{major}{minor}" in arch_list:
        return Check("torch CUDA build", "PASS", f"CUDA {cuda_version}, has sm_{major}{minor} kernels")
    # A cubin for sm_XY also runs on sm_XZ with Z > Y (same major): CUDA's binary compatibility,
    # https://docs.nvidia.com/cuda/cuda-c-programming-guide/#binary-compatibility
    compatible = [a for a in arch_list if re.fullmatch(rf"sm_{major}\d", a) and int(a[len(f"sm_{major}"):]) <= minor]
    if compatible:
        return Check("torch CUDA build", "PASS", f"CUDA {cuda_version}, runs {compatible[-1]} kernels on sm_{major}{minor}")
    return Check("torch CUDA build", "FAIL", f"CUDA {cuda_version} build has no kernels for sm_{major}{minor} "
                 f"(has {', '.join(arch_list) or 'none'})", "run `uv sync` to install the CUDA 13 build of torch")


def check_bf16(gpu, bf16_supported):
    if gpu is None:
        return Check("bf16", "SKIP", "no CUDA GPU (CPU runs in fp32)")
    if bf16_supported:
        return Check("bf16", "PASS", "supported")
    return Check("bf16", "WARN", "not supported: training falls back to fp32", "use an Ampere or newer GPU")


def ptxas_release(path):
    """(major, minor) CUDA release of the ptxas at `path`, or None if it does not run."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = PTXAS_RELEASE.search(out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_triton(gpu, compile_error, ptxas_path, ptxas_version):
    """`compile_error`: None when the torch.compile probe ran, else its error text;
    `ptxas_path`: $TRITON_PTXAS_PATH or None; `ptxas_version`: ptxas_release(ptxas_path)."""
    if gpu is None:
        return Check("Triton/ptxas", "SKIP", "no CUDA GPU (torch.compile is on by default on CUDA only)")
    if compile_error is None:
        return Check("Triton/ptxas", "PASS", "torch.compile built and ran a Triton kernel"
                     + (f" (TRITON_PTXAS_PATH={ptxas_path})" if ptxas_path else ""))
    tail = compile_error.strip().splitlines()[-1][:300] if compile_error.strip() else "no message"
    if gpu["capability"] == (12, 1):
        # GB10 (sm_121): Triton generates sm_121a PTX, which ptxas before CUDA 13 rejects; Triton
        # uses the ptxas it bundles unless TRITON_PTXAS_PATH names another.
        fix = ("export TRITON_PTXAS_PATH=/usr/local/cuda/bin/ptxas (CUDA 13's; `ptxas --version` must say "
               "release 13 or later), or train with --no-compile (slower)")
        if not ptxas_path:
            return Check("Triton/ptxas", "WARN", f"torch.compile failed on sm_121 with Triton's bundled ptxas: {tail}", fix)
        if ptxas_version is None or ptxas_version[0] < 13:
            found = "does not run" if ptxas_version is None else f"is CUDA {ptxas_version[0]}.{ptxas_version[1]}"
            return Check("Triton/ptxas", "WARN", f"TRITON_PTXAS_PATH={ptxas_path} {found}; sm_121a needs CUDA 13", fix)
    return Check("Triton/ptxas", "WARN", f"torch.compile failed: {tail}",
                 "train with --no-compile (slower), or reinstall with `uv sync` and check the CUDA driver")


def check_disk(free_bytes, need_bytes, path, detail):
    reason = f"{free_bytes / 1e9:.1f} GB free at {path}; the run needs ~{need_bytes / 1e9:.1f} GB ({detail})"
    if need_bytes > free_bytes:
        return Check("disk", "FAIL", reason, "free space there, or set NANOCHAT_BASE_DIR to a bigger disk "
                     "(fewer checkpoints: base_train --keep-checkpoints 1, or a larger --save-every)")
    return Check("disk", "PASS", reason)


def check_data(hub_reachable, shards_present, shards_needed, data_dir):
    if hub_reachable:
        return Check("data", "PASS", f"Hugging Face Hub reachable ({shards_present} of {shards_needed} shards already "
                     f"in {data_dir})")
    if shards_present >= 2:
        if shards_present < shards_needed:
            return Check("data", "WARN", f"Hub unreachable; {shards_present} shards in {data_dir}, the run reads "
                         f"~{shards_needed}, so the loader repeats them", "download more shards where the Hub is "
                         "reachable, or accept the repetition (or pick a smaller --depth)")
        return Check("data", "PASS", f"Hub unreachable, but {shards_present} shards are in {data_dir}")
    return Check("data", "FAIL", f"Hugging Face Hub unreachable and no corpus in {data_dir}",
                 "restore access to huggingface.co, or build the offline corpus: `python -m nanochat.dataset --offline` "
                 "(README: Offline mode)")


def check_wandb(api_key, netrc_path):
    if api_key:
        return Check("wandb", "PASS", "WANDB_API_KEY is set")
    try:
        if netrc.netrc(netrc_path).authenticators("api.wandb.ai"):
            return Check("wandb", "PASS", f"logged in ({netrc_path})")
    except (OSError, netrc.NetrcParseError):
        pass
    return Check("wandb", "WARN", "not logged in: runs log to the terminal and report only (--run dummy, the default)",
                 "`wandb login` to track runs in Weights & Biases, then pass --run <name>")


def check_batch(shape, error):
    """`shape`: the run's RunShape, or None when run_shape raised `error` for the batch flags."""
    if error is not None:
        return Check("batch", "FAIL", str(error), "pick a power of two for --device-batch-size (1 ... 256), or leave "
                     "it out: the run picks one that fits the GPU")
    return Check("batch", "PASS", f"--device-batch-size {shape.device_batch_size} x {shape.max_seq_len} tokens, "
                 f"{shape.grad_accum_steps} gradient accumulation steps per {shape.total_batch_size:,}-token step")


# -----------------------------------------------------------------------------
# The run's size

def estimate_wall_time(total_flops, device_name):
    """Seconds to do `total_flops` at run_shape's assumed MFU of the GPU's bf16 peak, or None (CPU, unknown GPU)."""
    from nanochat.common import get_peak_flops
    from nanochat.run_shape import estimate_seconds
    return estimate_seconds(total_flops, get_peak_flops(device_name) if device_name else None)


def resolve_shape(depth, device_batch_size, gpu):
    """The d`depth` GPU-recipe run on this machine, from nanochat.run_shape (as base_train sizes it):
    (RunShape, None), or (the shape without the user's device batch, RunShapeError) when
    --device-batch-size does not fit the step. `gpu`: report.gpu_info()'s dict or None."""
    from nanochat.run_shape import RunShapeError, run_shape
    where = dict(device_type="cuda" if gpu else "cpu", gpu_memory_gib=gpu["memory_bytes"] / 2**30 if gpu else None,
                 unified=bool(gpu and gpu["unified"]))
    try:
        return run_shape("gpu", **where, depth=depth, device_batch_size=device_batch_size), None
    except RunShapeError as e:
        return run_shape("gpu", **where, depth=depth), e


def estimate_disk(params, optimizer_bytes, tokens, shards_present, download, save_every, total_batch_size,
                  keep=None):
    """Bytes a run still writes: the shards not yet downloaded (none when `download` is False:
    offline, the corpus is what it is) and every checkpoint (fp32 model state dict + optimizer
    state; base_train saves one per `save_every` steps and keeps the last `keep`, so at most
    keep + 1 exist while a new one is written; the chat stages CHAT_CHECKPOINTS). Returns (bytes, a one-line
    breakdown, shards the pretraining reads). Sizes in bytes, tokens in tokens. keep None: base_train's default."""
    if keep is None:
        from nanochat.run_shape import KEEP_CHECKPOINTS as keep
    shards = math.ceil(tokens * CHARS_PER_TOKEN / CHARS_PER_SHARD) + 1  # + the validation shard
    to_download = max(shards - shards_present, 0) if download else 0
    steps = math.ceil(tokens / total_batch_size)
    checkpoints = min(math.ceil(steps / save_every), keep + 1) + CHAT_CHECKPOINTS
    checkpoint_bytes = 4 * params + optimizer_bytes
    need = to_download * SHARD_BYTES + checkpoints * checkpoint_bytes
    detail = (f"{to_download} shards x ~{SHARD_BYTES / 1e6:.0f} MB to download, {checkpoints} checkpoints x "
              f"{checkpoint_bytes / 1e9:.2f} GB")
    return need, detail, shards


# -----------------------------------------------------------------------------
# Gathering the facts on this machine

def compile_probe_error():
    """None when a tiny torch.compile'd function runs on the GPU, else the error text."""
    try:
        out = subprocess.run([sys.executable, "-c", COMPILE_PROBE], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "torch.compile probe did not finish in 600 s"
    return None if out.returncode == 0 else (out.stderr or out.stdout)


def base_dir():
    """$NANOCHAT_BASE_DIR or ~/.cache/nanochat (not created: this script only looks)."""
    return os.path.abspath(os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat"))


def existing_ancestor(path):
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def count_shards(data_dir):
    if not os.path.isdir(data_dir):
        return 0
    return sum(1 for n in os.listdir(data_dir) if re.fullmatch(r"shard_\d{5}\.parquet", n))


def run_checks(depth, device_batch_size):
    """Every check on this machine, and the run's plan. Returns (checks, plan)."""
    checks = [check_os(platform.system(), platform.machine()), check_python(sys.version_info[:3]),
              check_venv(sys.prefix, sys.base_prefix, os.path.join(REPO_ROOT, ".venv")),
              check_packages(importlib.import_module), check_optional_packages(importlib.import_module)]
    data_dir = os.path.join(base_dir(), "base_data")
    shards_present = count_shards(data_dir)
    try:
        import psutil
        import torch
        from nanochat.common import hub_reachable
        from nanochat.run_shape import ASSUMED_MFU
        from nanochat.report import gpu_info
    except Exception as e:  # the packages row already says what is broken
        reason = f"needs torch, psutil and nanochat ({type(e).__name__}: {e})"
        checks += [Check(name, "SKIP", reason) for name in
                   ("GPU", "compute capability", "memory", "torch CUDA build", "bf16", "Triton/ptxas", "disk")]
        checks += [Check(name, "SKIP", reason) for name in ("data", "wandb", "batch")]
        return checks, {"depth": depth, "error": reason}

    gpu = gpu_info()
    shape, batch_error = resolve_shape(depth, device_batch_size, gpu)
    params, tokens, total_flops = shape.num_params, shape.tokens, shape.training_flops
    online = hub_reachable()
    disk_need, disk_detail, shards_needed = estimate_disk(params, shape.optimizer_bytes, tokens, shards_present, online,
                                                          shape.save_every, shape.total_batch_size)
    disk_path = existing_ancestor(base_dir())
    ptxas_path = os.environ.get("TRITON_PTXAS_PATH") or None
    compile_error = compile_probe_error() if gpu else None
    checks += [
        check_gpu(gpu),
        check_capability(gpu),
        check_memory(gpu, psutil.virtual_memory().total, shape),
        check_torch_cuda(torch.version.cuda, gpu, torch.cuda.get_arch_list() if gpu else []),
        check_bf16(gpu, gpu is not None and torch.cuda.is_bf16_supported()),
        check_triton(gpu, compile_error, ptxas_path, ptxas_release(ptxas_path) if compile_error and ptxas_path else None),
        check_disk(shutil.disk_usage(disk_path).free, disk_need, disk_path, disk_detail),
        check_data(online, shards_present, shards_needed, data_dir),
        check_wandb(os.environ.get("WANDB_API_KEY"), os.path.expanduser("~/.netrc")),
        check_batch(shape, batch_error),
    ]
    wall_s = estimate_wall_time(total_flops, gpu["name"] if gpu else None)
    plan = {"depth": depth, "parameters": params, "tokens": tokens, "flops_per_token": shape.flops_per_token,
            "training_flops": total_flops, "gpu": gpu["name"] if gpu else None, "assumed_mfu": ASSUMED_MFU,
            "tokens_per_parameter": tokens / params, "steps": shape.num_iterations,
            "device_batch_size": shape.device_batch_size,
            "predicted_peak_bytes": {str(bs): n for bs, n in shape.memory_candidates().items()},
            "memory_budget_bytes": shape.memory_budget,
            "estimated_wall_time_s": wall_s, "disk_bytes": disk_need, "shards_needed": shards_needed}
    return checks, plan


def print_table(checks, plan):
    from nanochat.common import format_duration
    from nanochat.run_shape import ASSUMED_MFU
    width = max(len(c.name) for c in checks)
    print(f"{'check':<{width}}  status  reason")
    for c in checks:
        print(f"{c.name:<{width}}  {c.status:<6}  {c.reason}")
        if c.status in ("WARN", "FAIL"):
            print(f"{'':<{width}}          fix: {c.fix}")
    print()
    if "error" in plan:
        print(f"d{plan['depth']} run: cannot size it, {plan['error']}")
        return
    wall = plan["estimated_wall_time_s"]
    wall_text = "n/a (no CUDA GPU, or a GPU without a known bf16 peak)" if wall is None else (
        f"{format_duration(wall)} (estimate: pretraining only, at an assumed {ASSUMED_MFU:.0%} MFU on {plan['gpu']})")
    print(f"d{plan['depth']} run: {plan['parameters']:,} parameters, {plan['tokens']:,} tokens "
          f"({plan['tokens_per_parameter']:.0f} per parameter, {plan['steps']:,} steps), "
          f"{plan['training_flops']:.2e} training FLOPs")
    print(f"estimated pretraining wall time: {wall_text}")
    from nanochat.run_shape import format_memory_candidates
    print(format_memory_candidates(plan["predicted_peak_bytes"], plan["device_batch_size"],
                                   plan["memory_budget_bytes"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check this machine for a nanochat-spark run")
    parser.add_argument("--depth", type=int, default=20, help="model depth of the planned run (default 20)")
    parser.add_argument("--device-batch-size", "--device_batch_size", type=int, default=None,
                        help="sequences per forward pass (default: what base_train picks for this GPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.depth < 1:
        parser.error(f"--depth must be >= 1, got {args.depth}")
    checks, plan = run_checks(args.depth, args.device_batch_size)
    ok = not any(c.status == "FAIL" for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks], "plan": plan}, indent=2))
    else:
        print_table(checks, plan)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
