"""
Small shared utilities: the base directory, rank-0 printing, device/dtype autodetection,
torchrun (DDP) init/cleanup (one node or several: timeouts, who writes checkpoints, the check that
every rank has the same inputs), the GPU peak-FLOPS table used for MFU, unified-memory detection,
the flag parser, atomic file writes, the duration formatter and the Hub reachability check.

Not for: anything model- or stage-specific (that lives in its own module).
"""

import argparse
import datetime
import errno
import os
import secrets
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.request

import torch
import torch.distributed as dist


def get_base_dir():
    """Return the directory every stage reads from and writes to, creating it if needed.

    `$NANOCHAT_BASE_DIR` if set, else `~/.cache/nanochat`. Returns an absolute path (str).
    """
    base_dir = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    base_dir = os.path.abspath(base_dir)
    os.makedirs(base_dir, exist_ok=True)
    return base_dir


def get_dist_info():
    """Return (is_ddp, rank, local_rank, world_size) from the torchrun environment variables.

    Outside torchrun: (False, 0, 0, 1).
    """
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def print0(*args, **kwargs):
    """print() on rank 0 only (every process prints outside torchrun)."""
    if get_dist_info()[1] == 0:
        print(*args, **kwargs, flush=True)


def autodetect_device_type():
    """Return the best available device type: "cuda" > "mps" > "cpu"."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autodetect_dtype(device_type):
    """Return the compute dtype for autocast on `device_type`.

    bf16 on CUDA GPUs with compute capability >= 8.0 (Ampere and newer), fp32 otherwise.
    `NANOCHAT_DTYPE=bfloat16|float32|float16` overrides the choice.

    Raises:
        ValueError: NANOCHAT_DTYPE names an unknown dtype.
    """
    override = os.environ.get("NANOCHAT_DTYPE")
    if override:
        names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
                 "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
        if override not in names:
            raise ValueError(f"NANOCHAT_DTYPE={override!r} is not one of {sorted(names)}; unset it or pick one of those")
        return names[override]
    if device_type == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


# How long a rank waits in a collective (all-reduce, barrier) for the others before it gives up
# with an error: 10 minutes, NCCL's own default, and longer than anything one rank does alone
# (sampling, a checkpoint write of a d32) while the others wait. Without it a node that vanishes
# without closing its connections (power, cable, a hung GPU) leaves the others waiting for 30
# minutes (gloo's default). NANOCHAT_DIST_TIMEOUT (seconds) overrides it; the tests use seconds.
DIST_TIMEOUT_S = 600
_writes_checkpoints = None  # set by compute_init under torchrun; see writes_checkpoint_files()


def compute_init(device_type=None):
    """Initialise the process: seeds, precision flags, and torch.distributed under torchrun.

    Uses nccl on CUDA and gloo on CPU, with a timeout of DIST_TIMEOUT_S (NANOCHAT_DIST_TIMEOUT)
    per collective. Under several nodes it also finds out whether $NANOCHAT_BASE_DIR is shared
    between them (writes_checkpoint_files). Returns (is_ddp, rank, local_rank, world_size, device).

    Raises:
        ValueError: an unknown or unavailable `device_type`, or a bad NANOCHAT_DIST_TIMEOUT.
    """
    global _writes_checkpoints
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"--device-type {device_type!r} is not one of cuda, mps, cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device-type cuda was asked for but torch sees no CUDA GPU; use --device-type cpu")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device-type mps was asked for but MPS is not available; use --device-type cpu")
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # tf32 for the fp32 matmuls that remain (e.g. logits)
        torch.backends.cudnn.allow_tf32 = True
    is_ddp, rank, local_rank, world_size = get_dist_info()
    if is_ddp:
        # a failed or timed-out NCCL collective raises in the thread that waits on it (CleanUpOnly)
        # instead of NCCL's watchdog killing the process from its own thread (the default, 3), so
        # the stage can say what happened (training.init_compute's excepthook)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        timeout = datetime.timedelta(seconds=dist_timeout_s())
        if device_type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl", device_id=device, timeout=timeout)
        else:
            device = torch.device(device_type)
            dist.init_process_group(backend="gloo", timeout=timeout)
        dist.barrier()
        # torchrun's rendezvous joins whatever the nodes launched at that address: two nodes that
        # disagree about which stage is next (say a .done marker on one only) must stop, not mix
        command = [os.path.basename(sys.argv[0])] + [arg for arg in sys.argv[1:] if arg != "--resume"]  # any_rank's
        check_ranks_agree({"command": " ".join(command)},
                          "Every node must run the same command: compare the nodes' $NANOCHAT_BASE_DIR/logs/*.done "
                          "markers (a stage done on one node only) and --data")
        shared = _base_dir_is_shared()  # a collective: every rank asks
        _writes_checkpoints = rank == 0 or (local_rank == 0 and not shared)
    else:
        device = torch.device(device_type)
    return is_ddp, rank, local_rank, world_size, device


def dist_timeout_s():
    """Seconds a collective waits for the other ranks: NANOCHAT_DIST_TIMEOUT, else DIST_TIMEOUT_S.

    Raises ValueError when NANOCHAT_DIST_TIMEOUT is not a positive number."""
    value = os.environ.get("NANOCHAT_DIST_TIMEOUT", "")
    if not value:
        return DIST_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise ValueError(f"NANOCHAT_DIST_TIMEOUT={value!r} is not a positive number of seconds; unset it or fix it")
    return seconds


def _base_dir_is_shared():
    """Under multi-node torchrun: does every node see the same $NANOCHAT_BASE_DIR (NFS, a cluster's
    shared disk)? Rank 0 writes a file with a random name there and the first rank of every other
    node looks for it. A collective: every rank calls it (compute_init does). One node: False."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    if local_world == dist.get_world_size():
        return False
    names = [f".shared_check_{secrets.token_hex(8)}"]
    dist.broadcast_object_list(names, src=0)
    path = os.path.join(get_base_dir(), names[0])  # each node's own $NANOCHAT_BASE_DIR
    if dist.get_rank() == 0:
        open(path, "w").close()
    dist.barrier()
    seen = gather_from_ranks(get_dist_info()[2] == 0 and dist.get_rank() != 0 and os.path.exists(path))
    if dist.get_rank() == 0:
        os.unlink(path)
    return any(seen)


def writes_checkpoint_files():
    """Whether this process writes the model and meta files of checkpoints (and prunes old ones).

    Global rank 0 does; under multi-node torchrun so does the first process of every other node,
    unless the nodes share $NANOCHAT_BASE_DIR: with a disk of its own, every node then keeps a
    complete copy of every checkpoint (its ranks' optimizer shards, the model, the meta), so the
    next stage and a resume read their files locally. Outside torchrun: True.
    """
    if _writes_checkpoints is None:
        return get_dist_info()[1] == 0
    return _writes_checkpoints


def gather_from_ranks(obj):
    """[obj of rank 0, obj of rank 1, ...]: every rank's `obj` (anything picklable), on every rank.

    A collective under torch.distributed (all_gather_object); outside it, [obj].
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def any_rank(flag):
    """Whether `flag` (bool) is true on any rank: a collective under torch.distributed, else `flag`.

    For decisions every rank must take together although each sees only its node's files, e.g.
    --resume, which the shell passes when a node's checkpoint directory holds a checkpoint.
    """
    return any(gather_from_ranks(bool(flag)))


class RankMismatchError(ValueError):
    """The ranks of a run do not have the same inputs (data, tokenizer, checkpoint); str() says
    which ranks and hosts differ and how to fix it."""


def check_ranks_agree(fingerprints, fix):
    """Stop a distributed run whose ranks would train on different inputs.

    fingerprints: {name: str} of what must be the same on every rank (say the tokenizer's
    content hash and the shard list's); fix: the sentence that tells the user how to make them
    agree. A collective under torch.distributed (every rank calls it with the same names);
    nothing happens outside it.

    Raises:
        RankMismatchError (on every rank): some rank's value differs from rank 0's; the message
            lists each distinct value with the ranks and hosts that have it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    everyone = gather_from_ranks((socket.gethostname(), fingerprints))
    problems = []
    for name in fingerprints:
        holders = {}
        for rank, (host, values) in enumerate(everyone):
            holders.setdefault(values.get(name), []).append(f"{rank} ({host})")
        if len(holders) > 1:
            problems.append(f"{name} differs: " + "; ".join(f"ranks {', '.join(ranks)} have {str(value)[:300]}"
                                                             for value, ranks in holders.items()))
    if problems:
        raise RankMismatchError("the processes of this run do not have the same inputs: " + " | ".join(problems)
                                + f". {fix}")


def compute_cleanup():
    """Tear down torch.distributed if compute_init started it, after a barrier: a rank that tears
    its process group down while another is still finishing the last collective can abort
    ("terminate called without an active exception", seen once with gloo on a loaded CPU)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# bf16 dense peak FLOP/s (no sparsity) from the vendors' datasheets. Matched by substring of
# torch.cuda.get_device_name(), most specific first. GB10 (DGX Spark) is derived: NVIDIA publishes
# only "1 PFLOP FP4 with sparsity"; dense halves it (500 TFLOP/s FP4), and each doubling of the
# operand width halves the tensor-core rate on Blackwell (250 FP8, 125 bf16), so 125e12, the
# figure DGX Spark users quote too. The device check's MFU on a GB10 will say if it is off.
GPU_PEAK_FLOPS_BF16 = [
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("GB10", 125e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 5090", 209.5e12),
    ("RTX 4090", 165.2e12),
    ("RTX 3090", 71e12),
]


# Peak memory bandwidth in bytes/s from the vendors' datasheets, matched like GPU_PEAK_FLOPS_BF16
# (GB10: 273 GB/s LPDDR5x, NVIDIA's DGX Spark datasheet). Decoding one token reads every weight,
# so this bounds decode speed; dev/device_check.py reports decode's use of it.
GPU_MEMORY_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM
    ("B200", 8.0e12),
    ("GB10", 273e9),
    ("A100", 2.0e12),
    ("A10G", 600e9),
    ("L40S", 864e9),
    ("L4", 300e9),
    ("RTX 5090", 1.79e12),
    ("RTX 4090", 1.01e12),
    ("RTX 3090", 936e9),
]


def get_memory_bandwidth(device_name):
    """Peak memory bandwidth in bytes/s for a GPU name (GPU_MEMORY_BANDWIDTH), or None when unknown."""
    return next((bw for key, bw in GPU_MEMORY_BANDWIDTH if key in device_name), None)


def get_peak_flops(device_name):
    """Return the bf16 dense peak FLOP/s for a GPU name, or None when it is not in the table.

    None means MFU is reported as "n/a" (never 0 or inf).
    """
    for key, flops in GPU_PEAK_FLOPS_BF16:
        if key.lower() in device_name.lower():
            return flops
    return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser that also accepts underscores in dashed long flags.

    `--device-batch-size` is the documented spelling; `--device_batch_size` (upstream
    nanochat's spelling, used in many guides) is accepted as an alias. `--flag=value` works too.
    """

    def add_argument(self, *names, **kwargs):
        aliases = ["--" + n[2:].replace("-", "_") for n in names if n.startswith("--") and "-" in n[2:]]
        return super().add_argument(*names, *aliases, **kwargs)


class DummyWandb:
    """Stands in for a wandb run when logging is off (--run dummy) or on ranks > 0."""

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def init_wandb(run, project, config, rank=0):
    """A wandb run named `run` on rank 0, or a DummyWandb when run == "dummy" or rank > 0.

    Raises:
        RuntimeError: wandb cannot start (not logged in, offline); the message says how to
            log in or to pass --run dummy.
    """
    if run == "dummy" or rank != 0:
        return DummyWandb()
    import wandb
    try:
        return wandb.init(project=project, name=run, config=config)
    except Exception as e:  # wandb raises several unrelated types for login/network problems
        raise RuntimeError(f"wandb could not start run {run!r} ({e}); run `wandb login` first, set WANDB_MODE=offline, "
                           "or pass --run dummy to train without wandb") from e


class DiskFullError(OSError):
    """A write failed for want of space (ENOSPC, or EDQUOT: over quota). str() is a message for
    the user that names the directory and the space; the file being written was left as it was."""

    def __init__(self, message):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self):
        return self.message


class _WriteRecorder:
    """A binary file that remembers the OSError its write() raised: torch.save reports a failed
    write as a RuntimeError without the errno, and atomic_write needs to know it was a full disk."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def atomic_write(path, data):
    """Write `path` so that a reader (or a crash) sees the old file or the complete new one, never half.

    data: bytes, str (written as UTF-8), or a callable write(f) that writes to a binary file
    object (e.g. `lambda f: torch.save(obj, f)`). The new content goes to a temporary file in
    the same directory, is fsynced, renamed onto `path`, and the directory is fsynced (so the
    rename survives a power cut). Parent directories are created. On an exception the
    temporary file is removed; after a SIGKILL it stays behind as .<name>.<random>.tmp, which
    nothing reads.

    Raises:
        DiskFullError: the disk (or quota) ran out; the message names the directory, the bytes
            written when it did and the space free. `path` is then unchanged.
        OSError: the directory cannot be created or written (permissions, ...); `path` is
            then unchanged. Whatever the callable raises, likewise.
    """
    path = os.path.abspath(path)
    dir_path = os.path.dirname(path)
    os.makedirs(dir_path, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=dir_path, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    recorder = None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would give it
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                recorder = _WriteRecorder(f)
                data(recorder)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        written = os.path.getsize(tmp_path) if os.path.exists(tmp_path) else 0
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise_if_disk_full(recorder.error if recorder is not None and recorder.error is not None else e, path, written)
        raise
    fsync_dir(dir_path)


def raise_if_disk_full(error, path, written):
    """Raise DiskFullError (from `error`) if `error` is an OSError for a full disk or quota that
    struck while `written` bytes of `path` were written; else return."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(error, DiskFullError):
        dir_path = os.path.dirname(path)
        free = shutil.disk_usage(dir_path).free
        raise DiskFullError(f"no space left on the disk of {dir_path} while writing {os.path.basename(path)} "
                            f"({format_bytes(written)} written, {format_bytes(free)} free now); free some space there "
                            "and run the same command again") from error


def format_bytes(num_bytes):
    """1536 -> '1.5 KiB', 3 * 2**30 -> '3.0 GiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024


def fsync_dir(dir_path):
    """Make a rename or unlink in `dir_path` durable across a power cut (POSIX; a no-op elsewhere).

    Raises:
        OSError: `dir_path` cannot be opened.
    """
    if os.name != "posix":
        return
    fd = os.open(dir_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask():
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ProgressPrinter:
    """The progress line of a long loop that has no per-step line of its own (an evaluation):
    "<label>: 120/1000 <unit> (12%) | 31s | eta 3m47s" on rank 0, at most once every `every_s`
    seconds and never for the last item, so a loop that ends sooner prints nothing.

    Call update(done) after each item; done counts items finished (1..total).
    """

    def __init__(self, label, total, unit, every_s=30.0):
        import time
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.clock = time.perf_counter
        self.t0 = self.last = self.clock()

    def update(self, done):
        now = self.clock()
        if now - self.last >= self.every_s and done < self.total:
            eta = (now - self.t0) / done * (self.total - done)  # queued device work: errs on the short side
            print0(f"{self.label}: {done}/{self.total} {self.unit} ({100 * done / self.total:.0f}%) | "
                   f"{format_duration(now - self.t0)} | eta {format_duration(eta)}")
            self.last = now


def format_duration(seconds):
    """Seconds -> '3d04h05m', '3h25m45s', '12m05s', '7s'; '?' for None. Negative counts as 0."""
    if seconds is None:
        return "?"
    seconds = int(max(seconds, 0))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


DEFAULT_HF_ENDPOINT = "https://huggingface.co"


def hub_reachable(timeout=3.0):
    """True if the Hugging Face Hub ($HF_ENDPOINT, default https://huggingface.co) answers within
    `timeout` seconds, with any HTTP status. The one check every stage and script uses to pick
    online or offline data.

    False without asking when HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set to 1.
    """
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    url = os.environ.get("HF_ENDPOINT", DEFAULT_HF_ENDPOINT).rstrip("/") + "/api/datasets/openai/gsm8k"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered, even if with an error status
    except (urllib.error.URLError, OSError, ValueError):
        return False


def is_unified_memory(device_name, integrated):
    """True for GPUs that share the system's memory (DGX Spark's GB10, Jetson): the CUDA
    driver reports `integrated` for them, and GB10 is also recognised by name in case a
    driver does not. On those, cudaMemGetInfo leaves out memory the OS could reclaim from its
    page cache, so the system total (psutil) is the memory a run can use
    (https://github.com/vllm-project/vllm/issues/35313,
    https://github.com/ggml-org/llama.cpp/pull/17368)."""
    return bool(integrated) or "GB10" in device_name


def gpu_memory_bytes(device_index=0):
    """(bytes, unified) for CUDA device `device_index`: the memory a run can use (the system
    total on unified-memory GPUs, see is_unified_memory) and whether it is unified.

    Raises:
        RuntimeError: torch sees no CUDA GPU.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU")
    import psutil
    props = torch.cuda.get_device_properties(device_index)
    unified = is_unified_memory(props.name, getattr(props, "is_integrated", False))
    return (psutil.virtual_memory().total if unified else props.total_memory), unified

