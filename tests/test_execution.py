"""Tests for nanochat/execution.py: programs that pass, fail, and try to escape the sandbox.

Every escape attempt must be contained and reported, and this (host) process must survive.
Every test runs in both sandboxes (bubblewrap, skipped where bwrap cannot run; and basic).
The tests marked root_only check what the sandbox promises only when it runs as root (the
program then runs as uid 65534); as another user they are skipped, see the module docstring.
The escape corpus at the end is what only bubblewrap promises (network, files, processes, disk).
"""

import concurrent.futures
import math
import os
import re
import signal
import socket
import time

import pytest

from nanochat import execution
from nanochat.execution import MAX_FILE_MB, SANDBOX_UID, TMPFS_MB, execute_code

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="only as root does the program run as another uid")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BWRAP_PROBLEM = execution._bubblewrap_problem()


@pytest.fixture(params=["bubblewrap", "basic"], autouse=True)
def sandbox(request, monkeypatch):
    """Run the test in one sandbox; bubblewrap is skipped (saying why) where it cannot run."""
    if request.param == "bubblewrap" and BWRAP_PROBLEM:
        pytest.skip(BWRAP_PROBLEM)
    monkeypatch.setattr(execution, "_sandbox_kind", request.param)
    return request.param


bubblewrap_only = pytest.mark.parametrize("sandbox", ["bubblewrap"], indirect=True)
basic_only = pytest.mark.parametrize("sandbox", ["basic"], indirect=True)

WORKDIR = "import os; print(os.getcwd(), flush=True)\n"  # prefix: the program tells us its directory


def sandbox_dir(result):
    """The per-call directory execute_code made: the parent of the program's working directory."""
    return os.path.dirname(result.stdout.split()[0])


def processes_in(workdir):
    """Pids of live processes started on the program in `workdir` (its path is in their argv)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if workdir.encode() in cmdline:
            pids.append(int(name))
    return pids


def test_humaneval_style_program_passes():
    program = (
        "def add(a, b):\n    return a + b\n\n"
        "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\n"
        "check(add)\nprint('ok')\n"
    )
    result = execute_code(program, timeout=2.0)
    assert result.success and result.returncode == 0 and result.error is None
    assert result.stdout == "ok\n" and result.stderr == ""
    assert not result.timeout and not result.memory_exceeded


def test_failing_assertion_fails():
    result = execute_code("def check(f):\n    assert f(1) == 2\n\ncheck(lambda x: x)\n", timeout=2.0)
    assert not result.success and result.returncode == 1
    assert "AssertionError" in result.stderr and result.error == "AssertionError"


def test_exception_reports_traceback():
    result = execute_code("x = 1\ny = x / 0\n", timeout=2.0)
    assert not result.success and result.returncode == 1
    assert "Traceback" in result.stderr and 'program.py", line 2' in result.stderr
    assert result.error == "ZeroDivisionError: division by zero"
    assert not result.timeout and not result.memory_exceeded


def test_syntax_error_and_unencodable_code_are_reported():
    result = execute_code("def f(:\n", timeout=2.0)
    assert not result.success and "SyntaxError" in result.error
    result = execute_code("print('\ud800')", timeout=2.0)  # a lone surrogate: not valid UTF-8
    assert not result.success and "SyntaxError" in result.stderr


def test_exit_status_is_reported():
    assert execute_code("import sys; sys.exit(3)", timeout=2.0).returncode == 3
    result = execute_code("exit(0)", timeout=2.0)  # exit() works although -S skips site.py
    assert result.success


def test_death_by_signal_is_reported():
    result = execute_code("import ctypes\nctypes.string_at(0)\n", timeout=2.0)  # a segfault
    assert result.returncode == -signal.SIGSEGV and result.error == "killed by signal 11 (SIGSEGV)"
    assert not result.success and not result.memory_exceeded and not result.timeout
    result = execute_code("import signal\nsignal.raise_signal(40)\n", timeout=2.0)  # a nameless real-time signal
    assert result.returncode == -40 and result.error == "killed by signal 40"


def test_program_runs_as_main_in_a_clean_namespace():
    program = "print(__name__, sorted(k for k in globals() if not k.startswith('__')))\nos\n"
    result = execute_code(program, timeout=2.0)
    assert result.stdout == "__main__ []\n"
    assert "NameError: name 'os' is not defined" in result.stderr  # the prelude's imports do not leak


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = execute_code("while True:\n    pass\n", timeout=1.0)
    assert time.monotonic() - start < 1.0 + 5.0
    assert result.timeout and not result.success and not result.memory_exceeded
    assert result.returncode == -signal.SIGKILL and result.error == "timed out after 1 s"


def test_huge_allocation_exceeds_memory():
    result = execute_code("x = bytearray(2 * 1024**3)\n", timeout=2.0, memory_limit_mb=128)
    assert result.memory_exceeded and not result.success and not result.timeout
    assert "MemoryError" in result.stderr and "128 MB" in result.error


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = execute_code("import os; print(dict(os.environ))", timeout=2.0)
    assert result.success and "hunter2" not in result.stdout and "NANOCHAT_TEST_SECRET" not in result.stdout
    env = eval(result.stdout)
    assert env["PATH"] == "/usr/bin:/bin" and env["HOME"] == env["TMPDIR"]


def test_no_inherited_file_descriptors_and_no_stdin():
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)  # even a descriptor marked inheritable must not get through
    try:
        program = "import os\nprint(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))\nprint(repr(input()))\n"
        result = execute_code(program, timeout=2.0)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.stdout.splitlines()[0] == "[0, 1, 2, 3]"  # 3: the listdir of /proc/self/fd itself
    assert "EOFError" in result.stderr  # stdin is /dev/null


def test_workdir_is_private_and_removed(sandbox):
    # a locked subdirectory (chmod 0 through ctypes, past the prelude) must not stop the cleanup
    program = WORKDIR + (
        "import ctypes\n"
        "print(oct(os.stat('.').st_mode & 0o777))\n"
        "os.makedirs('sub/deeper')\n"
        "open('sub/deeper/scratch.txt', 'w').write('x')\n"
        "assert ctypes.CDLL(None).chmod(b'sub', 0) == 0\n"
    )
    result = execute_code(program, timeout=2.0)
    assert result.success, result.stderr
    cwd, mode = result.stdout.split()
    assert os.path.basename(sandbox_dir(result)).startswith("nanochat-exec-")
    if sandbox == "basic":  # in bubblewrap it is a tmpfs in the program's own mount namespace
        assert mode == "0o700"
    assert not os.path.exists(sandbox_dir(result))


def test_huge_file_is_capped_by_rlimit_fsize():
    program = (
        "import os\n"
        "try:\n"
        "    with open('big.bin', 'wb') as f:\n"
        "        for _ in range(100):\n"
        "            f.write(b'x' * 2**20)\n"
        "finally:\n"
        "    print(os.path.getsize('big.bin'), flush=True)\n"
    )
    result = execute_code(program, timeout=2.0)
    assert not result.success and "File too large" in result.stderr
    assert int(result.stdout) <= MAX_FILE_MB * 2**20


def test_stdout_flood_is_capped():
    result = execute_code("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 100_000)\n", timeout=2.0, max_output_bytes=10_000)
    assert result.success  # the rest was read and dropped, so the program never blocked
    assert result.stdout.startswith("x" * 10_000) and result.stdout.endswith("[output truncated: more than 10000 bytes]")
    assert len(result.stdout) < 10_100
    result = execute_code("while True:\n    print('y' * 1000)\n", timeout=1.0, max_output_bytes=1000)
    assert result.timeout and len(result.stdout) < 1100


def test_fork_bomb_is_bounded_and_cleaned_up():
    # ctypes' fork gets around the prelude: only RLIMIT_NPROC and the supervisor are left.
    # Each child also leaves the process group with setsid(), so one killpg cannot reach it.
    program = WORKDIR + (
        "import ctypes\n"
        "libc = ctypes.CDLL(None)\n"
        "while True:\n"
        "    if libc.fork() == 0:\n"
        "        libc.setsid()\n"
    )
    start = time.monotonic()
    result = execute_code(program, timeout=1.0)
    assert time.monotonic() - start < 1.0 + 5.0
    assert result.timeout and not result.success
    assert processes_in(sandbox_dir(result)) == [] and not os.path.exists(sandbox_dir(result))


def test_daemon_left_behind_is_killed():
    program = WORKDIR + (
        "import ctypes, time\n"
        "libc = ctypes.CDLL(None)\n"
        "if libc.fork() == 0:\n"  # double fork + setsid: the classic way to outlive a parent
        "    libc.setsid()\n"
        "    if libc.fork() == 0:\n"
        "        time.sleep(60)\n"
        "    libc._exit(0)\n"
        "time.sleep(0.2)\n"
        # forks share this argv, which is how processes_in() finds them
        "assert os.path.dirname(os.getcwd()).encode() in open('/proc/self/cmdline', 'rb').read()\n"
    )
    start = time.monotonic()
    result = execute_code(program, timeout=5.0)
    assert result.success and time.monotonic() - start < 5.0
    assert processes_in(sandbox_dir(result)) == []


def test_prelude_blocks_destructive_calls():
    calls = ["os.remove('program.py')", "shutil.rmtree('.')", "os.kill(os.getppid(), 9)", "subprocess.run(['true'])", "os.fork()"]
    program = "import os, shutil, subprocess\n" + "".join(
        f"try:\n    {call}\nexcept PermissionError as e:\n    print(e)\n" for call in calls
    )
    result = execute_code(program, timeout=2.0)
    assert result.success and result.stdout.splitlines() == ["disabled in the nanochat sandbox"] * len(calls)


def test_concurrent_calls_do_not_mix():
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: execute_code(f"print({i} * 2)", timeout=5.0), range(8)))
    assert [r.stdout for r in results] == [f"{i * 2}\n" for i in range(8)]


@basic_only  # in bubblewrap the supervisor is outside the program's pid namespace
def test_junk_on_the_status_pipe_is_ignored():
    # what a program running as our own uid could do; as root it cannot open the pipe at all
    program = (
        "import os\n"
        "for fd in os.listdir(f'/proc/{os.getppid()}/fd'):\n"
        "    try:\n"
        "        with open(f'/proc/{os.getppid()}/fd/{fd}', 'w') as f:\n"
        "            f.write('not json\\n[1]\\n{\"returncode\": \"x\"}\\n')\n"
        "    except OSError:\n"
        "        pass\n"
    )
    result = execute_code(program, timeout=2.0)
    assert result.success


@root_only
def test_runs_as_nobody_without_capabilities(sandbox):
    result = execute_code("import os\nprint(os.getuid(), os.getgid(), os.getgroups())\nprint(open('/proc/self/status').read())", timeout=2.0)
    assert result.stdout.splitlines()[0] == f"{SANDBOX_UID} {SANDBOX_UID} []"
    status = dict(line.split(":\t", 1) for line in result.stdout.splitlines()[1:] if ":\t" in line)
    allowed = 0 if sandbox == "bubblewrap" else 1 << 2  # basic: at most CAP_DAC_READ_SEARCH, see execution.py
    assert int(status["CapEff"], 16) & ~allowed == 0 and int(status["CapPrm"], 16) & ~allowed == 0
    assert int(status["NoNewPrivs"]) == 1


@root_only
def test_write_outside_workdir_fails(tmp_path):
    tmp_path.chmod(0o755)  # the sandbox user may look in; only write permission is missing
    target = tmp_path / "escaped.txt"
    result = execute_code(f"open({str(target)!r}, 'w').write('escaped')\n", timeout=2.0)
    assert not result.success and re.search(r"PermissionError|FileNotFoundError", result.stderr)  # bwrap: not even there
    assert not target.exists()


@root_only
@basic_only  # in bubblewrap the per-call directory is not in the program's filesystem at all
def test_cannot_move_its_directory():
    # were the program to own the per-call directory, it could swap it for a symlink before
    # our cleanup; it owns only its working directory, inside one it cannot write
    program = WORKDIR + (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.rename(os.getcwd().encode(), b'/tmp/moved'), ctypes.get_errno())\n"
        "print(libc.rename(os.path.dirname(os.getcwd()).encode(), b'/tmp/moved'), ctypes.get_errno())\n"
        "open('../planted.txt', 'w')\n"
    )
    result = execute_code(program, timeout=2.0)
    assert result.stdout.splitlines()[1:] == ["-1 13", "-1 1"]  # EACCES, EPERM (sticky /tmp)
    assert "PermissionError" in result.stderr and not os.path.exists("/tmp/moved")


@root_only
def test_kill_parent_fails():
    # through ctypes, so the prelude's os.kill does not get a say: only the uid boundary stops it
    program = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"for pid in (os.getppid(), {os.getpid()}):\n"
        "    print(libc.kill(pid, 9), ctypes.get_errno())\n"
    )
    result = execute_code(program, timeout=2.0)
    assert result.success  # the supervisor lived to report it
    # EPERM (1) for the supervisor and for us; in bubblewrap's pid namespace the parent is its
    # init (EPERM) and our pid names nothing, or nothing of ours (ESRCH, 3)
    for line in result.stdout.split("\n")[:2]:
        assert line in ("-1 1", "-1 3"), result.stdout
    os.kill(os.getpid(), 0)  # and we are alive


@root_only
def test_cannot_read_our_environment_through_proc():
    result = execute_code(f"print(open('/proc/{os.getpid()}/environ').read())", timeout=2.0)
    assert not result.success and re.search(r"PermissionError|FileNotFoundError", result.stderr)


@pytest.mark.parametrize("kwargs", [
    {"timeout": 0}, {"timeout": -1}, {"timeout": math.nan}, {"timeout": math.inf},
    {"memory_limit_mb": 0}, {"memory_limit_mb": 1.5}, {"max_output_bytes": -1},
])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError, match=re.escape(next(iter(kwargs)))):
        execute_code("pass", **kwargs)


def test_code_must_be_str():
    with pytest.raises(ValueError, match="code must be a str"):
        execute_code(b"print(1)")


# -----------------------------------------------------------------------------
# The escape corpus: what only bubblewrap promises. Each attempt must fail inside the sandbox,
# and execute_code must report the program's own account (or its failure), never crash.

@bubblewrap_only
def test_escape_network_to_a_local_listener_and_outside():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        program = (
            "import socket\n"
            f"for address in (('127.0.0.1', {port}), ('192.0.2.1', 80), ('1.1.1.1', 53)):\n"
            "    try:\n"
            "        socket.create_connection(address, timeout=1).close()\n"
            "        print('connected', address)\n"
            "    except OSError as e:\n"
            "        print('failed', type(e).__name__)\n"
        )
        result = execute_code(program, timeout=10.0)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing ever arrived
    assert result.success, result.stderr
    assert result.stdout.count("failed") == 3 and "connected" not in result.stdout


@bubblewrap_only
def test_escape_read_secrets_in_home_repo_and_tmp(tmp_path):
    secret = f"nanochat-test-secret-{os.getpid()}"
    tmp_path.chmod(0o755)
    paths = [os.path.join(os.path.expanduser("~"), f".nanochat_test_secret_{os.getpid()}"),
             os.path.join(REPO, f".nanochat_test_secret_{os.getpid()}"), str(tmp_path / "secret.txt")]
    for path in paths:
        with open(path, "w") as f:
            f.write(secret)
        os.chmod(path, 0o644)  # readable by anyone: only the sandbox's filesystem can hide them
    try:
        program = (
            "import os\n"
            f"for path in {paths!r}:\n"
            "    try:\n"
            "        print(open(path).read())\n"
            "    except OSError as e:\n"
            "        print(type(e).__name__)\n"
            f"print(os.path.exists({REPO!r}), os.path.exists({os.path.expanduser('~')!r} + '/.bashrc'))\n"
        )
        result = execute_code(program, timeout=5.0)
    finally:
        for path in paths:
            os.remove(path)
    assert result.success, result.stderr
    assert secret not in result.stdout
    assert result.stdout.splitlines() == ["FileNotFoundError"] * 3 + ["False False"]


@bubblewrap_only
def test_escape_write_outside_and_fill_the_disk(tmp_path):
    tmp_path.chmod(0o777)
    program = (
        "import os\n"
        "for where in ('.', '/tmp'):\n"
        "    written = 0\n"
        "    try:\n"
        "        for i in range(1000):\n"  # 1 MB files: each stays under RLIMIT_FSIZE, together they fill the disk
        "            with open(f'{where}/fill{i}', 'wb') as f:\n"
        "                f.write(b'x' * 2**20)\n"
        "            written += 1\n"
        "    except OSError as e:\n"
        "        print(where, written, e.errno)\n"
        f"for path in ('/usr/escaped', {str(tmp_path / 'escaped')!r}, '/escaped'):\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print('failed', type(e).__name__)\n"
    )
    result = execute_code(program, timeout=20.0, memory_limit_mb=512)
    assert result.success, result.stderr
    lines = result.stdout.splitlines()
    for line, where in zip(lines[:2], (".", "/tmp")):
        name, written, errno = line.split()
        assert name == where and int(written) <= TMPFS_MB and int(errno) == 28  # ENOSPC on its own small disk
    assert [line.split()[0] for line in lines[2:]] == ["failed"] * 3, result.stdout  # read-only, absent, not ours
    assert not (tmp_path / "escaped").exists()


@bubblewrap_only
def test_escape_other_processes_are_out_of_sight_and_reach():
    # kill(-1, SIGKILL) through ctypes: every process the program may signal. In its pid
    # namespace that is only its own; we, the supervisor and the test runner must live on.
    program = (
        "import ctypes, os\n"
        "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
        "cmdlines = [open(f'/proc/{p}/cmdline', 'rb').read() for p in pids]\n"
        "print(len(pids), any(b'pytest' in c for c in cmdlines), flush=True)\n"
        "ctypes.CDLL(None).kill(-1, 9)\n"
        "print('still here')\n"
    )
    result = execute_code(program, timeout=5.0)
    count, sees_pytest = result.stdout.split()[:2]
    assert int(count) <= 3 and sees_pytest == "False"  # bwrap's init, the program (and its /proc read)
    assert result.success and "still here" in result.stdout  # kill(-1) spares the caller
    os.kill(os.getpid(), 0)


@bubblewrap_only
def test_escape_sleep_past_the_timeout():
    start = time.monotonic()
    result = execute_code("import time\ntime.sleep(60)\n", timeout=1.0)
    assert time.monotonic() - start < 1.0 + 5.0
    assert result.timeout and not result.success and result.error == "timed out after 1 s"


def test_sandbox_kind_is_chosen_once_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(execution, "_sandbox_kind", None)
    monkeypatch.setenv("NANOCHAT_SANDBOX", "basic")
    assert execution.sandbox_kind() == "basic" and capsys.readouterr().err == ""  # chosen: no warning
    monkeypatch.setattr(execution, "_sandbox_kind", None)
    monkeypatch.setenv("NANOCHAT_SANDBOX", "auto")
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap on PATH
    assert execution.sandbox_kind() == "basic"
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "bubblewrap (bwrap) is not installed" in err and "apt-get install bubblewrap" in err
    assert execution.sandbox_kind() == "basic" and capsys.readouterr().err == ""  # once per process
    monkeypatch.setattr(execution, "_sandbox_kind", None)
    monkeypatch.setenv("NANOCHAT_SANDBOX", "bubblewrap")
    with pytest.raises(RuntimeError, match="NANOCHAT_SANDBOX=bubblewrap, but bubblewrap"):
        execution.sandbox_kind()
    monkeypatch.setattr(execution, "_sandbox_kind", None)
    monkeypatch.setenv("NANOCHAT_SANDBOX", "docker")
    with pytest.raises(RuntimeError, match="use auto, bubblewrap or basic"):
        execution.sandbox_kind()


@bubblewrap_only
def test_escape_a_user_namespace_of_its_own_and_a_writable_dev():
    # root in a user namespace of its own, a program could mount a tmpfs of any size (RAM that
    # no rlimit counts); the seccomp filter refuses the namespace, and /dev is read-only
    program = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x20000\n"
        "print(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), ctypes.get_errno())\n"
        "print(libc.syscall(56 if os.uname().machine == 'x86_64' else 220, CLONE_NEWUSER, 0, 0, 0, 0), ctypes.get_errno())\n"
        "for path in ('/dev/shm/fill', '/dev/fill'):\n"
        "    try:\n"
        "        open(path, 'wb').write(b'x' * 2**20)\n"
        "        print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print('failed', type(e).__name__)\n"
        "open('/dev/null', 'w').write('fine')\n"
    )
    result = execute_code(program, timeout=5.0)
    assert result.success, result.stderr
    assert result.stdout.splitlines() == ["-1 1", "-1 1", "failed OSError", "failed OSError"]  # EPERM, EPERM


def test_exit_status_above_128_is_not_taken_for_a_signal():
    result = execute_code("import sys; sys.exit(137)", timeout=2.0)  # 128 + SIGKILL, as bwrap reports a kill
    assert result.returncode == 1 and not result.memory_exceeded and not result.timeout
