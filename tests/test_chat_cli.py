"""Tests for scripts/chat_cli.py driven through a pseudo-terminal with the tiny models of
conftest.build_base_dir, and for the model selection it shares with chat_web
(checkpoint_manager.find_default_source)."""

import os
import shutil
import subprocess
import sys

import pexpect
import pytest

from conftest import REPO, TINY_CONTEXT

SHORT = ("--max-tokens", "20")  # quick answers where their length does not matter


def spawn_cli(base_dir, *flags):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NO_COLOR": "1", "TERM": "dumb"}
    return pexpect.spawn(sys.executable, ["-m", "scripts.chat_cli", "--device-type", "cpu", *flags],
                         cwd=REPO, env=env, encoding="utf-8", codec_errors="replace", timeout=120)


def test_conversation_clear_and_quit(chat_base_dir):
    child = spawn_cli(chat_base_dir, "--model-tag", "d1", *SHORT)
    child.expect(r"Loaded sft model d1 step 0 from \S+model_000000\.pt")
    child.expect("User: ")
    child.sendline("Hello, how are you?")
    child.expect("Assistant: ")
    child.expect("User: ")  # the answer streamed and the next prompt came back
    child.sendline("And a second question?")
    child.expect("Assistant: ")
    child.expect("User: ")
    child.sendline("clear")
    child.expect(r"\(conversation cleared\)")
    child.expect("User: ")
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.parametrize("key", ["\x04", "\x03"])  # Ctrl-D, Ctrl-C at the prompt
def test_ctrl_d_and_ctrl_c_leave_cleanly(chat_base_dir, key):
    child = spawn_cli(chat_base_dir, "--model-tag", "d1", *SHORT)
    child.expect("User: ")
    child.send(key)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in child.before


def test_ctrl_c_stops_an_answer(chat_base_dir):
    child = spawn_cli(chat_base_dir, "--model-tag", "chatty", "--max-tokens", "4000")
    child.expect("User: ")
    child.sendline("Tell me everything.")
    child.expect("Assistant: ")
    child.expect(".{20}")  # tokens are arriving
    child.sendintr()
    child.expect(r"\(stopped\)")
    child.expect("User: ")
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_default_max_tokens_is_cut_to_a_small_context(chat_base_dir):
    """The tiny run's model (context 512) and the default --max-tokens (512): the first answer fills
    the room the prompt leaves; the next question finds the context full and is told to `clear`."""
    child = spawn_cli(chat_base_dir, "--model-tag", "tiny")
    child.expect(f"context {TINY_CONTEXT} tokens")
    child.expect("User: ")
    child.sendline("Why is the sky blue?")
    child.expect("Assistant: ")
    child.expect("User: ")
    assert len(child.before.strip()) > 100  # ~500 tokens of answer
    child.sendline("And why is grass green?")
    child.expect(rf"\(the conversation is \d+ tokens, the model's whole context of {TINY_CONTEXT}; type `clear`\)")
    child.expect("User: ")
    child.sendline("clear")
    child.expect("User: ")
    child.sendline("Why is the sky blue?")
    child.expect("Assistant: ")
    child.expect("User: ")
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and "Traceback" not in child.before


def test_single_prompt(chat_base_dir):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(chat_base_dir)}
    p = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", "--model-tag", "d1", "-p", "hi",
                        "--max-tokens", "10", "--temperature", "0"], cwd=REPO, env=env, capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode("utf-8", "replace").splitlines()
    assert out[0].startswith("Loaded sft model d1 step 0 from") and "0.1M params" in out[1]
    assert len(out) >= 3 and out[2].strip()  # the answer


def test_no_checkpoint_is_a_clear_error(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", "-p", "hi"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "no model checkpoints" in p.stderr and "python -m scripts.base_train" in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_source_is_a_clear_error(chat_base_dir):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(chat_base_dir)}
    p = subprocess.run([sys.executable, "-m", "scripts.chat_cli", "--device-type", "cpu", "--source", "rl", "-p", "hi"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "scripts.chat_rl" in p.stderr and "Traceback" not in p.stderr


def test_default_source_is_the_most_advanced_stage_with_a_checkpoint(tmp_path, monkeypatch):
    from nanochat.checkpoint_manager import find_default_source, save_checkpoint
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="scripts.base_train"):
        find_default_source()
    meta = {"model_config": {}}
    save_checkpoint(str(tmp_path / "base_checkpoints" / "d1"), 5, {}, None, meta)
    assert find_default_source() == "base"
    save_checkpoint(str(tmp_path / "chatsft_checkpoints" / "d1"), 5, {}, None, meta)
    assert find_default_source() == "sft"
    (tmp_path / "chatrl_checkpoints" / "d1").mkdir(parents=True)  # an empty directory does not count
    (tmp_path / "mid_checkpoints").mkdir()
    assert find_default_source() == "sft"
    save_checkpoint(str(tmp_path / "chatrl_checkpoints" / "d1"), 1, {}, None, meta)
    assert find_default_source() == "rl"


@pytest.mark.parametrize("script", ["chat.sh", "chat_cli.sh"])
def test_shell_wrappers(script, tmp_path):
    help_text = subprocess.run(["bash", script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert help_text.returncode == 0 and "--source" in help_text.stdout and "NANOCHAT_BASE_DIR" in help_text.stdout
    assert subprocess.run(["bash", script, "--bogus"], cwd=REPO, capture_output=True, timeout=30).returncode == 2
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}  # no checkpoints: the Python error comes through
    p = subprocess.run(["bash", script, "-s", "sft", "-t", "0.5", "-k", "10", "-m", "20", "--", "--device-type", "cpu"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "scripts.chat_sft" in p.stderr and "Traceback" not in p.stderr
    if shutil.which("shellcheck"):
        assert subprocess.run(["shellcheck", "-x", script], cwd=REPO).returncode == 0  # -x: follow the common.sh it sources
