"""
scripts/chat_rl.py: group advantages sum to zero, the policy-gradient loss counts only sampled
tokens, gives no gradient at zero advantage and raises the log-probability of a
positive-advantage reply; rollouts keep the stop token; and the script runs on the offline
task, logs the mean reward, tok/s and MFU, checkpoints, and resumes to bit-identical weights.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from scripts import chat_rl
from scripts.chat_rl import collate_rollouts, group_advantages, policy_gradient_loss, sample_rollouts
from tasks.arithmetic import Arithmetic
from test_chat_eval import make_chat_base_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_gpt(seed=0, vocab_size=50):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=32))
    model.init_weights()
    return model


def sequence_logprobs(model, inputs, targets):
    """Sum of log p over each row's counted tokens -> (B,)."""
    with torch.no_grad():
        return -model(inputs, targets, loss_reduction="none").sum(1)


# -----------------------------------------------------------------------------
# Advantages and the loss

def test_group_advantages_sum_to_zero_without_std_normalisation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    adv = group_advantages(rewards)
    assert adv.sum().item() == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(adv, torch.tensor([0.4, -0.6, -0.6, 0.4, 0.4]))
    assert torch.equal(group_advantages(torch.ones(4)), torch.zeros(4))  # all right: nothing to learn


def test_collate_counts_only_sampled_tokens():
    # prompt 3 tokens, sampled 2, tool-forced 2, sampled 1 (the stop token); a shorter second row
    sequences = [[1, 2, 3, 10, 11, 20, 21, 12], [1, 2, 13, 14]]
    masks = [[0, 0, 0, 1, 1, 0, 0, 1], [0, 0, 1, 1]]
    inputs, targets = collate_rollouts(sequences, masks, pad_id=0, device="cpu")
    assert inputs.tolist() == [[1, 2, 3, 10, 11, 20, 21], [1, 2, 13, 0, 0, 0, 0]]
    assert targets.tolist() == [[-1, -1, 10, 11, -1, -1, 12], [-1, 13, 14, -1, -1, -1, -1]]


def test_zero_advantage_gives_zero_gradient():
    model = tiny_gpt()
    inputs, targets = collate_rollouts([[1, 2, 3, 4, 5], [1, 2, 6, 7]], [[0, 0, 1, 1, 1], [0, 0, 1, 1]], 0, "cpu")
    policy_gradient_loss(model, inputs, targets, torch.zeros(2), num_tokens=5).backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_a_step_raises_the_logprob_of_the_positive_advantage_reply():
    model = tiny_gpt()
    optimizers = model.setup_optimizers()
    sequences = [[1, 2, 3, 30, 31, 32, 33], [1, 2, 3, 40, 41, 42, 43]]  # same prompt, two replies
    masks = [[0, 0, 0, 1, 1, 1, 1]] * 2
    inputs, targets = collate_rollouts(sequences, masks, 0, "cpu")
    before = sequence_logprobs(model, inputs, targets)
    advantages = group_advantages(torch.tensor([1.0, 0.0]))  # the first reply was right
    policy_gradient_loss(model, inputs, targets, advantages, num_tokens=8).backward()
    for opt in optimizers:
        opt.step()
    after = sequence_logprobs(model, inputs, targets)
    assert after[0] > before[0] + 1e-3
    assert after[1] < before[1] - 1e-3


def test_policy_gradient_loss_is_the_token_mean_over_chunks():
    """Chunked losses with the step's token count add up to one loss over all rows."""
    model = tiny_gpt()
    sequences = [[1, 2, 3, 4], [1, 5, 6, 7, 8, 9], [1, 2, 10]]
    masks = [[0, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 1]]
    advantages = torch.tensor([0.5, -0.25, -0.25])
    num_tokens = sum(sum(m[1:]) for m in masks)
    whole = policy_gradient_loss(model, *collate_rollouts(sequences, masks, 0, "cpu"), advantages, num_tokens)
    parts = sum(policy_gradient_loss(model, *collate_rollouts(sequences[b:b + 2], masks[b:b + 2], 0, "cpu"),
                                     advantages[b:b + 2], num_tokens) for b in (0, 2))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-5)
    inputs, targets = collate_rollouts(sequences, masks, 0, "cpu")
    expected = -(advantages * sequence_logprobs(model, inputs, targets)).sum() / num_tokens
    assert whole.item() == pytest.approx(expected.item(), rel=1e-5)


# -----------------------------------------------------------------------------
# Rollouts

@pytest.fixture(scope="module")
def rl_base(tmp_path_factory):
    base_dir = str(tmp_path_factory.mktemp("rl_base"))
    model, tokenizer = make_chat_base_dir(base_dir)
    return base_dir, model, tokenizer


def test_rollouts_of_several_problems_are_each_problem_s_own_and_keep_the_stop_token(rl_base):
    """Two problems' groups decoded together in batches of 3: each group is what the engine
    samples for that problem alone with its seed, stop token included; masks are 0 on the prompt."""
    _, model, tokenizer = rl_base
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    engine = Engine(model, tokenizer)
    prompts = [tokenizer.render_for_completion({"messages": [{"role": "user", "content": text}]}) for text in ("1+1", "2+2")]
    groups = sample_rollouts(engine, tokenizer, prompts, [11, 12], 4, 120, 1.0, None, sample_batch_size=3)
    stopped = 0
    for prompt, seed, (sequences, masks, replies) in zip(prompts, [11, 12], groups):
        alone = [list(prompt) for _ in range(4)]
        for column, _ in engine.generate(prompt, 4, max_tokens=120, temperature=1.0, seed=seed):
            for row, token in zip(alone, column):
                if len(row) == len(prompt) or row[-1] not in stops:
                    row.append(token)
        assert sequences == alone
        for seq, mask, reply in zip(sequences, masks, replies):
            assert len(mask) == len(seq) and mask[:len(prompt)] == [0] * len(prompt) and set(mask[len(prompt):]) <= {0, 1}
            ended = seq[-1] in stops
            stopped += ended
            assert reply == tokenizer.decode(seq[len(prompt):len(seq) - ended])
    assert stopped > 0  # the random model ends some replies within 120 tokens: the stop token is kept


# -----------------------------------------------------------------------------
# The script

RL_FLAGS = ["--data=offline", "--num-iterations=4", "--examples-per-step=2", "--num-samples=4",
            "--device-batch-size=3", "--max-new-tokens=12", "--eval-every=2", "--eval-examples=3",
            "--eval-samples=2", "--save-every=2", "--init-lr-frac=1.0"]


def checkpoint_files(base_dir, step, tag="d1"):
    checkpoint_dir = os.path.join(base_dir, "chatrl_checkpoints", tag)
    return [os.path.join(checkpoint_dir, name) for name in
            (f"model_{step:06d}.pt", f"optim_{step:06d}_rank0.pt", f"meta_{step:06d}.json")]


def load_weights(base_dir, step):
    return torch.load(checkpoint_files(base_dir, step)[0], map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_script_runs_the_offline_task_saves_and_resumes(rl_base):
    base_dir = rl_base[0]
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def run(*flags):
        proc = subprocess.run([sys.executable, "-m", "scripts.chat_rl", *RL_FLAGS, *flags], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    out = run()
    assert "Loaded sft model d1 step 0" in out
    assert out.count("| mean reward ") == 4 and "step 00004/00004 | mean reward 0.0000" in out
    # every step's line has its throughput (tokens sampled + tokens trained on) and MFU (no peak on CPU)
    speeds = re.findall(r"\| tok/s \(sampled \+ trained\) ([\d,]+) \| mfu n/a \| eta ", out)
    assert len(speeds) == 4 and all(int(v.replace(",", "")) > 0 for v in speeds), out
    assert "step 00004 | val pass@1 " in out
    assert all(os.path.exists(p) for p in checkpoint_files(base_dir, 2) + checkpoint_files(base_dir, 4))
    report = open(os.path.join(base_dir, "report", "chat-rl.md")).read()
    assert report.startswith("## Chat RL") and "mean reward (last step)" in report and "val pass@1" in report
    final = load_weights(base_dir, 4)
    for path in checkpoint_files(base_dir, 4):  # as if killed after saving step 2
        os.remove(path)
    out = run("--resume")
    # a resume, not a restart: it loaded step 2 and ran steps 3 and 4 only
    assert f"resumed from {os.path.join(base_dir, 'chatrl_checkpoints', 'd1')} step 2\n" in out
    assert re.findall(r"^step (\d{5})/00004 \| mean reward", out, re.MULTILINE) == ["00003", "00004"], out
    assert_same_weights(load_weights(base_dir, 4), final)


class ParityTask(Arithmetic):
    """Arithmetic prompts with a reward a random model earns about half of the time, so groups
    have non-zero advantages and the weights move."""

    def reward(self, conversation, completion):
        return float(completion.count("e") % 2)


def test_resume_is_bit_identical_with_learning_signal(rl_base, tmp_path, monkeypatch, capsys):
    base_dir = str(tmp_path)
    shutil.copytree(os.path.join(rl_base[0], "tokenizer"), os.path.join(base_dir, "tokenizer"))
    shutil.copytree(os.path.join(rl_base[0], "chatsft_checkpoints"), os.path.join(base_dir, "chatsft_checkpoints"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base_dir)
    monkeypatch.setattr(chat_rl, "rl_task", lambda data, split: ParityTask("train" if split == "train" else "test", 50))
    chat_rl.main(RL_FLAGS + ["--max-new-tokens=24"])
    initial = torch.load(os.path.join(base_dir, "chatsft_checkpoints", "d1", "model_000000.pt"), weights_only=True)
    final = load_weights(base_dir, 4)
    assert any(not torch.equal(initial[k], final[k]) for k in final)  # it learned something
    for path in checkpoint_files(base_dir, 4):
        os.remove(path)
    capsys.readouterr()
    chat_rl.main(RL_FLAGS + ["--max-new-tokens=24", "--resume"])
    out = capsys.readouterr().out
    assert f"resumed from {os.path.join(base_dir, 'chatrl_checkpoints', 'd1')} step 2\n" in out
    assert re.findall(r"^step (\d{5})/00004 \| mean reward", out, re.MULTILINE) == ["00003", "00004"], out
    assert_same_weights(load_weights(base_dir, 4), final)
