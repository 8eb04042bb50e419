"""Tests for the tasks/ package: Task slicing and mixtures, every task's conversations (rendered
through a tiny trained tokenizer), graders, the online loaders on fixture files, the offline
generated tasks, mixtures per stage and data mode, and the identity data generator."""

import json
import os
import re
import socket
import sys

import numpy as np
import pytest

from dev import gen_identity_data
from nanochat.common import hub_reachable
from nanochat.tokenizer import RustBPETokenizer
from tasks import mixtures
from tasks.arc import ARC
from tasks.arithmetic import Arithmetic
from tasks.common import (HubUnavailableError, Task, TaskMixture, TaskSequence, assistant_text,
                          extract_final_answer, render_mc)
from tasks.customjson import CustomJSON
from tasks.dictionary import DefineWord, DefinitionMC, load_wordnet
from tasks.gsm8k import GSM8K, parse_gsm8k_answer
from tasks.humaneval import HumanEval, build_program, extract_code
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "tasks")


def fixture(name):
    return os.path.join(FIXTURES, name)


class ListTask(Task):
    """A task over a list of labels, each conversation saying its label."""

    def __init__(self, labels, **kwargs):
        super().__init__(**kwargs)
        self.labels = list(labels)

    def num_examples(self):
        return len(self.labels)

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": self.labels[index]}]}


def labels_of(tasklike):
    return [assistant_text(tasklike[i]) for i in range(len(tasklike))]


@pytest.fixture(scope="module")
def tokenizer():
    """A ~400-token BPE trained on a few KB of text like the tasks' own."""
    text = [assistant_text(Arithmetic("train", 40)[i]) for i in range(40)]
    text += [json.dumps(c) for c in gen_identity_data.generate_conversations(30)]
    return RustBPETokenizer.train_from_iterator(iter(text), 400)


@pytest.fixture(scope="module")
def identity_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("identity") / "identity_conversations.jsonl"
    with open(path, "w") as f:
        for conversation in gen_identity_data.generate_conversations(50):
            f.write(json.dumps(conversation) + "\n")
    return str(path)


def segments(tokenizer, ids, mask):
    """Split a rendering into (trained_text, untrained_text): the decoded masked and unmasked ids."""
    return (tokenizer.decode([i for i, m in zip(ids, mask) if m]),
            tokenizer.decode([i for i, m in zip(ids, mask) if not m]))


# -----------------------------------------------------------------------------
# Task, TaskMixture, TaskSequence

def test_task_slicing():
    task = ListTask("abcdefghij")
    assert len(task) == 10 and labels_of(task) == list("abcdefghij")
    assert labels_of(ListTask("abcdefghij", start=2, stop=8, step=3)) == ["c", "f"]
    assert labels_of(ListTask("abcdefghij", start=7, stop=100)) == ["h", "i", "j"]
    assert [assistant_text(c) for c in ListTask("abcde", step=2)] == ["a", "c", "e"]  # iteration stops
    assert assistant_text(task[np.int64(4)]) == "e"  # samplers index with numpy integers
    with pytest.raises(IndexError):
        ListTask("abc")[3]
    for bad in ({"start": -1}, {"step": 0}, {"start": 5, "stop": 2}):
        with pytest.raises(ValueError):
            ListTask("abc", **bad)


def test_mixture_is_a_deterministic_shuffle_of_every_item_once():
    tasks = [ListTask([f"a{i}" for i in range(30)]), ListTask([f"b{i}" for i in range(20)], step=2), ListTask([])]
    order = labels_of(TaskMixture(tasks, seed=42))
    assert sorted(order) == sorted([f"a{i}" for i in range(30)] + [f"b{i}" for i in range(0, 20, 2)])
    assert labels_of(TaskMixture(tasks, seed=42)) == order
    assert labels_of(TaskMixture(tasks, seed=7)) != order
    assert order[:10] != [f"a{i}" for i in range(10)]  # actually shuffled, not concatenated


def test_mixture_oversamples_a_task_listed_twice():
    small, big = ListTask(["s"]), ListTask(["b"] * 5)
    assert labels_of(TaskMixture([small, small, big])).count("s") == 2


def test_sequence_concatenates_in_order():
    seq = TaskSequence([ListTask("ab"), ListTask(""), ListTask("cde", start=1)])
    assert len(seq) == 4 and labels_of(seq) == ["a", "b", "d", "e"]
    with pytest.raises(IndexError):
        seq[4]


def test_render_mc_and_final_answer_parsing():
    text = render_mc("Capital of France?", ["A", "B"], ["Rome", "Paris"])
    assert "Capital of France?" in text and "- Rome=A" in text and "- Paris=B" in text
    assert extract_final_answer("so\n#### 1,250") == "1250"
    assert extract_final_answer("#### -3.5 dollars") == "-3.5"
    assert extract_final_answer("the answer is 4") is None


# -----------------------------------------------------------------------------
# Online tasks, read from fixture files in the Hub's schema

def test_gsm8k_annotations_become_tool_calls():
    parts = parse_gsm8k_answer("Half is 48/2 = <<48/2=24>>24 clips.\n#### 24")
    assert parts == [
        {"type": "text", "text": "Half is 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips.\n#### 24"},
    ]
    assert parse_gsm8k_answer("<<x>>#### 1") == [{"type": "text", "text": "#### 1"}]  # no '=': dropped


def test_gsm8k_loads_fixture_and_grades_numerically():
    task = GSM8K("train", data_files=fixture("gsm8k.jsonl"))
    assert len(task) == 3 and task.eval_type == "generative"
    first = task[0]
    calls = [p["text"] for p in first["messages"][1]["content"] if p["type"] == "python"]
    outputs = [p["text"] for p in first["messages"][1]["content"] if p["type"] == "python_output"]
    assert calls == ["12*2", "12+24"] and outputs == ["24", "36"]
    assert task.evaluate(first, "Some reasoning.\n#### 36")
    assert not task.evaluate(first, "#### 35")
    assert not task.evaluate(first, "36")  # no "####": not an answer
    assert task.evaluate(task[1], "#### 5000") and task.evaluate(task[1], "#### 5,000.0")
    assert task.reward(task[1], "#### 5000") == 1.0


def test_mmlu_loads_both_row_shapes():
    test = MMLU("all", "test", data_files=fixture("mmlu.jsonl"))
    aux = MMLU("auxiliary_train", "train", data_files=fixture("mmlu_auxiliary_train.jsonl"))
    assert len(test) == 3 and len(aux) == 2 and test.eval_type == "categorical"
    conv = test[0]
    assert conv["letters"] == ["A", "B", "C", "D"] and conv["messages"][1]["content"] == "B"
    assert "- Mercury=B" in conv["messages"][0]["content"]
    assert aux[0]["messages"][1]["content"] == "C"
    assert test.evaluate(conv, "B") and not test.evaluate(conv, "A")
    with pytest.raises(ValueError, match="splits"):
        MMLU("auxiliary_train", "test", data_files=fixture("mmlu.jsonl"))


def test_arc_relabels_choices_as_letters():
    task = ARC("ARC-Easy", "test", data_files=fixture("arc.jsonl"))
    assert [task[i]["messages"][1]["content"] for i in range(3)] == ["A", "C", "C"]
    assert "- a thermometer=C" in task[1]["messages"][0]["content"]  # labels 1-4 become A-D
    assert task[2]["letters"] == ["A", "B", "C"]  # three choices, three letters
    assert task.evaluate(task[1], " C\n") and not task.evaluate(task[1], "3")


def test_smoltalk_loads_fixture():
    task = SmolTalk("train", data_files=fixture("smoltalk.jsonl"))
    assert len(task) == 2
    assert [m["role"] for m in task[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def closed_port_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more: connections are refused


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_endpoint())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert not hub_reachable(timeout=1)
    with pytest.raises(HubUnavailableError, match=r"openai/gsm8k.*--data offline") as info:
        GSM8K("test")
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(HubUnavailableError):
        mixtures.rl_task("online", "train")


# -----------------------------------------------------------------------------
# Rendering through the tokenizer, with assistant-only masks

def test_multiple_choice_trains_only_the_letter(tokenizer):
    conv = MMLU("all", "test", data_files=fixture("mmlu.jsonl"))[0]
    ids, mask = tokenizer.render_conversation(conv)
    trained, _ = segments(tokenizer, ids, mask)
    assert trained == "B<|assistant_end|>"


def tool_segments(tokenizer, conv):
    """Render `conv` -> (decoded python calls, all masked, if each is; outputs, unmasked, if each is)."""
    ids, mask = tokenizer.render_conversation(conv, max_tokens=10_000)
    text = tokenizer.decode(ids)
    calls = re.findall(r"<\|python_start\|>(.*?)<\|python_end\|>", text)
    outputs = re.findall(r"<\|output_start\|>(.*?)<\|output_end\|>", text)
    s = tokenizer.encode_special
    state, call_masks, output_masks = None, [], []
    for i, m in zip(ids, mask):
        if i == s("<|python_start|>"):
            state = "call"
        elif i == s("<|output_start|>"):
            state = "output"
        (call_masks if state == "call" else output_masks if state == "output" else []).append(m)
        if i in (s("<|python_end|>"), s("<|output_end|>")):
            state = None
    assert call_masks and all(call_masks), "python calls, delimiters included, are trained on"
    assert output_masks and not any(output_masks), "tool outputs are never trained on"
    trained, _ = segments(tokenizer, ids, mask)
    assert trained.endswith("<|assistant_end|>") and "<|user_start|>" not in trained
    return calls, outputs


def test_tool_calls_are_trained_and_outputs_are_not(tokenizer):
    calls, outputs = tool_segments(tokenizer, GSM8K("train", data_files=fixture("gsm8k.jsonl"))[0])
    assert calls == ["12*2", "12+24"] and outputs == ["24", "36"]
    for conv in (Arithmetic("train", 5)[3], SpellingBee(size=5)[2]):
        calls, outputs = tool_segments(tokenizer, conv)
        assert len(calls) == len(outputs) >= 1


@pytest.mark.filterwarnings("ignore:CustomJSON skipped")
def test_every_task_renders(tokenizer, identity_file):
    convs = [
        SmolTalk("train", data_files=fixture("smoltalk.jsonl"))[1],
        ARC("ARC-Easy", "test", data_files=fixture("arc.jsonl"))[2],
        HumanEval()[0], SimpleSpelling(size=3)[0], DefineWord(size=3)[1], DefinitionMC(size=3)[2],
        CustomJSON(identity_file)[0], CustomJSON(fixture("customjson_mixed.jsonl"))[1],
    ]
    for conv in convs:
        ids, mask = tokenizer.render_conversation(conv, max_tokens=100_000)
        trained, untrained = segments(tokenizer, ids, mask)
        assert untrained.startswith("<|bos|><|user_start|>") and trained.endswith("<|assistant_end|>")
        prompt = tokenizer.render_for_completion(conv)
        assert prompt[-1] == tokenizer.encode_special("<|assistant_start|>")


# -----------------------------------------------------------------------------
# CustomJSON

def test_customjson_lenient_skips_and_reports_bad_lines():
    with pytest.warns(UserWarning) as record:
        task = CustomJSON(fixture("customjson_mixed.jsonl"))
    assert len(task) == 2
    message = str(record[0].message)
    reported = [int(n) for n in re.findall(r"line (\d+):", message)]
    assert reported == [2, 3, 4, 6, 8]  # line 5 is blank, lines 1 and 7 are fine
    assert "bad JSON" in message and "'robot'" in message and "empty content" in message


def test_customjson_strict_rejects_with_line_numbers(tmp_path):
    with pytest.raises(ValueError, match=r"5 malformed[\s\S]*line 2:[\s\S]*line 8:"):
        CustomJSON(fixture("customjson_mixed.jsonl"), strict=True)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        CustomJSON(str(tmp_path / "nope.jsonl"))
    unfinished = tmp_path / "unfinished.jsonl"
    unfinished.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    with pytest.raises(ValueError, match="line 1: .*end with an assistant"):
        CustomJSON(str(unfinished), strict=True)


# -----------------------------------------------------------------------------
# Offline generated tasks

def test_spelling_bee_answers_are_correct():
    task = SpellingBee(size=200)
    questions = set()
    for i in range(len(task)):
        conv = task[i]
        parts = conv["messages"][1]["content"]
        call = next(p["text"] for p in parts if p["type"] == "python")
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", call).groups()
        assert word in conv["messages"][0]["content"]
        count = word.count(letter)
        assert next(p["text"] for p in parts if p["type"] == "python_output") == str(count)
        assert assistant_text(conv).endswith(f"#### {count}")
        assert task.evaluate(conv, f"... #### {count}") and not task.evaluate(conv, f"#### {count + 1}")
        questions.add(re.sub(r"\w+", "w", conv["messages"][0]["content"]))
    assert len(questions) >= 5  # phrasings vary
    assert SpellingBee(size=200)[17] == task[17]  # deterministic per index
    assert any(assistant_text(task[i]).endswith("#### 0") for i in range(len(task)))


def test_simple_spelling():
    task = SimpleSpelling(size=20, split="test")
    conv = task[0]
    word, spelled = assistant_text(conv).split(": ")
    assert spelled.split(", ") == list(word)
    assert task.evaluate(conv, assistant_text(conv) + "\n") and not task.evaluate(conv, "w, r, o, n, g")
    train_words = {assistant_text(c).split(":")[0] for c in SimpleSpelling(size=300, split="train")}
    test_words = {assistant_text(c).split(":")[0] for c in SimpleSpelling(size=300, split="test")}
    assert not train_words & test_words


def test_arithmetic_answers_are_correct():
    task = Arithmetic("train", size=2000)
    for conv in task:
        parts = conv["messages"][1]["content"]
        last = None
        for call, output in zip(parts, parts[1:]):
            if call["type"] == "python":
                assert output["type"] == "python_output"
                assert re.fullmatch(r"[0-9+\-*/]+", call["text"])
                last = eval(call["text"])
                assert output["text"] == str(last)
        answer = int(extract_final_answer(assistant_text(conv)))
        assert answer == last and answer >= 0
        assert task.evaluate(conv, f"#### {answer}") and not task.evaluate(conv, f"#### {answer + 1}")
    assert Arithmetic("train", 5)[3] == task[3]
    assert Arithmetic("test", 5)[3] != task[3]


def test_dictionary_tasks():
    senses = load_wordnet()
    assert senses["bank"][0][0] == "noun" and len(senses["bank"]) > 3
    define = DefineWord(split="train", size=50)
    conv = define[0]
    word = conv["word"]
    assert senses[word][0][1] in assistant_text(conv)
    assert define.evaluate(conv, assistant_text(conv)) and not define.evaluate(conv, "I do not know.")
    mc = DefinitionMC(split="test", size=50)
    for conv in mc:
        letter = conv["messages"][1]["content"]
        word = conv["word"]
        assert word in conv["messages"][0]["content"]
        choices = re.findall(r"^- (.*)=([A-D])$", conv["messages"][0]["content"], re.MULTILINE)
        assert [l for _, l in choices] == ["A", "B", "C", "D"] and len({c for c, _ in choices}) == 4
        assert dict((l, c) for c, l in choices)[letter] == senses[word][0][1]
        assert mc.evaluate(conv, letter) and not mc.evaluate(conv, "E")
    assert not set(DefineWord(split="train").words) & set(DefineWord(split="test").words)


@pytest.mark.slow
def test_humaneval_through_the_sandbox():
    task = HumanEval()
    assert len(task) == 164 and task.eval_type == "generative"
    for i in (0, 2, 10):
        conv = task[i]
        assert task.evaluate(conv, assistant_text(conv)), conv["problem"]["task_id"]
    body = task.problems[2]["canonical_solution"]
    assert task.evaluate(task[2], body)  # a bare continuation of the prompt also works
    wrong = f"```python\ndef {task[0]['problem']['entry_point']}(numbers, threshold):\n    return False\n```"
    assert not task.evaluate(task[0], wrong)
    assert not task.evaluate(task[0], "while True:\n    pass")  # times out


def test_humaneval_program_building():
    assert extract_code("Sure:\n```python\nx = 1\n```\nDone.") == "x = 1\n"
    assert extract_code("```python\ny = 2\n") == "y = 2\n"  # cut off before the closing fence
    assert extract_code("z = 3") == "z = 3"
    problem = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1", "entry_point": "f"}
    program = build_program(problem, "    return 1")
    assert program.startswith("def f():\n") and program.rstrip().endswith("check(f)")


# -----------------------------------------------------------------------------
# Mixtures and the eval registry

def test_offline_mixtures(identity_file):
    sizes = {"define_word": 10, "definition_mc": 10, "arithmetic": 10, "simple_spelling": 5, "spelling_bee": 5}
    identity_len = len(CustomJSON(identity_file))
    mid = mixtures.mid_mixture("offline", "train", sizes=sizes, identity=identity_file)
    assert len(mid) == 40 + 2 * identity_len
    again = mixtures.mid_mixture("offline", "train", sizes=sizes, identity=identity_file)
    assert [mid[i] for i in range(0, len(mid), 7)] == [again[i] for i in range(0, len(again), 7)]
    val = mixtures.mid_mixture("offline", "val", sizes=sizes, identity=identity_file)
    assert len(val) == 40  # no identity in validation
    sft = mixtures.sft_mixture("offline", "train", sizes=sizes, identity=identity_file)
    assert len(sft) == 40 + identity_len
    rl = mixtures.rl_task("offline", "val", size=8)
    assert isinstance(rl, Arithmetic) and rl.split == "test" and len(rl) == 8
    with pytest.raises(ValueError, match="unknown sizes"):
        mixtures.sft_mixture("offline", "train", sizes={"smoltalk": 5}, identity=identity_file)
    with pytest.raises(ValueError, match="split"):
        mixtures.mid_mixture("offline", "test")


def test_missing_identity_file_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dev.gen_identity_data"):  # a path the user named must exist
        mixtures.sft_mixture("offline", "train", sizes={"define_word": 1}, identity=str(tmp_path / "mine.jsonl"))
    mixtures.sft_mixture("offline", "train", sizes={"define_word": 1})  # the default set is written when missing
    assert (tmp_path / "identity_conversations.jsonl").exists()


def test_resolve_data_mode(monkeypatch, capsys):
    assert mixtures.resolve_data_mode("offline") == "offline"
    with pytest.raises(ValueError, match="--data"):
        mixtures.resolve_data_mode("maybe")
    monkeypatch.setattr(mixtures, "hub_reachable", lambda: False)
    assert mixtures.resolve_data_mode("auto") == "offline"
    assert "OFFLINE" in capsys.readouterr().out
    monkeypatch.setattr(mixtures, "hub_reachable", lambda: True)
    assert mixtures.resolve_data_mode("auto") == "online"


def test_eval_registry():
    assert set(mixtures.eval_task_names("online")) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"}
    offline = mixtures.eval_task_names("offline")
    assert {"DefinitionMC", "Arithmetic", "SpellingBee", "HumanEval"} == set(offline)
    for name in offline:
        spec = mixtures.EVAL_TASKS[name]
        task = spec.build()
        assert len(task) > 0
        assert spec.baseline == (0.25 if task.eval_type == "categorical" else 0.0)
    assert mixtures.EVAL_TASKS["MMLU"].baseline == 0.25 and mixtures.EVAL_TASKS["MMLU"].needs_hub


# -----------------------------------------------------------------------------
# dev/gen_identity_data.py

def test_identity_generator(tmp_path, monkeypatch, capsys):
    out = tmp_path / "id.jsonl"
    argv = ["gen_identity_data", "--output", str(out), "--trainer-name", "Ada Lovelace",
            "--hardware", "a single NVIDIA H100", "--num-conversations", "300"]
    monkeypatch.setattr(sys, "argv", argv)
    gen_identity_data.main()
    lines = out.read_text().splitlines()
    assert len(lines) == len(set(lines)) == 300
    task = CustomJSON(str(out), strict=True)
    text = "\n".join(m["content"] for conv in task for m in conv["messages"])
    assert "Ada Lovelace" in text and "a single NVIDIA H100" in text and "nanochat-spark" in text
    with pytest.raises(SystemExit):  # refuses to overwrite (the user may have edited it)
        gen_identity_data.main()
    assert "--force" in capsys.readouterr().err
