"""Tests for nanochat/checkpoint_manager.py: round trips, crash safety, defaults and errors, on a tiny GPT."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat import checkpoint_manager as cm
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

TEXTS = ["hello world, the cat sat on the mat", "numbers 12 345 6789 and more words here"] * 20


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def tokenizer(base_dir):
    tok = RustBPETokenizer.train_from_iterator(iter(TEXTS), 300)
    tok.save(str(base_dir / "tokenizer"))
    return tok


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=16, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights()
    return model


def meta_for(model, tokenizer, **extra):
    return {"model_config": asdict(model.config), "tokenizer_hash": tokenizer.content_hash(), **extra}


def fake_save(checkpoint_dir, step, fill, ranks=(0,)):
    """A small checkpoint with recognisable contents: every tensor is `fill`."""
    for rank in ranks:
        cm.save_checkpoint(str(checkpoint_dir), step, {"w": torch.full((3,), float(fill))},
                           {"m": torch.full((2,), float(fill))}, {"model_config": {}, "fill": fill}, rank=rank)


# -----------------------------------------------------------------------------
# save / load round trip

def test_round_trip_of_model_optimizer_and_meta(base_dir, tokenizer):
    model = tiny_model(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, tokenizer.get_vocab_size(), (2, 8))
    model(x, x).backward()
    optimizer.step()
    meta = meta_for(model, tokenizer, user_config={"depth": 1}, val_bpb=1.25,
                    dataloader_state={"epoch": 0, "shard_index": 1, "token_offset": 7}, rng_state=cm.capture_rng_state())
    checkpoint_dir = base_dir / "base_checkpoints" / "d1"
    cm.save_checkpoint(str(checkpoint_dir), 10, model.state_dict(), optimizer.state_dict(), meta)
    assert sorted(os.listdir(checkpoint_dir)) == ["meta_000010.json", "model_000010.pt", "optim_000010_rank0.pt"]

    model_data, optim_data, loaded_meta = cm.load_checkpoint(str(checkpoint_dir), 10, "cpu", load_optimizer=True)
    assert loaded_meta == {**meta, "step": 10}
    assert model_data.keys() == model.state_dict().keys()
    assert all(torch.equal(model_data[k], v) for k, v in model.state_dict().items())
    restored = torch.optim.AdamW(tiny_model(tokenizer, seed=1).parameters(), lr=1e-3)
    restored.load_state_dict(optim_data)
    for a, b in zip(optimizer.state.values(), restored.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert cm.load_checkpoint(str(checkpoint_dir), 10, "cpu")[1] is None


@pytest.mark.parametrize("phase", ["train", "eval"])
def test_build_model_reproduces_the_saved_model(base_dir, tokenizer, phase):
    model = tiny_model(tokenizer)
    checkpoint_dir = base_dir / "base_checkpoints" / "d1"
    cm.save_checkpoint(str(checkpoint_dir), 3, model.state_dict(), None, meta_for(model, tokenizer))
    built, built_tokenizer, meta = cm.build_model(str(checkpoint_dir), 3, "cpu", phase)
    assert built.training == (phase == "train")
    assert built_tokenizer.content_hash() == tokenizer.content_hash() and meta["step"] == 3
    x = torch.randint(0, tokenizer.get_vocab_size(), (2, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(built(x), model(x))


def test_build_model_strips_the_torch_compile_prefix(base_dir, tokenizer):
    model = tiny_model(tokenizer)
    compiled_keys = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    checkpoint_dir = base_dir / "base_checkpoints" / "d1"
    cm.save_checkpoint(str(checkpoint_dir), 1, compiled_keys, None, meta_for(model, tokenizer))
    built, _, _ = cm.build_model(str(checkpoint_dir), 1, "cpu", "eval")
    assert torch.equal(built.lm_head.weight, model.lm_head.weight)


def test_build_model_refuses_another_tokenizer(base_dir, tokenizer):
    model = tiny_model(tokenizer)
    checkpoint_dir = base_dir / "base_checkpoints" / "d1"
    cm.save_checkpoint(str(checkpoint_dir), 1, model.state_dict(), None, meta_for(model, tokenizer))
    RustBPETokenizer.train_from_iterator(iter(TEXTS), 290).save(str(base_dir / "tokenizer"))
    with pytest.raises(ValueError, match="tokenizer") as excinfo:
        cm.build_model(str(checkpoint_dir), 1, "cpu", "eval")
    message = str(excinfo.value)
    assert str(base_dir / "tokenizer") in message and str(checkpoint_dir) in message and "NANOCHAT_BASE_DIR" in message


def test_load_model_defaults_to_largest_tag_and_last_step_and_says_so(base_dir, tokenizer, capsys):
    model = tiny_model(tokenizer)
    for tag, steps in [("d1", [5]), ("d2", [4, 8])]:  # d2 is the larger model tag (same tiny model here)
        for step in steps:
            cm.save_checkpoint(str(base_dir / "mid_checkpoints" / tag), step, model.state_dict(), None,
                               meta_for(model, tokenizer))
    _, _, meta = cm.load_model("mid", "cpu", "eval")
    out = capsys.readouterr().out
    assert meta["step"] == 8
    assert meta["model_tag"] == "d2"  # the tag it resolved, for the next stage's checkpoints
    assert "mid" in out and "d2" in out and "step 8" in out and str(base_dir / "mid_checkpoints" / "d2" / "model_000008.pt") in out
    _, _, meta = cm.load_model("mid", "cpu", "eval", model_tag="d2", step=4)
    assert meta["step"] == 4 and "model_000004.pt" in capsys.readouterr().out
    _, _, meta = cm.load_model("mid", "cpu", "eval", model_tag="d1")
    assert meta["step"] == 5 and meta["model_tag"] == "d1"
    assert cm.get_checkpoint_dir("mid", "d1") == str(base_dir / "mid_checkpoints" / "d1")


# -----------------------------------------------------------------------------
# training state (resume)

def test_training_state_round_trip_restores_model_optimizer_rng_and_loader_state(base_dir, tokenizer, capsys):
    model = tiny_model(tokenizer)
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3)]
    x = torch.randint(0, tokenizer.get_vocab_size(), (2, 8))
    model(x, x).backward()
    optimizers[0].step()
    checkpoint_dir = str(base_dir / "base_checkpoints" / "d1")
    meta = meta_for(model, tokenizer, loop_state={"smooth_train_loss": 1.5})
    cm.save_training_state(checkpoint_dir, 3, model, optimizers, meta, {"epoch": 0, "token_offset": 7})
    assert f"saved checkpoint {checkpoint_dir} step 3" in capsys.readouterr().out
    expected_rand = torch.rand(3)

    restored = tiny_model(tokenizer, seed=1)
    restored_optimizers = [torch.optim.AdamW(restored.parameters(), lr=1e-3)]
    step, loaded_meta, loader_state = cm.load_training_state(checkpoint_dir, None, restored, restored_optimizers, "cpu")
    assert f"resumed from {checkpoint_dir} step 3" in capsys.readouterr().out
    assert (step, loader_state, loaded_meta["loop_state"]) == (3, {"epoch": 0, "token_offset": 7}, {"smooth_train_loss": 1.5})
    assert loaded_meta["dataloader_state"] == [{"epoch": 0, "token_offset": 7}]  # one entry per rank
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
    assert restored_optimizers[0].state_dict()["state"].keys() == optimizers[0].state_dict()["state"].keys()
    assert torch.equal(torch.rand(3), expected_rand)  # the RNG continues where the saved run was

    other = GPT(GPTConfig(sequence_len=16, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                          n_embd=64))
    with pytest.raises(ValueError, match="use the flags of the original run"):
        cm.load_training_state(checkpoint_dir, 3, other, [torch.optim.AdamW(other.parameters())], "cpu")
    with pytest.raises(FileNotFoundError, match=r"step 4 .*\[3\]"):
        cm.load_training_state(checkpoint_dir, 4, restored, restored_optimizers, "cpu")


# -----------------------------------------------------------------------------
# crash safety

@pytest.mark.parametrize("fail_at", [0, 1, 2])
def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    fake_save(tmp_path, 1, fill=1)
    real_replace, calls = os.replace, []

    def replace(src, dst):  # the fail_at-th rename (model, optimizer, meta) dies
        calls.append(dst)
        if len(calls) - 1 == fail_at:
            raise OSError("disk died")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk died"):
        fake_save(tmp_path, 2, fill=2)
    monkeypatch.setattr(os, "replace", real_replace)
    assert os.path.basename(calls[-1]).startswith(["model_", "optim_", "meta_"][fail_at])
    assert cm.find_last_step(str(tmp_path)) == 1
    model_data, optim_data, meta = cm.load_checkpoint(str(tmp_path), 1, "cpu", load_optimizer=True)
    assert model_data["w"].tolist() == [1.0] * 3 and optim_data["m"].tolist() == [1.0] * 2 and meta["fill"] == 1
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_crash_in_the_middle_of_writing_a_file(tmp_path, monkeypatch):
    fake_save(tmp_path, 1, fill=1)

    def half_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        fake_save(tmp_path, 2, fill=2)
    assert cm.list_steps(str(tmp_path)) == [1] and not os.path.exists(tmp_path / "model_000002.pt")
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_crash_while_saving_a_step_again_never_leaves_it_marked_complete(tmp_path, monkeypatch):
    fake_save(tmp_path, 1, fill=1)
    fake_save(tmp_path, 2, fill=2)
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(dst).startswith("optim_"):
            raise OSError("disk died")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        fake_save(tmp_path, 2, fill=3)  # the new model file is in place, the optimizer file is not
    assert cm.find_last_step(str(tmp_path)) == 1


@pytest.mark.slow
def test_sigkill_mid_save_leaves_the_previous_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, torch
        from nanochat import checkpoint_manager as cm
        cm.save_checkpoint({str(tmp_path)!r}, 1, {{"w": torch.ones(3)}}, {{"m": torch.ones(2)}}, {{"model_config": {{}}}})
        def dying_save(obj, f):
            f.write(b"half")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        cm.save_checkpoint({str(tmp_path)!r}, 2, {{"w": torch.zeros(3)}}, {{"m": torch.zeros(2)}}, {{"model_config": {{}}}})
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(os.path.dirname(__file__)),
                            capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    assert any(name.endswith(".tmp") for name in os.listdir(tmp_path))  # the half-written file stayed behind...
    assert cm.find_last_step(str(tmp_path)) == 1  # ...and nothing reads it
    assert cm.load_checkpoint(str(tmp_path), 1, "cpu")[0]["w"].tolist() == [1.0] * 3
    fake_save(tmp_path, 2, fill=2)  # the next save of that step succeeds
    assert cm.find_last_step(str(tmp_path)) == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_save_worker(rank, world_size, port, checkpoint_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        if rank == 1:  # a slow rank: the meta file must still wait for its optimizer file
            real_save = torch.save

            def slow_save(obj, f):
                time.sleep(2)
                real_save(obj, f)

            torch.save = slow_save
        cm.save_checkpoint(checkpoint_dir, 7, {"w": torch.ones(2)}, {"rank": torch.tensor(rank)},
                           {"model_config": {}}, rank=rank)
        if rank == 0:
            assert os.path.exists(os.path.join(checkpoint_dir, "optim_000007_rank1.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_saves_its_optimizer_before_the_meta_appears(tmp_path):
    mp.spawn(_distributed_save_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    assert cm.find_last_step(str(tmp_path)) == 7
    for rank in range(2):
        _, optim_data, _ = cm.load_checkpoint(str(tmp_path), 7, "cpu", load_optimizer=True, rank=rank)
        assert optim_data["rank"].item() == rank


# -----------------------------------------------------------------------------
# finding checkpoints

def test_find_last_step_counts_only_complete_checkpoints(tmp_path):
    fake_save(tmp_path, 5, fill=5)
    fake_save(tmp_path, 1_234_567, fill=7)  # steps past 6 digits still sort as numbers
    (tmp_path / "model_9999999.pt").write_bytes(b"no meta: incomplete")
    (tmp_path / ".meta_9999999.json.123.tmp").write_text("{}")
    assert cm.list_steps(str(tmp_path)) == [5, 1_234_567]
    assert cm.find_last_step(str(tmp_path)) == 1_234_567
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        cm.find_last_step(str(tmp_path / "nothing"))


def test_find_largest_model_compares_depths_as_numbers(tmp_path):
    for tag in ["d3", "d12", "d20"]:
        fake_save(tmp_path / tag, 1, fill=1)
    (tmp_path / "d30").mkdir()  # a run that crashed before its first checkpoint
    assert cm.find_largest_model(str(tmp_path)) == "d20"


def test_find_largest_model_falls_back_to_the_newest_tag(tmp_path):
    for i, tag in enumerate(["zebra", "newest", "alpha"]):
        fake_save(tmp_path / tag, 1, fill=1)
        os.utime(tmp_path / tag, (1_000_000 + i * 1000 if tag != "newest" else 2_000_000,) * 2)
    assert cm.find_largest_model(str(tmp_path)) == "newest"
    with pytest.raises(FileNotFoundError, match="no model tags"):
        cm.find_largest_model(str(tmp_path / "missing"))


# -----------------------------------------------------------------------------
# errors a user can cause

@pytest.mark.parametrize("source,script", [("base", "scripts.base_train"), ("mid", "scripts.mid_train"),
                                           ("sft", "scripts.chat_sft"), ("rl", "scripts.chat_rl")])
def test_load_model_without_checkpoints_names_the_script_to_run(base_dir, source, script):
    with pytest.raises(FileNotFoundError, match=f"run `python -m {script}` first"):
        cm.load_model(source, "cpu", "eval")
    (base_dir / cm.STAGE_DIRS[source][0] / "d4").mkdir(parents=True)  # an empty tag directory is no better
    with pytest.raises(FileNotFoundError, match=f"no checkpoints in .*{cm.STAGE_DIRS[source][0]}"):
        cm.load_model(source, "cpu", "eval")


def test_missing_step_and_tag_list_what_exists(base_dir):
    fake_save(base_dir / "base_checkpoints" / "d4", 100, fill=1)
    fake_save(base_dir / "base_checkpoints" / "d4", 200, fill=2)
    with pytest.raises(FileNotFoundError, match=r"step 150 .*\[100, 200\]"):
        cm.load_checkpoint(str(base_dir / "base_checkpoints" / "d4"), 150, "cpu")
    with pytest.raises(FileNotFoundError, match=r"step 150 .*\[100, 200\]"):
        cm.load_model("base", "cpu", "eval", step=150)
    with pytest.raises(FileNotFoundError, match=r"'d9'.*\['d4'\].*--model-tag"):
        cm.load_model("base", "cpu", "eval", model_tag="d9")
    with pytest.raises(ValueError, match="unknown checkpoint source 'chat'"):
        cm.load_model("chat", "cpu", "eval")
    with pytest.raises(ValueError, match="phase"):
        cm.build_model(str(base_dir / "base_checkpoints" / "d4"), 100, "cpu", "inference")


def test_meta_must_hold_a_model_config_and_json_values(tmp_path):
    with pytest.raises(ValueError, match="model_config"):
        cm.save_checkpoint(str(tmp_path), 1, {}, None, {"step": 1})
    with pytest.raises(TypeError, match=r"meta_data\['rng'\].*capture_rng_state"):
        cm.save_checkpoint(str(tmp_path), 1, {}, None, {"model_config": {}, "rng": torch.get_rng_state()})
    assert cm.list_steps(str(tmp_path)) == []


def test_rng_state_survives_json_and_restores_every_generator():
    state = json.loads(json.dumps(cm.capture_rng_state()))
    expected = (random.random(), torch.rand(3))
    random.random(), torch.rand(5)  # move both generators on
    cm.restore_rng_state(state)
    got = (random.random(), torch.rand(3))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])


def test_prune_checkpoints_keeps_the_last_ones(tmp_path):
    from nanochat.checkpoint_manager import list_steps, prune_checkpoints, save_checkpoint
    ckpt = str(tmp_path / "d1")
    for step in (10, 20, 30, 40):
        save_checkpoint(ckpt, step, {"w": torch.zeros(2)}, {"m": torch.ones(1)}, {"model_config": {}})
    assert prune_checkpoints(ckpt, 2) == [10, 20]
    assert list_steps(ckpt) == [30, 40]
    assert sorted(os.listdir(ckpt)) == ["meta_000030.json", "meta_000040.json", "model_000030.pt", "model_000040.pt",
                                        "optim_000030_rank0.pt", "optim_000040_rank0.pt"]
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_checkpoints(ckpt, 0)
