"""
scripts/chat_eval.py: the categorical scorer picks the answer letter with the highest logit at
each row's last real position, the generative scorer grades the engine's decoded replies
(pass@k), ChatCORE centres accuracies on the tasks' baselines, every offline task scores a tiny
random model in [0, 1], and the command line prints the table, writes the report section and
fails with clear messages.

make_chat_base_dir (also used by test_chat_rl.py) builds a base directory holding a small BPE
tokenizer and a random 1-layer GPT saved as an SFT checkpoint.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer
from scripts.chat_eval import chat_core, run_categorical_eval, run_chat_eval, run_generative_eval
from scripts.chat_eval import main as chat_eval_main
from tasks.arithmetic import Arithmetic
from tasks.common import Task, extract_final_answer
from tasks.mixtures import eval_task_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LETTERS = ["A", "B", "C", "D"]


def make_chat_base_dir(base_dir, source_dir="chatsft_checkpoints", tag="d1", seed=0):
    """A ~500-token BPE tokenizer (trained on arithmetic problems) and a random 1-layer GPT saved
    as step 0 of <source_dir>/<tag>; returns (model, tokenizer).

    The residual projections and lm_head are random rather than zero/tiny as init_weights makes
    them, so the logits differ from token to token and position to position (varied answers).
    """
    texts = [str(Arithmetic("train", size=200)[i]) for i in range(200)]
    tokenizer = RustBPETokenizer.train_from_iterator(iter(texts), 500)
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=64)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                w.normal_(0.0, w.size(1) ** -0.5)
        model.lm_head.weight.normal_(0.0, config.n_embd ** -0.5)
    save_checkpoint(os.path.join(base_dir, source_dir, tag), 0, model.state_dict(), None,
                    {"model_config": config.__dict__, "tokenizer_hash": tokenizer.content_hash(), "user_config": {}})
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory):
    base_dir = str(tmp_path_factory.mktemp("chat_base"))
    model, tokenizer = make_chat_base_dir(base_dir)
    return base_dir, model, tokenizer


# -----------------------------------------------------------------------------
# The categorical scorer

class HintedMC(Task):
    """Multiple choice whose user message ends with the correct letter as its own token, and whose
    prompts have different lengths (so a batch is padded)."""

    eval_type = "categorical"

    def __init__(self, answers):
        super().__init__()
        self.answers = answers

    def num_examples(self):
        return len(self.answers)

    def get_example(self, index):
        question = "x " * (1 + 3 * index) + "hint:"
        return {"messages": [{"role": "user", "content": question + self.answers[index]},
                             {"role": "assistant", "content": self.answers[index]}],
                "letters": LETTERS}

    def evaluate(self, conversation, completion):
        return completion == conversation["messages"][-1]["content"]


class HintReader(nn.Module):
    """Logits that, at position t, favour the token at t-2 (for a prompt ending in
    "<letter><|user_end|><|assistant_start|>" that is the hinted letter at the last position),
    with a huge logit on a non-letter token everywhere, which the scorer must ignore."""

    def __init__(self, vocab_size, distractor, sign=1.0):
        super().__init__()
        self.lm_head = nn.Linear(1, 1, bias=False)
        self.vocab_size, self.distractor, self.sign = vocab_size, distractor, sign

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, 2:].scatter_(2, idx[:, :-2, None], self.sign * 10.0)
        logits[:, :, self.distractor] = 100.0
        return logits


def test_categorical_scorer_picks_the_letter_with_the_highest_logit(chat_base):
    _, _, tokenizer = chat_base
    answers = ["B", "D", "C", "B", "D", "C", "D"]
    task = HintedMC(answers)
    letter_ids = {tokenizer.encode(letter)[0] for letter in LETTERS}
    for i in range(len(task)):  # the construction HintReader relies on
        prompt = tokenizer.render_for_completion(task[i])
        assert prompt[-3] in letter_ids and tokenizer.decode([prompt[-3]]) == answers[i]
    distractor = tokenizer.encode("x")[0]
    model = HintReader(tokenizer.get_vocab_size(), distractor)
    assert run_categorical_eval(task, model, tokenizer, batch_size=3) == (len(answers), len(answers))
    # the lowest-logit letter is never the hinted one: argmax, not argmin or first
    contrarian = HintReader(tokenizer.get_vocab_size(), distractor, sign=-1.0)
    assert run_categorical_eval(task, contrarian, tokenizer, batch_size=3) == (0, len(answers))
    assert run_categorical_eval(task, model, tokenizer, batch_size=2, max_problems=4) == (4, 4)


# -----------------------------------------------------------------------------
# The generative scorer

class AnswerKeyEngine:
    """Stands in for Engine: sample j of a problem replies "#### <answer + offset[j]>"."""

    def __init__(self, model, tokenizer, task, offsets):
        self.model, self.tokenizer, self.offsets = model, tokenizer, offsets
        self.answers = {tuple(tokenizer.render_for_completion(task[i])): task[i] for i in range(len(task))}
        self.calls = []

    def generate_many(self, prompts, num_samples=1, max_batch=32, **kwargs):
        self.calls.append(kwargs)
        outputs = []
        for tokens in prompts:
            conversation = self.answers[tuple(tokens)]
            answer = int(extract_final_answer(conversation["messages"][-1]["content"][-1]["text"]))
            replies = [self.tokenizer.encode(f"so #### {answer + self.offsets[j]}") for j in range(num_samples)]
            outputs.append(([list(tokens) + r for r in replies], [[0] * len(tokens) + [1] * len(r) for r in replies]))
        return outputs


def test_generative_scorer_grades_decoded_replies_pass_at_k(chat_base):
    _, model, tokenizer = chat_base
    task = Arithmetic("test", size=5)
    engine = AnswerKeyEngine(model, tokenizer, task, offsets=[1, 0, 7])
    assert run_generative_eval(task, tokenizer, engine, 1, 20, 0.0, 50) == (0, 5)  # first sample always wrong
    assert run_generative_eval(task, tokenizer, engine, 2, 20, 0.0, 50) == (5, 5)  # pass@2: the second is right
    assert run_generative_eval(task, tokenizer, engine, 3, 20, 0.0, 50, max_problems=3) == (3, 3)
    assert engine.calls[0] == {"max_tokens": 20, "temperature": 0.0, "top_k": 50}


def test_generative_scorer_runs_the_real_engine(chat_base):
    _, model, tokenizer = chat_base

    class Recorder(Task):
        def __init__(self):
            super().__init__()
            self.completions = []

        def num_examples(self):
            return 3

        def get_example(self, index):
            return {"messages": [{"role": "user", "content": f"question {index}"}]}

        def evaluate(self, conversation, completion):
            self.completions.append(completion)
            return conversation["messages"][0]["content"] == "question 1"

    task = Recorder()
    engine = Engine(model, tokenizer)
    assert run_generative_eval(task, tokenizer, engine, 2, 8, 0.9, None, batch_size=3) == (1, 3)
    expected = []  # each problem's replies are what the engine gives it alone, the reply only, no prompt
    for i in range(3):
        prompt = tokenizer.render_for_completion(task[i])
        results, _ = engine.generate_batch(prompt, 2, max_tokens=8, temperature=0.9, top_k=None)
        replies = [tokenizer.decode(r[len(prompt):]) for r in results]
        expected += replies[:1] if i == 1 else replies  # problem 1 passes on its first reply
    assert task.completions == expected


# -----------------------------------------------------------------------------
# ChatCORE and the offline tasks

def test_chat_core_centres_each_task_on_its_baseline():
    assert chat_core({"DefinitionMC": 0.25}) == pytest.approx(0.0)  # chance on a 4-way task
    assert chat_core({"DefinitionMC": 1.0, "Arithmetic": 1.0}) == pytest.approx(1.0)
    assert chat_core({"DefinitionMC": 0.625, "Arithmetic": 0.2}) == pytest.approx((0.5 + 0.2) / 2)
    assert chat_core({"ARC-Easy": 0.0}) == pytest.approx(-1 / 3)  # below chance is negative


def test_every_offline_task_scores_a_random_model_in_unit_interval(chat_base):
    _, model, tokenizer = chat_base
    engine = Engine(model, tokenizer)
    for name in eval_task_names("offline"):
        acc = run_chat_eval(name, model, tokenizer, engine, batch_size=3, num_samples=1, max_new_tokens=16,
                            temperature=0.0, top_k=50, max_problems=4)
        assert 0.0 <= acc <= 1.0, name


# -----------------------------------------------------------------------------
# The command line

CLI_ARGS = ["-i", "sft", "-a", "Arithmetic", "DefinitionMC", "--max-problems", "5", "--data", "offline"]


def run_chat_eval_cli(base_dir, *args, launcher=(sys.executable, "-m")):
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([*launcher, "scripts.chat_eval", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def task_lines(stdout):
    """The per-task result lines without their timings: {task: "0.4000 (2/5 passed"}."""
    return dict(re.findall(r"^(\w+): (\d\.\d+ \(\d+/\d+ passed)", stdout, re.MULTILINE))


@pytest.fixture(scope="module")
def cli_output(chat_base):
    return run_chat_eval_cli(chat_base[0], *CLI_ARGS)


def test_cli_prints_the_table_and_writes_the_report(chat_base, cli_output):
    assert "Loaded sft model d1 step 0" in cli_output
    assert set(task_lines(cli_output)) == {"Arithmetic", "DefinitionMC"}
    assert all(line.endswith("/5 passed") for line in task_lines(cli_output).values())
    for line in ("| Arithmetic |", "| DefinitionMC |", "ChatCORE"):
        assert line in cli_output
    report = open(os.path.join(chat_base[0], "report", "chat-evaluation-sft.md")).read()
    assert report.startswith("## Chat evaluation sft")
    assert "| Arithmetic |" in report and "| DefinitionMC |" in report and "ChatCORE" in report


def test_torchrun_two_processes_score_like_one(chat_base, cli_output):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m")
    stdout = run_chat_eval_cli(chat_base[0], *CLI_ARGS, launcher=torchrun)
    assert task_lines(stdout) == task_lines(cli_output)  # 3 + 2 problems per process, counts summed


def exit_message(monkeypatch, *args):
    """Run chat_eval's main() in this process with `args`; return the message it exits with."""
    monkeypatch.setattr(sys, "argv", ["chat_eval", *args])
    with pytest.raises(SystemExit) as exit_info:
        chat_eval_main()
    return str(exit_info.value)


def test_cli_errors_name_the_fix(chat_base, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", chat_base[0])
    message = exit_message(monkeypatch, "-i", "sft", "-a", "MMLU", "--data", "offline")
    assert "MMLU" in message and "--data online" in message
    message = exit_message(monkeypatch, "-i", "sft", "-a", "ARC-Easy|Nope", "--data", "offline")
    assert "Nope" in message and "DefinitionMC" in message
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    message = exit_message(monkeypatch, "-i", "rl", "--data", "offline")
    assert "chatrl_checkpoints" in message and "scripts.chat_rl" in message
