"""
The Task abstraction shared by every dataset in tasks/: an indexable, sliceable list of
conversations that knows how to grade a model's reply; TaskMixture and TaskSequence to combine
tasks into training sets; the multiple-choice prompt format; the "#### N" final-answer parser;
and the guarded Hugging Face Hub loader that turns "no network" into HubUnavailableError.

Not for: tokenizing (nanochat/tokenizer.py renders conversations), sampling replies
(nanochat/engine.py) or choosing which tasks a stage trains on (tasks/mixtures.py).

A conversation is the tokenizer's format, {"messages": [{"role": ..., "content": ...}, ...]},
sometimes with extra keys a task's evaluate() needs (e.g. "letters" for multiple choice).
"""

import bisect
import hashlib
import operator
import os
import random
import re

from nanochat.common import hub_reachable


class HubUnavailableError(RuntimeError):
    """The Hugging Face Hub could not be reached to download a dataset."""


# -----------------------------------------------------------------------------
# Tasks and their combinations

class Task:
    """Base class: examples 0..num_examples()-1 of a dataset, seen through a start/stop/step slice.

    Subclasses implement num_examples(), get_example(index) -> conversation dict and
    evaluate(conversation, completion) -> bool, and set eval_type:
      "categorical": the reply is one of the letters in conversation["letters"], and an
                     evaluator may compare the logits of those letter tokens;
      "generative":  the reply is sampled text that evaluate() grades.
    task[i] is example start + i * step; len(task) counts the examples in the slice.
    """

    eval_type = "generative"

    def __init__(self, start=0, stop=None, step=1):
        """Raises ValueError for a negative start, a stop before start, or a step below 1."""
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        if stop is not None and (not isinstance(stop, int) or stop < start):
            raise ValueError(f"stop must be None or an int >= start ({start}), got {stop!r}")
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an int >= 1, got {step!r}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        """Number of examples in the whole underlying dataset, before slicing."""
        raise NotImplementedError(f"{type(self).__name__} must implement num_examples()")

    def get_example(self, index):
        """The conversation at `index` of the whole underlying dataset."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_example()")

    def evaluate(self, conversation, completion):
        """Grade `completion` (the model's reply, a str) against `conversation` -> bool."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate()")

    def reward(self, conversation, completion):
        """evaluate() as a float in {0.0, 1.0}, the reward an RL loop maximises."""
        return float(self.evaluate(conversation, completion))

    def _slice(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return range(self.start, stop, self.step)

    def __len__(self):
        return len(self._slice())

    def __getitem__(self, i):
        """The i-th conversation of the slice; IndexError outside 0..len-1 (ends iteration)."""
        indices = self._slice()
        i = operator.index(i)  # numpy and torch integers index too
        if not 0 <= i < len(indices):
            raise IndexError(f"{type(self).__name__} index {i!r} out of range 0..{len(indices) - 1}")
        return self.get_example(indices[i])


class TaskMixture:
    """All examples of several tasks in one deterministic shuffled order.

    Every (task, example) pair appears exactly once; the same seed gives the same order. A task
    listed twice is seen twice per epoch, which is how a small dataset is oversampled.
    """

    def __init__(self, tasks, seed=42):
        self.tasks = list(tasks)
        self.index_map = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index_map)

    def __len__(self):
        return len(self.index_map)

    def __getitem__(self, i):
        t, j = self.index_map[i]
        return self.tasks[t][j]


class TaskSequence:
    """Several tasks one after the other, in order (for curricula and for evaluation)."""

    def __init__(self, tasks):
        self.tasks = list(tasks)
        self.offsets = []  # offsets[t] = index of task t's first example
        total = 0
        for task in self.tasks:
            self.offsets.append(total)
            total += len(task)
        self.total = total

    def __len__(self):
        return self.total

    def __getitem__(self, i):
        i = operator.index(i)
        if not 0 <= i < self.total:
            raise IndexError(f"TaskSequence index {i!r} out of range 0..{self.total - 1}")
        # the last task starting at or before i (an empty task shares its offset with the next)
        t = bisect.bisect_right(self.offsets, i) - 1
        return self.tasks[t][i - self.offsets[t]]


# -----------------------------------------------------------------------------
# Formats shared by several tasks

def render_mc(question, letters, choices):
    """The user message of a multiple-choice question; the expected reply is one letter.

    Each choice is written before its letter ("- Paris=B") so that the letter is the last
    thing the model reads about each option, and the answer is a single letter token.
    """
    assert len(letters) == len(choices), "one letter per choice"
    lines = [f"Multiple choice question: {question}", ""]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    lines += ["", "Answer with the letter of the correct choice only."]
    return "\n".join(lines)


_FINAL_ANSWER_RE = re.compile(r"####\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def extract_final_answer(text):
    """The number after the first "####" in `text`, commas removed, as a str; None if absent."""
    match = _FINAL_ANSWER_RE.search(text)
    return None if match is None else match.group(1).replace(",", "")


def final_answers_match(reference, completion):
    """True if `completion` ends with "#### N" and N equals the reference's "#### N" numerically."""
    ref, pred = extract_final_answer(reference), extract_final_answer(completion)
    return ref is not None and pred is not None and float(ref) == float(pred)


def assistant_text(conversation):
    """The last assistant message of a conversation as plain text (all its parts joined)."""
    content = conversation["messages"][-1]["content"]
    assert conversation["messages"][-1]["role"] == "assistant", "the conversation must end with the assistant"
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def in_test_split(key):
    """True for the ~10% of keys (e.g. words), chosen by md5 of the key, held out for "test".

    A hash, not an RNG, so the split never changes with the list the key came from.
    """
    return int(hashlib.md5(key.encode("utf-8")).hexdigest()[:8], 16) % 10 == 0


# -----------------------------------------------------------------------------
# The Hugging Face Hub


def load_hub_dataset(path, name=None, split="train", data_files=None):
    """Load one split of a Hub dataset with `datasets.load_dataset`, or rows from local files.

    data_files: a path (or list of paths) to JSON Lines files with the Hub dataset's columns;
    when given, the Hub is not contacted (used by tests, and by anyone with a local copy).
    Otherwise the Hub is probed first (a few seconds, instead of datasets' minute of retries)
    unless HF_DATASETS_OFFLINE=1 asks for the local cache.

    Raises:
        HubUnavailableError: the Hub cannot be reached and the dataset is not cached.
    """
    from datasets import load_dataset  # imported here: importing datasets costs seconds

    if data_files is not None:
        return load_dataset("json", data_files=data_files, split="train")
    what = f"{path}" + (f" ({name})" if name else "") + f", split {split}"
    fix = (f"the Hugging Face Hub is unreachable, so dataset {what} cannot be downloaded. "
           "Run with --data offline to train and evaluate on the offline tasks instead, or, if you "
           "downloaded it before, set HF_DATASETS_OFFLINE=1 to use the local cache.")
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not offline and not hub_reachable():
        raise HubUnavailableError(fix)
    try:
        return load_dataset(path, name, split=split)
    except ConnectionError as e:
        raise HubUnavailableError(f"{fix} ({e})") from e
