"""
Sandboxed execution of untrusted Python: the HumanEval grader (and anything else that hands
over a program a model wrote) calls `execute_code`, which runs the program in a fresh
interpreter and reports what happened (exit status, captured output, timeout, memory
exhaustion) instead of raising.

How one call runs (Linux only):
    execute_code (this process)
      └─ supervisor: `python -I -S execution.py`, a new session, child subreaper, our own uid
           └─ bwrap (bubblewrap, https://github.com/containers/bubblewrap): new network, pid,
              ipc and uts namespaces, a filesystem of read-only /usr and the interpreter only
                └─ the program: `python -s -S`, own process group, resource limits, and when
                   we are root, uid/gid 65534 (nobody/nogroup) with no capabilities
The supervisor enforces the wall-clock timeout, then kills every process the program left
behind, double-forked and setsid()-escaped ones included: as a child subreaper it inherits
all of them, and a pid namespace dies with its first process. This process reads the output
with a size cap and removes the per-call directory.

Two sandboxes, chosen once per process by `sandbox_kind()`:
- "bubblewrap" (the default where `bwrap` runs; setup.sh installs it): everything below.
- "basic" (no bwrap, or unprivileged user namespaces are off, or NANOCHAT_SANDBOX=basic): the
  same process tree without bwrap. The first call prints one warning saying so. What it
  lacks is marked [bwrap] below.

What it protects against (code that a language model wrote by mistake or for a reward):
- running forever: wall-clock timeout, and RLIMIT_CPU for CPU-bound threads;
- exhausting the machine: RLIMIT_AS (memory), RLIMIT_FSIZE (10 MB per file written),
  RLIMIT_NPROC (fork bombs: 64 tasks on top of what the program's uid already runs),
  RLIMIT_CORE 0, at most `max_output_bytes` kept per output stream, and [bwrap] a disk of
  its own: the working directory and /tmp are tmpfs of TMPFS_MB each, gone when it exits,
  everything else read-only; a seccomp filter refuses it user namespaces of its own (where
  it could mount a tmpfs of any size, which no rlimit counts);
- leftovers: every process it started is killed and its working directory removed;
- leaking our state: the program gets a fresh environment (no secrets from os.environ),
  no inherited file descriptors, stdin from /dev/null;
- [bwrap] the network: its own network namespace has nothing but its own loopback, so it
  reaches neither the internet nor servers on this machine's 127.0.0.1;
- [bwrap] reading files: it sees /usr (and /bin, /lib... links into it), the interpreter's
  install prefix, a fresh /proc, a minimal /dev and its own tmpfs; not the home directory,
  the repo, $NANOCHAT_BASE_DIR, /etc, /root or other users' files;
- [bwrap] other processes: in its pid namespace it sees, and can signal, only its own;
- when we run as root: the program runs as uid 65534 with no_new_privs and no
  capabilities, so it cannot write where `nobody` cannot, cannot signal our processes, and
  RLIMIT_NPROC is enforced (the kernel does not enforce it for root). [basic] If `nobody`
  cannot reach the interpreter (a pyenv or uv Python under /root) the program keeps
  CAP_DAC_READ_SEARCH, which Python needs to start: it can then read every file.

What it does NOT protect against:
- a determined attacker: the seccomp filter blocks only new user namespaces and there is no
  cgroup; a kernel exploit escapes all of the above;
- third-party packages: the program sees the standard library only (-s -S), which is all
  HumanEval and the calculator need;
- [basic] the network, reading whatever its uid may read, and files left in world-writable
  places (/tmp, /dev/shm; each at most 10 MB);
- [basic] when we are not root, the program runs as our own user: it can write, delete and
  signal anything we can. A small prelude turns off the obvious destructive calls
  (os.remove, shutil.rmtree, os.kill, os.fork, subprocess, ...) so that an accident is
  unlikely, but it is a guard rail, not a wall: ctypes gets around it.
"""

import ctypes
import json
import math
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

SANDBOX_UID = 65534  # nobody on Debian, Ubuntu, Fedora, Arch
SANDBOX_GID = 65534  # nogroup / nobody
MAX_FILE_MB = 10  # RLIMIT_FSIZE: the largest file the program may write
MAX_PROCESSES = 64  # RLIMIT_NPROC headroom: tasks (processes + threads) the program may add
SUPERVISOR_GRACE = 5.0  # seconds past the timeout before we kill the supervisor itself
TMPFS_MB = 64  # [bwrap] size of the program's working directory and of its /tmp, each

# Linux constants (linux/prctl.h, linux/capability.h) that the standard library does not name.
_PR_SET_KEEPCAPS = 8
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_RAISE = 2
_CAP_DAC_READ_SEARCH = 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# Runs first in the program's interpreter. Its only job is to make accidents unlikely (see
# the module docstring); the OS limits above are what contain the program.
_PRELUDE = """\
def _run():
    import _posixsubprocess, builtins, os, sys
    def disabled(*args, **kwargs):
        raise PermissionError("disabled in the nanochat sandbox")
    for name in ("kill", "killpg", "system", "popen", "fork", "forkpty", "posix_spawn",
                 "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                 "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp",
                 "spawnlpe", "spawnvp", "spawnvpe", "remove", "unlink", "rmdir", "removedirs",
                 "rename", "renames", "replace", "truncate", "chmod", "chown", "lchown"):
        if hasattr(os, name):
            setattr(os, name, disabled)
    # subprocess spawns through fork_exec, and shutil.rmtree/move through the os functions
    # above: this covers them without importing both on every run (~40 ms of CPU each call)
    _posixsubprocess.fork_exec = disabled
    builtins.exit = builtins.quit = sys.exit  # -S skips site.py, which defines them
    sys.path = [p for p in sys.path if p]  # no imports from the working directory (-P on 3.11+)
    sys.argv = sys.argv[1:]
    with open(sys.argv[0], "rb") as f:
        code = compile(f.read(), sys.argv[0], "exec")
    # run as __main__ in a namespace as clean as `python program.py` gives (no os, no _run)
    namespace = sys.modules["__main__"].__dict__
    for name in [name for name in namespace if not name.startswith("__")]:
        del namespace[name]
    namespace["__file__"] = sys.argv[0]
    try:
        exec(code, namespace)
    except SystemExit as e:  # bubblewrap reports death by signal N as status 128 + N: keep them apart
        if isinstance(e.code, int) and e.code > 128:
            raise SystemExit(1) from None
        raise
_run()
"""


@dataclass
class ExecutionResult:
    success: bool  # the program exited with status 0 within the limits
    stdout: str  # captured, at most max_output_bytes (then a truncation note is appended)
    stderr: str  # same; holds the traceback when the program raised
    timeout: bool  # killed for running past the wall-clock timeout or RLIMIT_CPU
    memory_exceeded: bool  # raised MemoryError (RLIMIT_AS) or was SIGKILLed (OOM killer)
    error: str | None  # one line saying why it failed; None on success
    returncode: int | None  # exit status, -N if killed by signal N; None if it never ran


_sandbox_kind = None  # what sandbox_kind() decided for this process
_sandbox_kind_lock = threading.Lock()  # HumanEval grades from several threads: probe and warn once


def sandbox_kind():
    """Which sandbox execute_code uses in this process: "bubblewrap" or "basic" (see the module
    docstring). Decided on the first call, by NANOCHAT_SANDBOX (auto, the default; bubblewrap;
    basic) and, for auto, by running `bwrap` once (~10 ms); prints one warning when it falls
    back to "basic".

    Raises:
        RuntimeError: NANOCHAT_SANDBOX=bubblewrap but bwrap cannot run here (the message says why),
            or NANOCHAT_SANDBOX holds something else.
    """
    with _sandbox_kind_lock:
        return _choose_sandbox()


def _choose_sandbox():
    global _sandbox_kind
    if _sandbox_kind is not None:
        return _sandbox_kind
    wanted = os.environ.get("NANOCHAT_SANDBOX", "auto")
    if wanted not in ("auto", "bubblewrap", "basic"):
        raise RuntimeError(f"NANOCHAT_SANDBOX={wanted!r}: use auto, bubblewrap or basic")
    problem = None if wanted == "basic" else _bubblewrap_problem()
    if wanted == "bubblewrap" and problem:
        raise RuntimeError(f"NANOCHAT_SANDBOX=bubblewrap, but {problem}")
    if wanted == "auto" and problem:
        print(f"WARNING: {problem}. Model-written code (HumanEval) runs in the basic sandbox: resource "
              "limits and (as root) uid 65534, but with the network and every file its uid can read. "
              "Install bubblewrap (apt-get install bubblewrap, or re-run setup.sh) to isolate it; "
              "NANOCHAT_SANDBOX=basic silences this.", file=sys.stderr, flush=True)
    _sandbox_kind = "basic" if wanted == "basic" or problem else "bubblewrap"
    return _sandbox_kind


def _bubblewrap_problem():
    """None if a program runs in the bubblewrap sandbox here exactly as execute_code runs it,
    else why not (one line)."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed"
    if os.geteuid() == 0 and shutil.which("setpriv", path="/usr/bin:/bin") is None:
        return "setpriv (util-linux) is not in /usr/bin, so the sandbox cannot drop root"
    if _seccomp_filter() is None:
        return f"no seccomp filter for this CPU ({platform.machine()}) to keep the program from making user namespaces"
    workdir = tempfile.mkdtemp(prefix="nanochat-probe-")
    try:
        result = _run_supervised("print('ok')", workdir, 30.0, 256, 10_000, "bubblewrap")
    finally:
        _remove_tree(workdir)
    if result.stdout != "ok\n":
        reason = (result.error or result.stderr.strip() or "no output").splitlines()[-1]
        return f"bubblewrap could not start ({reason}; unprivileged user namespaces may be off: " \
               "sysctl kernel.unprivileged_userns_clone)"
    return None


# Syscall numbers (asm/unistd.h) and AUDIT_ARCH values (linux/audit.h) of the CPUs we run on.
_SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, {"unshare": 272, "clone": 56, "clone3": 435}),
    "aarch64": (0xC00000B7, {"unshare": 97, "clone": 220, "clone3": 435}),
}
_CLONE_NEWUSER = 0x10000000


def _seccomp_filter():
    """A classic-BPF seccomp program (bytes, for bwrap --seccomp) that refuses to make user
    namespaces: unshare/clone with CLONE_NEWUSER get EPERM, clone3 ENOSYS (its flags live in
    memory BPF cannot read; glibc then falls back to clone), syscalls of another ABI (i386 via
    int 0x80, x32) EPERM; everything else is allowed. None on other CPUs.

    Why: in its own user namespace a program is root there and may mount a tmpfs of any size,
    which no rlimit counts. Layout: struct sock_filter {u16 code; u8 jt, jf; u32 k} (linux/filter.h),
    over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]} (linux/seccomp.h).
    """
    if platform.machine() not in _SECCOMP_ARCHES:
        return None
    arch, nr = _SECCOMP_ARCHES[platform.machine()]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ALLOW, _ERRNO | errno
    program = [
        (ld, 0, 0, 4),                     # 0: A = arch
        (jeq, 1, 0, arch),                 # 1: our ABI? -> 3
        (ret, 0, 0, eperm),                # 2: another ABI: refused
        (ld, 0, 0, 0),                     # 3: A = syscall number
        (jge, 6, 0, 0x40000000),           # 4: x32 ABI bit -> 11
        (jeq, 3, 0, nr["unshare"]),        # 5: -> 9
        (jeq, 2, 0, nr["clone"]),          # 6: -> 9
        (jeq, 4, 0, nr["clone3"]),         # 7: -> 12
        (ret, 0, 0, allow),                # 8
        (ld, 0, 0, 16),                    # 9: A = low 32 bits of args[0], the flags
        (jset, 0, 2, _CLONE_NEWUSER),      # 10: CLONE_NEWUSER -> 11, else -> 13
        (ret, 0, 0, eperm),                # 11
        (ret, 0, 0, enosys),               # 12
        (ret, 0, 0, allow),                # 13
    ]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def _bubblewrap_argv(bwrap, python_argv, home, read_only_files, seccomp_fd):
    """The bwrap command line that runs python_argv (its interpreter a real path, not a venv
    link) in new network/pid/ipc/uts namespaces, under the seccomp program in seccomp_fd, over a
    filesystem of read-only /usr, /dev, the interpreter's prefix and read_only_files, with home
    (its cwd) and /tmp as private tmpfs. As root, bwrap keeps just enough to let setpriv become
    uid 65534 with no capabilities."""
    as_root = os.geteuid() == 0
    argv = [bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--seccomp", str(seccomp_fd)]
    if not as_root:  # root needs no user namespace to make the others, and must keep real uids to drop to 65534
        argv.append("--unshare-user")
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    prefix = os.path.realpath(sys.base_prefix)
    if not prefix.startswith("/usr/"):
        # its parents (e.g. /root of a pyenv Python) must be traversable by uid 65534, or the
        # loader falls back to another libpython than the interpreter's
        for parent in _parents(prefix)[1:]:
            argv += ["--perms", "0755", "--dir", parent]
        argv += ["--ro-bind", prefix, prefix]
    tmpfs_bytes = str(TMPFS_MB * 2**20)
    argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",  # a writable /dev would be a tmpfs of no set size
             "--perms", "1777", "--size", tmpfs_bytes, "--tmpfs", "/tmp",
             "--perms", "0777" if as_root else "0700", "--size", tmpfs_bytes, "--tmpfs", home, "--chdir", home]
    for path in read_only_files:  # after /tmp's tmpfs, which would hide them
        argv += ["--ro-bind", path, path]
    argv += ["--remount-ro", "/"]  # the root bwrap built is a tmpfs too: no other place to write
    if as_root:
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--",
                 "/usr/bin/setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all"]
    else:
        argv.append("--")
    return argv + python_argv


def execute_code(code, timeout=5.0, memory_limit_mb=256, max_output_bytes=1_000_000):
    """Run the Python program `code` in a sandboxed child process and return an ExecutionResult.

    timeout: wall-clock seconds the program may run (its CPU time is capped at that + 1 s).
    memory_limit_mb: address-space limit (RLIMIT_AS) in MB; Python itself needs ~16 MB to start.
    max_output_bytes: bytes of stdout and of stderr kept each; the rest is read and dropped.

    Never raises for anything the program does (syntax errors, exceptions, sys.exit, timeouts,
    memory exhaustion, fork bombs, signals); see the module docstring for what is contained.
    Exit statuses above 128 are reported as 1 (bubblewrap uses 128 + N for death by signal N).
    Raises ValueError for bad arguments, RuntimeError off Linux or when NANOCHAT_SANDBOX asks for
    what cannot run here (sandbox_kind), OSError if the working directory or the supervisor
    process cannot be created.
    """
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not (isinstance(memory_limit_mb, int) and memory_limit_mb > 0):
        raise ValueError(f"memory_limit_mb must be a positive int, got {memory_limit_mb!r}")
    if not (isinstance(max_output_bytes, int) and max_output_bytes >= 0):
        raise ValueError(f"max_output_bytes must be an int >= 0, got {max_output_bytes!r}")
    if not sys.platform.startswith("linux"):
        raise RuntimeError("execute_code needs Linux (prctl, /proc); it cannot sandbox on " + sys.platform)

    sandbox = sandbox_kind()
    workdir = tempfile.mkdtemp(prefix="nanochat-exec-")
    try:
        return _run_supervised(code, workdir, float(timeout), memory_limit_mb, max_output_bytes, sandbox)
    finally:
        _remove_tree(workdir)


def _parents(path):
    """The directories above `path`, outermost first: /a/b/c -> [/, /a, /a/b]."""
    parents = []
    while (path := os.path.dirname(path)) not in parents:
        parents.insert(0, path)
    return parents


def _run_supervised(code, workdir, timeout, memory_limit_mb, max_output_bytes, sandbox):
    """Start the supervisor on `code` in `workdir`, collect its output, build the result.

    Layout: workdir/ (ours, 0711) holds program.py (ours, 0644) and home/ (0700, the program's
    cwd, HOME and TMPDIR; given to uid 65534 when we are root). The program owns nothing in
    /tmp itself, so it cannot swap workdir for a symlink that our cleanup would then follow.
    """
    os.chmod(workdir, 0o711)
    program = os.path.join(workdir, "program.py")
    # surrogatepass: a str Python cannot encode still reaches the child, which reports a SyntaxError
    with open(program, "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(code)
    os.chmod(program, 0o644)
    home = os.path.join(workdir, "home")
    os.mkdir(home, 0o700)
    if os.geteuid() == 0:
        os.chown(home, SANDBOX_UID, SANDBOX_GID)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",  # set and dict orders, hence graded output, are reproducible
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    status_read, status_write = os.pipe()
    config = {"program": program, "home": home, "timeout": timeout, "memory_limit_mb": memory_limit_mb,
              "status_fd": status_write, "sandbox": sandbox, "bwrap": shutil.which("bwrap")}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
            cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(status_write,), close_fds=True, start_new_session=True,
        )
    except BaseException:
        os.close(status_read)
        raise
    finally:
        os.close(status_write)

    with proc, open(status_read, "rb"):  # closes status_read
        out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
        caps = {out_fd: max_output_bytes, err_fd: max_output_bytes, status_read: 1 << 16}
        try:
            outputs, finished = _read_capped(caps, time.monotonic() + timeout + SUPERVISOR_GRACE)
        except BaseException:  # e.g. Ctrl-C: do not leave the program running
            _kill_session(proc.pid)
            raise
        if not finished:
            _kill_session(proc.pid)  # the supervisor hung: last resort, kill all it started
        proc.wait()
    stdout, stderr = _decode(outputs[out_fd], max_output_bytes), _decode(outputs[err_fd], max_output_bytes)
    status = {}
    for line in outputs[status_read][0].splitlines():
        try:  # as our own uid the program could open the status pipe via /proc and write junk
            fields = json.loads(line)
        except ValueError:
            continue
        if isinstance(fields, dict):
            status.update(fields)  # the supervisor writes last, once the program is dead

    if "setup_error" in status:
        return ExecutionResult(False, stdout, stderr, False, False, f"sandbox setup failed: {status['setup_error']}", None)
    if not (isinstance(status.get("returncode"), int) and isinstance(status.get("timeout"), bool)):
        return ExecutionResult(False, stdout, stderr, True, False, "sandbox supervisor did not finish and was killed", None)
    returncode = status["returncode"]
    if sandbox == "bubblewrap" and returncode == 1 and stderr.startswith("bwrap: "):  # bwrap itself failed
        return ExecutionResult(False, stdout, stderr, False, False, f"sandbox setup failed: {stderr.splitlines()[0]}", None)
    timed_out = status["timeout"] or returncode == -signal.SIGXCPU
    memory_exceeded = not timed_out and returncode != 0 and (
        returncode == -signal.SIGKILL or re.search(r"^MemoryError\b", stderr, re.MULTILINE) is not None
    )
    if returncode == 0:
        error = None
    elif timed_out:
        error = f"timed out after {timeout:g} s"
    elif memory_exceeded:
        error = f"memory limit exceeded ({memory_limit_mb} MB)"
    elif returncode < 0:
        try:
            error = f"killed by signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:  # a real-time signal has no name
            error = f"killed by signal {-returncode}"
    else:
        last_lines = stderr.strip().splitlines()
        error = last_lines[-1] if last_lines else f"exit status {returncode}"
    return ExecutionResult(returncode == 0, stdout, stderr, timed_out, memory_exceeded, error, returncode)


def _read_capped(caps, deadline):
    """Read file descriptors to EOF, keeping at most caps[fd] bytes of each.

    Returns ({fd: (bytes kept, truncated)}, finished); finished is False if `deadline`
    (time.monotonic() seconds) came first. Bytes past a cap are read and dropped, so a
    flooding program neither blocks nor grows our memory.
    """
    kept = {fd: bytearray() for fd in caps}
    truncated = dict.fromkeys(caps, False)
    with selectors.DefaultSelector() as selector:
        for fd in caps:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {fd: (bytes(kept[fd]), truncated[fd]) for fd in caps}, False
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                room = caps[key.fd] - len(kept[key.fd])
                kept[key.fd] += chunk[:max(room, 0)]
                truncated[key.fd] |= len(chunk) > room
    return {fd: (bytes(kept[fd]), truncated[fd]) for fd in caps}, True


def _decode(output, max_output_bytes):
    data, truncated = output
    text = data.decode("utf-8", errors="replace")
    return text + f"\n[output truncated: more than {max_output_bytes} bytes]" if truncated else text


def _remove_tree(path):
    """Remove the working directory, whatever the program left in it."""
    try:
        shutil.rmtree(path)
    except (OSError, RecursionError):
        # Left to coreutils, which cope with any depth: as our own uid, the program may have
        # taken away our permissions inside (chmod), or nested directories past Python's
        # recursion limit.
        subprocess.run(["chmod", "-R", "u+rwx", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run(["rm", "-rf", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _proc_stat(pid):
    """(ppid, session id) of process `pid` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
    return int(fields[1]), int(fields[3])


def _pids():
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _kill_session(sid):
    """SIGKILL every process in session `sid` (the supervisor's, when it must be killed)."""
    for pid in _pids():
        stat = _proc_stat(pid)
        if stat is not None and stat[1] == sid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _count_tasks(uid):
    """Processes + threads whose real uid is `uid`: what RLIMIT_NPROC counts."""
    tasks = 0
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid:
            tasks += int(fields["Threads"])
    return tasks


# -----------------------------------------------------------------------------
# The supervisor: runs in its own interpreter (`python -I -S execution.py CONFIG`), so that
# the forking, uid changes and signal masks below never touch the caller's (threaded) process.

def _supervise(config):
    """Fork the program, wait for it up to the timeout, kill all it left, report on the status fd."""
    status_fd = config["status_fd"]
    os.set_inheritable(status_fd, False)  # the program must not be able to write a fake status
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        _report(status_fd, setup_error=f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # so sigtimedwait can wait for it
    pid = os.fork()
    if pid == 0:
        try:
            _enter_sandbox(config, libc)
            if config["sandbox"] == "bubblewrap":
                seccomp_fd = os.memfd_create("nanochat-seccomp", 0)
                os.set_inheritable(seccomp_fd, True)  # bwrap reads it after the exec
                os.write(seccomp_fd, _seccomp_filter())
                os.lseek(seccomp_fd, 0, os.SEEK_SET)
                argv = _bubblewrap_argv(config["bwrap"], [os.path.realpath(sys.executable), "-s", "-S", "-c", _PRELUDE,
                                                          config["program"]], config["home"], [config["program"]], seccomp_fd)
            else:
                argv = [sys.executable, "-s", "-S", "-c", _PRELUDE, config["program"]]
            os.execve(argv[0], argv, os.environ)
        except BaseException as e:
            _report(status_fd, setup_error=f"{type(e).__name__}: {e}")
        os._exit(127)
    deadline = time.monotonic() + config["timeout"]
    status = _wait_for(pid, deadline)
    timed_out = status is None
    status = _kill_descendants(pid, status)
    returncode = os.waitstatus_to_exitcode(status)
    if config["sandbox"] == "bubblewrap" and returncode > 128:  # bwrap exits 128 + N when signal N killed the program
        returncode = 128 - returncode
    _report(status_fd, returncode=returncode, timeout=timed_out)


def _report(status_fd, **status):
    os.write(status_fd, json.dumps(status).encode() + b"\n")


def _enter_sandbox(config, libc):
    """In the forked child, before exec: process group, resource limits, and (as root, in the
    basic sandbox) uid 65534; bubblewrap needs root to build the sandbox and drops it inside."""
    signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the mask survives exec; the program gets none
    os.setpgid(0, 0)  # one killpg then reaches the program and its ordinary children
    uid = SANDBOX_UID if os.geteuid() == 0 else os.getuid()
    memory = config["memory_limit_mb"] * 2**20
    cpu_seconds = math.ceil(config["timeout"]) + 1
    nproc = _count_tasks(uid) + MAX_PROCESSES
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))  # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_MB * 2**20, MAX_FILE_MB * 2**20))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.geteuid() == 0 and config["sandbox"] == "basic":
        _drop_root(libc)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # setuid binaries (su, sudo) cannot raise it again
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _drop_root(libc):
    """Become uid/gid 65534 with no capabilities, or only CAP_DAC_READ_SEARCH if `nobody`
    could not otherwise reach the interpreter and its standard library."""
    if libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:  # keep them across setuid, to decide below
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(SANDBOX_GID)
    os.setuid(SANDBOX_UID)  # real, effective and saved uid: there is no way back to root
    # access() checks the real uid, now 65534, with the effective capabilities (now none)
    stdlib = os.path.dirname(os.__file__)
    reachable = os.access(sys.executable, os.X_OK) and os.access(stdlib, os.R_OK | os.X_OK)
    keep = 0 if reachable else 1 << _CAP_DAC_READ_SEARCH

    class CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class CapData(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    data = (CapData * 2)(CapData(keep, keep, keep), CapData(0, 0, 0))  # capabilities 0-31, 32-63
    if libc.capset(ctypes.byref(CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        if keep:  # e.g. a container without CAP_DAC_READ_SEARCH
            raise PermissionError(
                f"uid {SANDBOX_UID} cannot reach {sys.executable} or {stdlib}, and we cannot grant it "
                "CAP_DAC_READ_SEARCH: make them readable by others (chmod o+rx) or run as a non-root user"
            )
        raise OSError(ctypes.get_errno(), "capset")
    # an ambient capability is the only kind a non-root uid keeps across execve
    if keep and libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, _CAP_DAC_READ_SEARCH, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH)")


def _wait_for(pid, deadline):
    """Reap children until `pid` exits (return its wait status) or `deadline` passes (None)."""
    while True:
        # reap everything: orphans re-parented to us would otherwise count against RLIMIT_NPROC
        while (reaped := os.waitpid(-1, os.WNOHANG))[0] != 0:
            if reaped[0] == pid:
                return reaped[1]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        signal.sigtimedwait({signal.SIGCHLD}, remaining)


def _kill_descendants(pid, status):
    """SIGKILL the program's process group and every process that was re-parented to us,
    until none is left; return the program's wait status (`status`, or the one reaped here)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already empty
    me = os.getpid()
    while True:
        for child in _pids():
            stat = _proc_stat(child)
            if stat is not None and stat[0] == me:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            reaped, child_status = os.waitpid(-1, 0)  # when a child dies, its orphans become ours
        except ChildProcessError:
            return status
        if reaped == pid:
            status = child_status


if __name__ == "__main__":
    _supervise(json.loads(sys.argv[1]))
