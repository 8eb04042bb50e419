"""
What each chat stage trains and evaluates on, for both data modes:
  "online":  the Hugging Face Hub datasets nanochat uses (SmolTalk, MMLU, ARC, GSM8K), plus
             identity conversations and spelling tasks;
  "offline": data built on this machine from Debian and PyPI packages (WordNet definitions,
             generated arithmetic, spelling, identity conversations), so the whole pipeline
             runs without the Hub, as on CI.
mid_mixture / sft_mixture / rl_task build a stage's train or val data; EVAL_TASKS lists the
tasks chat_eval can run, with the chance-level score that ChatCORE subtracts.

Not for: the tasks themselves (one module each in tasks/) or training loops (scripts/).

Sizes: each builder takes `sizes`, a dict overriding any of its entries (see the *_SIZES
dicts; None = the whole dataset). Online defaults are nanochat's; offline defaults fit a
tiny CPU run and scale up freely (the offline tasks are generated, any size works).
"""

import os
from dataclasses import dataclass
from typing import Callable

from nanochat.common import hub_reachable
from tasks.arc import ARC
from tasks.arithmetic import Arithmetic
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON
from tasks.dictionary import DefineWord, DefinitionMC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.identity import ensure_identity_file
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

DATA_MODES = ("auto", "online", "offline")
SPLITS = ("train", "val")

MID_SIZES = {
    ("online", "train"): {"smoltalk": None, "mmlu": None, "gsm8k": None, "simple_spelling": 200_000, "spelling_bee": 80_000},
    ("online", "val"): {"smoltalk": None, "mmlu": 5200, "gsm8k": 420},
    ("offline", "train"): {"define_word": 5000, "definition_mc": 5000, "arithmetic": 5000, "simple_spelling": 2000, "spelling_bee": 2000},
    ("offline", "val"): {"define_word": 200, "definition_mc": 200, "arithmetic": 200, "simple_spelling": 100, "spelling_bee": 100},
}
SFT_SIZES = {
    ("online", "train"): {"arc_easy": None, "arc_challenge": None, "gsm8k": None, "smoltalk": 10_000, "simple_spelling": 300, "spelling_bee": 300},
    ("online", "val"): {"smoltalk": None},
    ("offline", "train"): {"define_word": 1000, "definition_mc": 2000, "arithmetic": 2000, "simple_spelling": 300, "spelling_bee": 300},
    ("offline", "val"): {"define_word": 100, "definition_mc": 100, "arithmetic": 100, "simple_spelling": 50, "spelling_bee": 50},
}
RL_SIZES = {("offline", "train"): 5000, ("offline", "val"): 500}


def resolve_data_mode(data):
    """--data "auto" -> "online" if the Hub answers, else "offline" (with a loud banner).

    Raises:
        ValueError: `data` is not one of DATA_MODES.
    """
    if data not in DATA_MODES:
        raise ValueError(f"--data must be one of {list(DATA_MODES)}, got {data!r}")
    if data != "auto":
        return data
    if hub_reachable():
        return "online"
    bar = "!" * 78
    print(f"{bar}\n!! The Hugging Face Hub is unreachable: using the OFFLINE data (WordNet, generated\n"
          f"!! arithmetic and spelling, identity). The model will not see SmolTalk, MMLU, ARC or\n"
          f"!! GSM8K. Pass --data online to insist on the Hub, --data offline to silence this.\n{bar}", flush=True)
    return "offline"


def _identity(path):
    """The identity conversations of `path`, or of $NANOCHAT_BASE_DIR/identity_conversations.jsonl
    (written with the defaults first if missing: tasks/identity.py) when path is None."""
    if path is None:
        return CustomJSON(ensure_identity_file())
    if not os.path.exists(path):
        raise FileNotFoundError(f"no identity conversations at {path}; generate them with "
                                f"`python -m dev.gen_identity_data --output {path}` (then edit them as you like)")
    return CustomJSON(path)


def _check(data, split):
    if data not in ("online", "offline"):
        raise ValueError(f"data must be 'online' or 'offline' (resolve 'auto' with resolve_data_mode first), got {data!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def _sizes(defaults, data, split, sizes):
    merged = dict(defaults[(data, split)])
    unknown = set(sizes or {}) - set(merged)
    if unknown:
        raise ValueError(f"unknown sizes {sorted(unknown)}; this mixture's entries are {sorted(merged)}")
    merged.update(sizes or {})
    return merged


def _spelling(s, split):
    task_split = "train" if split == "train" else "test"
    return [SimpleSpelling(size=s["simple_spelling"], split=task_split), SpellingBee(size=s["spelling_bee"], split=task_split)]


def _offline_chat(s, split):
    """The offline tasks shared by mid-training and SFT."""
    task_split = "train" if split == "train" else "test"
    return [
        DefineWord(split=task_split, size=s["define_word"]),
        DefinitionMC(split=task_split, size=s["definition_mc"]),
        Arithmetic(split=task_split, size=s["arithmetic"]),
    ] + _spelling(s, split)


def mid_mixture(data, split, sizes=None, identity=None, seed=42):
    """The mid-training data: a TaskMixture for data "online"/"offline" and split "train"/"val".

    online train: SmolTalk, MMLU auxiliary_train, GSM8K, identity (twice), SimpleSpelling,
    SpellingBee; online val: SmolTalk test, MMLU test, GSM8K test. offline: DefineWord,
    DefinitionMC, Arithmetic, SimpleSpelling, SpellingBee (+ identity twice in train).
    identity: path of the identity JSONL; default: $NANOCHAT_BASE_DIR/identity_conversations.jsonl,
    generated with the defaults (tasks/identity.py) when missing.

    Raises:
        ValueError: unknown data, split or sizes key.
        FileNotFoundError: (train) no identity conversations at the `identity` path given.
        HubUnavailableError: (online) the Hub is unreachable.
    """
    _check(data, split)
    s = _sizes(MID_SIZES, data, split, sizes)
    if data == "online" and split == "train":
        tasks = [SmolTalk("train", stop=s["smoltalk"]), MMLU("auxiliary_train", "train", stop=s["mmlu"]),
                 GSM8K("train", stop=s["gsm8k"])] + _spelling(s, split)
    elif data == "online":
        tasks = [SmolTalk("test", stop=s["smoltalk"]), MMLU("all", "test", stop=s["mmlu"]), GSM8K("test", stop=s["gsm8k"])]
    else:
        tasks = _offline_chat(s, split)
    if split == "train":
        who = _identity(identity)
        tasks += [who, who]  # listed twice: a small file, seen twice per epoch
    return TaskMixture(tasks, seed=seed)


def sft_mixture(data, split, sizes=None, identity=None, seed=42):
    """The SFT data: a TaskMixture for data "online"/"offline" and split "train"/"val".

    online train: ARC-Easy, ARC-Challenge, GSM8K, SmolTalk (10K), identity, SimpleSpelling,
    SpellingBee; online val: SmolTalk test. offline: DefineWord, DefinitionMC, Arithmetic,
    SimpleSpelling, SpellingBee (+ identity in train).

    Raises: as mid_mixture.
    """
    _check(data, split)
    s = _sizes(SFT_SIZES, data, split, sizes)
    if data == "online" and split == "train":
        tasks = [ARC("ARC-Easy", "train", stop=s["arc_easy"]), ARC("ARC-Challenge", "train", stop=s["arc_challenge"]),
                 GSM8K("train", stop=s["gsm8k"]), SmolTalk("train", stop=s["smoltalk"])] + _spelling(s, split)
    elif data == "online":
        tasks = [SmolTalk("test", stop=s["smoltalk"])]
    else:
        tasks = _offline_chat(s, split)
    if split == "train":
        tasks.append(_identity(identity))
    return TaskMixture(tasks, seed=seed)


def rl_task(data, split, size=None):
    """The RL task: GSM8K online, Arithmetic offline; split "train" or "val" (the test split).

    size: number of problems (None: all of GSM8K's split, RL_SIZES offline).

    Raises:
        ValueError: unknown data or split.
        HubUnavailableError: (online) the Hub is unreachable.
    """
    _check(data, split)
    task_split = "train" if split == "train" else "test"
    if data == "online":
        return GSM8K(task_split, stop=size)
    return Arithmetic(task_split, size=RL_SIZES[(data, split)] if size is None else size)


@dataclass(frozen=True)
class EvalTask:
    """One chat_eval task: build() -> Task, the score of random guessing, whether it needs the Hub."""
    build: Callable
    baseline: float
    needs_hub: bool


EVAL_TASKS = {
    "ARC-Easy": EvalTask(lambda: ARC("ARC-Easy", "test"), 0.25, True),
    "ARC-Challenge": EvalTask(lambda: ARC("ARC-Challenge", "test"), 0.25, True),
    "MMLU": EvalTask(lambda: MMLU("all", "test"), 0.25, True),
    "GSM8K": EvalTask(lambda: GSM8K("test"), 0.0, True),
    "HumanEval": EvalTask(lambda: HumanEval(), 0.0, False),
    "SpellingBee": EvalTask(lambda: SpellingBee(size=256, split="test"), 0.0, False),
    "DefinitionMC": EvalTask(lambda: DefinitionMC(split="test", size=1000), 0.25, False),
    "Arithmetic": EvalTask(lambda: Arithmetic(split="test", size=500), 0.0, False),
}


def eval_task_names(data):
    """The EVAL_TASKS to run by default for data "online" (nanochat's six) or "offline"
    (those that need no Hub). Raises ValueError for other values of `data`."""
    if data == "online":
        return ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
    if data == "offline":
        return [name for name, task in EVAL_TASKS.items() if not task.needs_hub]
    raise ValueError(f"data must be 'online' or 'offline', got {data!r}")
