"""
Training across machines (README "Two DGX Sparks"), on this one: two torchrun invocations on
127.0.0.1 with --nnodes 2, gloo, one process each, stand for two nodes, each with its own
$NANOCHAT_BASE_DIR (its own disk). What a user relies on:
- the run equals one process with two micro-batches (same rows per step: dataloader.py's global
  order), and each node keeps a complete checkpoint from which both resume bit-identically;
- a node that dies or hangs makes the other exit with a clear message instead of waiting;
- nodes with different data or tokenizers refuse to start, naming what differs;
- the shell layer (pretrain.sh --nnodes 2 --node-rank R --master-addr ...) launches it.
The data and helpers are test_base_train's (one-document row groups, a byte-level tokenizer).
"""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from conftest import free_port
from test_base_train import (REPO, losses, load_model_state, make_base_dir, run_env, run_train, train_args,
                             val_bpbs)

pytestmark = pytest.mark.slow
LOST = "lost contact with the other processes of this run"


def start_node(base_dir, node_rank, port, *args, **env):
    """One "node": torchrun --nnodes 2 --node_rank R with one process of base_train, stdout/stderr
    collected by threads."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node_rank}",
           "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "scripts.base_train", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(base_dir, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.out, proc.err = [], []
    for stream, lines in ((proc.stdout, proc.out), (proc.stderr, proc.err)):
        threading.Thread(target=lambda s=stream, ls=lines: ls.extend(iter(s.readline, "")), daemon=True).start()
    return proc


def finish(proc, timeout=600):
    """Wait for a node; returns (returncode, stdout, stderr)."""
    proc.wait(timeout=timeout)
    time.sleep(0.2)  # let the reader threads drain the pipes
    return proc.returncode, "".join(proc.out), "".join(proc.err)


def run_nodes(base_dirs, *args, **env):
    port = free_port()
    nodes = [start_node(d, rank, port, *args, **env) for rank, d in enumerate(base_dirs)]
    return [finish(node) for node in nodes]


def checkpoint_files(base_dir, tag="d2"):
    return sorted(os.listdir(os.path.join(base_dir, "base_checkpoints", tag)))


ARGS = train_args(**{"num-iterations": 8, "eval-every": 4, "save-every": 4})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 8 steps as 1 process x 2 micro-batches and as 2 nodes x 1 process x 1 micro-batch:
    {"one": base dir, "nodes": [base dir of node 0, of node 1], "single": stdout, "out0"/"out1": the nodes' stdout}."""
    tmp = tmp_path_factory.mktemp("runs")
    one = make_base_dir(str(tmp / "one"))
    nodes = [make_base_dir(str(tmp / f"node{r}")) for r in range(2)]
    single = run_train(one, *ARGS)
    (rc0, out0, err0), (rc1, out1, err1) = run_nodes(nodes, *ARGS)
    assert rc0 == rc1 == 0, err0[-3000:] + err1[-3000:]
    return {"one": one, "nodes": nodes, "single": single.stdout, "out0": out0, "out1": out1}


def copy_dirs(runs, tmp_path, *names):
    """Copies of the fixture's base dirs (the tests below change theirs)."""
    paths = {"one": runs["one"], "node0": runs["nodes"][0], "node1": runs["nodes"][1]}
    return [shutil.copytree(paths[name], str(tmp_path / name)) for name in names]


def drop_step(base_dir, step, tag="d2"):
    ckpt = os.path.join(base_dir, "base_checkpoints", tag)
    for name in os.listdir(ckpt):
        if name.startswith((f"meta_{step:06d}", f"model_{step:06d}", f"optim_{step:06d}")):
            os.remove(os.path.join(ckpt, name))


def assert_close_runs(got_stdout, want_stdout, steps):
    got, want = losses(got_stdout), losses(want_stdout)
    assert sorted(got) == steps, got
    for step in steps:
        assert got[step] == pytest.approx(want[step], abs=1e-4), (step, got[step], want[step])


def test_two_nodes_train_as_one_process_with_two_micro_batches(runs):
    out0, out1 = runs["out0"], runs["out1"]
    assert "x 2 processes x 1 accumulation steps" in out0 and "step 00001" not in out1  # node 0 prints
    assert_close_runs(out0, runs["single"], list(range(1, 9)))
    b1, b2 = val_bpbs(runs["single"]), val_bpbs(out0)
    assert b1.keys() == b2.keys() == {0, 4, 8}
    for step in b1:  # the same validation rows too
        assert b2[step] == pytest.approx(b1[step], abs=1e-4)
    reference = load_model_state(runs["one"], 8)
    for node in runs["nodes"]:
        state = load_model_state(node, 8)
        for k in reference:
            torch.testing.assert_close(state[k], reference[k], atol=2e-4, rtol=1e-3)
    # every node has a complete checkpoint of its own: model, meta and its ranks' optimizer shards
    for rank, node in enumerate(runs["nodes"]):
        assert checkpoint_files(node) == [f"{kind}_{step:06d}{suffix}" for kind, suffix in
                                          (("meta", ".json"), ("model", ".pt"), ("optim", f"_rank{rank}.pt"))
                                          for step in (4, 8)]
    for k, v in load_model_state(runs["nodes"][0], 8).items():
        assert torch.equal(v, load_model_state(runs["nodes"][1], 8)[k]), k


def test_both_nodes_resume_from_the_last_step_every_node_has(runs, tmp_path):
    # node 1 was killed while writing step 8 (no meta there yet): both resume from step 4, the
    # last step every node has, and end bit-identical to the uninterrupted run
    nodes = copy_dirs(runs, tmp_path, "node0", "node1")
    os.remove(os.path.join(nodes[1], "base_checkpoints", "d2", "meta_000008.json"))
    (rc0, out0, err0), (rc1, _, err1) = run_nodes(nodes, *ARGS, "--resume")
    assert rc0 == rc1 == 0, err0[-3000:] + err1[-3000:]
    assert "step 4" in out0.split("resumed from", 1)[1].splitlines()[0]
    l2, l3 = losses(runs["out0"]), losses(out0)
    assert sorted(l3) == [5, 6, 7, 8] and all(l3[s] == l2[s] for s in l3), (l3, l2)
    final = load_model_state(runs["nodes"][0], 8)
    for node in nodes:
        for k, v in load_model_state(node, 8).items():
            assert torch.equal(v, final[k]), k


def test_a_run_moves_between_one_node_and_two(runs, tmp_path):
    # two nodes -> one process: node 0's directory plus node 1's optimizer file (copied over, as the
    # error message says when it is missing), resumed from step 4, continues as the two nodes did
    (alone,) = copy_dirs(runs, tmp_path, "node0")
    drop_step(alone, 8)
    refused = run_train(alone, *ARGS, "--resume", check=False)
    assert refused.returncode != 0 and "optim_000004_rank1.pt are not there; copy them" in refused.stderr
    shutil.copy(os.path.join(runs["nodes"][1], "base_checkpoints", "d2", "optim_000004_rank1.pt"),
                os.path.join(alone, "base_checkpoints", "d2"))
    resumed = run_train(alone, *ARGS, "--resume")
    assert "resharded the optimizer states of 2 processes for 1" in resumed.stdout
    assert_close_runs(resumed.stdout, runs["out0"], [5, 6, 7, 8])
    # one process -> two nodes: the single run's step 4 on both nodes' disks
    nodes = [shutil.copytree(runs["one"], str(tmp_path / f"from_one{r}")) for r in range(2)]
    for node in nodes:
        drop_step(node, 8)
    (rc0, out0, err0), (rc1, _, err1) = run_nodes(nodes, *ARGS, "--resume")
    assert rc0 == rc1 == 0, err0[-3000:] + err1[-3000:]
    assert "resharded the optimizer states of 1 processes for 2" in out0
    assert_close_runs(out0, runs["single"], [5, 6, 7, 8])
    for k, v in load_model_state(runs["one"], 8).items():
        torch.testing.assert_close(load_model_state(nodes[0], 8)[k], v, atol=2e-4, rtol=1e-3)


def signal_node(node, sig):
    """Send `sig` to a node's torchrun agent and its workers (torchrun starts them in sessions of their own)."""
    for proc in [psutil.Process(node.pid), *psutil.Process(node.pid).children(recursive=True)]:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def wait_for_step(node, step, timeout=300):
    deadline = time.time() + timeout
    while f"step {step:05d}/" not in "".join(node.out):
        assert node.poll() is None and time.time() < deadline, "".join(node.out)[-2000:] + "".join(node.err)[-3000:]
        time.sleep(0.2)


@pytest.mark.parametrize("failure", ["killed", "hung"])
def test_a_node_that_dies_or_hangs_stops_the_other_with_a_message(tmp_path, failure):
    nodes = [make_base_dir(str(tmp_path / f"node{r}")) for r in range(2)]
    args = train_args(**{"num-iterations": 100_000, "eval-every": -1, "save-every": -1})
    port = free_port()
    timeout_s = 20  # NANOCHAT_DIST_TIMEOUT: how long a collective waits for a node that does not answer
    node0, node1 = (start_node(d, rank, port, *args, NANOCHAT_DIST_TIMEOUT=str(timeout_s))
                    for rank, d in enumerate(nodes))
    try:
        wait_for_step(node0, 3)
        signal_node(node1, signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
        stopped = time.time()
        rc, out, err = finish(node0, timeout=timeout_s + 90)
        waited = time.time() - stopped
    finally:
        for node in (node0, node1):
            try:
                signal_node(node, signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
    print(f"node 0 exited {waited:.1f} s after node 1 was {failure}")  # for bench/RESULTS.md (pytest -s)
    assert rc != 0
    assert f"base_train: rank 0 {LOST}" in err, err[-3000:]
    assert "NANOCHAT_DIST_TIMEOUT" in err and "resumes from its last checkpoint" in err
    # a dead node's sockets close at once; a hung one is given up on after the timeout, not gloo's 30 minutes
    assert waited < (30 if failure == "killed" else timeout_s + 60), waited


def test_nodes_with_other_data_or_tokenizers_refuse_to_start(tmp_path):
    node0 = make_base_dir(str(tmp_path / "node0"))
    node1 = make_base_dir(str(tmp_path / "node1"), docs_per_shard=7)  # other shards
    from nanochat.tokenizer import RustBPETokenizer
    shutil.rmtree(os.path.join(node1, "tokenizer"))
    RustBPETokenizer.train_from_iterator(iter(["byte level"]), 256 + 10).save(os.path.join(node1, "tokenizer"))
    results = run_nodes([node0, node1], *train_args(**{"num-iterations": 4}), NANOCHAT_DIST_TIMEOUT="60")
    for rc, out, err in results:
        assert rc != 0 and "step 00001" not in out
        assert "the processes of this run do not have the same inputs" in err, err[-3000:]
        assert "tokenizer differs: ranks 0 (" in err and "shards differs" in err
        assert "copy them from the first node" in err
        assert "Traceback" not in err.split("do not have the same inputs")[0].rsplit("\n", 2)[-1]


def test_nodes_running_different_commands_refuse_to_go_on(tmp_path):
    # torchrun joins whatever two nodes start at one address: a stage done on one node only (its
    # .done marker) must not pair base_eval with mid_train; here 4 steps with 5
    nodes = [make_base_dir(str(tmp_path / f"node{r}")) for r in range(2)]
    port = free_port()
    procs = [start_node(node, rank, port, *train_args(**{"num-iterations": 4 + rank}), NANOCHAT_DIST_TIMEOUT="60")
             for rank, node in enumerate(nodes)]
    for rc, out, err in (finish(p) for p in procs):
        assert rc != 0 and "step 00001" not in out
        assert "command differs: ranks 0 (" in err and "--num-iterations=4" in err and "--num-iterations=5" in err
        assert "logs/*.done" in err, err[-3000:]


def test_pretrain_sh_launches_the_nodes(tmp_path):
    """The user's commands: pretrain.sh on each node with --nnodes 2 --node-rank R --master-addr."""
    nodes = [make_base_dir(str(tmp_path / f"node{r}")) for r in range(2)]
    port = free_port()
    procs = []
    for rank, node in enumerate(nodes):
        cmd = ["bash", "pretrain.sh", "--smoke", "--depth", "2", "--device-batch-size", "2", "--nnodes", "2",
               "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "--", "--max-seq-len=32", "--total-batch-size=128", "--num-iterations=3"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=run_env(node), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "processes 1 x 2 nodes (this is node 0)" in outs[0] and "(this is node 1)" in outs[1]
    assert "torchrun --nnodes=2 --node_rank=1 --nproc_per_node=1 --master_addr=127.0.0.1" in outs[1]
    assert "x 2 processes x 1 accumulation steps" in outs[0] and "step 00003/00003" in outs[0]
    for rank, node in enumerate(nodes):
        assert f"optim_000003_rank{rank}.pt" in checkpoint_files(node) and "model_000003.pt" in checkpoint_files(node)
        assert os.path.exists(os.path.join(node, "logs", "base_loss.done"))  # base_loss ran across the nodes too


def test_bad_node_flags_are_clear_errors(tmp_path):
    for flags, message in (((["--nnodes", "2"]), "--nnodes 2 needs --master-addr"),
                           ((["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"]), "--node-rank 2 must be below"),
                           ((["--nnodes", "two"]), "take a number, not 'two'")):
        out = subprocess.run(["bash", "pretrain.sh", "--smoke", *flags], cwd=REPO, env=run_env(str(tmp_path)),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and message in out.stderr, out.stderr
