"""
Dictionary tasks generated from WordNet, chat data that needs no network: DefineWord (what
does a word mean?) and DefinitionMC (pick a word's definition out of four, answered with a
letter), which teaches the multiple-choice answer format that MMLU and ARC are graded in.

Not for: spelling (tasks/spellingbee.py) or evaluating a model's knowledge of rare words
beyond these two formats.

Data: WordNet 3.0 from Debian's `wordnet-base` package, /usr/share/wordnet/{index,data}.{noun,
verb,adj,adv} (Princeton University, https://wordnet.princeton.edu/, WordNet 3.0 license:
free use with attribution). An index line lists a lemma's synsets most frequent first; a data
line holds a synset's words and its gloss after "| " (definition, then "; "-separated quoted
examples). Only lemmas made of lowercase ascii letters are used. Words are split ~90/10 into
train/test by a hash of the word (tasks.common.in_test_split), so test words are never trained on.
"""

import functools
import os
import random

from tasks.common import Task, in_test_split, render_mc

WORDNET_DIR = "/usr/share/wordnet"
POS_FILES = (("noun", "noun"), ("verb", "verb"), ("adjective", "adj"), ("adverb", "adv"))
MAX_SENSES = 3  # DefineWord lists at most this many meanings: the most frequent ones


def _definition(gloss):
    """'a bank; "he sat on the bank"' -> 'a bank' (the examples after the definition dropped)."""
    return gloss.split('; "')[0].strip().rstrip(";").strip()


@functools.lru_cache(maxsize=None)
def load_wordnet(wordnet_dir=WORDNET_DIR):
    """Read WordNet -> {word: ((part of speech, definition), ...)}, most frequent senses first.

    Parts of speech are "noun", "verb", "adjective", "adverb"; a word's parts of speech are
    ordered by how many of their senses were seen in WordNet's tagged corpus.

    Raises:
        FileNotFoundError: WordNet is not installed (apt-get install wordnet-base).
    """
    senses = {}
    for pos, suffix in POS_FILES:
        data_path, index_path = (os.path.join(wordnet_dir, f"{kind}.{suffix}") for kind in ("data", "index"))
        for path in (data_path, index_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"no WordNet file at {path}; install WordNet with `sudo apt-get install wordnet-base`")
        glosses = {}
        with open(data_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(" "):  # the license header
                    continue
                offset, _, gloss = line.partition(" | ")
                glosses[offset.split(" ", 1)[0]] = _definition(gloss)
        with open(index_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(" "):
                    continue
                fields = line.split()
                lemma, n_synsets, tagged = fields[0], int(fields[2]), int(fields[5 + int(fields[3])])
                if not (lemma.isascii() and lemma.isalpha() and lemma.islower()):
                    continue
                definitions = [glosses[offset] for offset in fields[-n_synsets:] if glosses.get(offset)]
                if definitions:
                    senses.setdefault(lemma, []).append((tagged, pos, definitions))
    return {
        word: tuple((pos, d) for _, pos, defs in sorted(groups, key=lambda g: -g[0]) for d in defs)
        for word, groups in senses.items()
    }


@functools.lru_cache(maxsize=None)
def split_words(split, wordnet_dir=WORDNET_DIR):
    """The words of one split ("train" or "test") in a fixed shuffled order -> tuple of str.

    Raises:
        ValueError: an unknown split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    words = sorted(w for w in load_wordnet(wordnet_dir) if in_test_split(w) == (split == "test"))
    random.Random(f"wordnet-{split}").shuffle(words)  # so that any slice mixes the whole alphabet
    return tuple(words)


class _DictionaryTask(Task):
    """Examples over the words of one split; size=None means one example per word."""

    def __init__(self, split="train", size=None, wordnet_dir=WORDNET_DIR, **kwargs):
        super().__init__(**kwargs)
        if size is not None and (not isinstance(size, int) or size < 0):
            raise ValueError(f"size must be None or an int >= 0, got {size!r}")
        self.split = split
        self.senses = load_wordnet(wordnet_dir)
        self.words = split_words(split, wordnet_dir)
        self.size = len(self.words) if size is None else size

    def num_examples(self):
        return self.size

    def _rng(self, index):
        return random.Random(f"{type(self).__name__}-{self.split}-{index}")


_DEFINE_QUESTIONS = (
    "What does \"{word}\" mean?",
    "Define {word}.",
    "What is the meaning of the word {word}?",
    "define: {word}",
    "Could you explain what '{word}' means?",
    "What's the definition of {word}?",
    "I came across the word \"{word}\". What does it mean?",
)


class DefineWord(_DictionaryTask):
    """The user asks what a word means; the assistant gives its (up to three) most frequent
    meanings with their parts of speech. Generative; graded by whether the reply contains
    the word's first definition."""

    def get_example(self, index):
        rng = self._rng(index)
        word = self.words[index % len(self.words)]
        senses = self.senses[word][:MAX_SENSES]
        if len(senses) == 1:
            pos, definition = senses[0]
            answer = rng.choice((
                f"\"{word}\" ({pos}): {definition}.",
                f"As a {pos}, \"{word}\" means {definition}.",
                f"{word} ({pos}) - {definition}.",
            ))
        else:
            intro = rng.choice((f"\"{word}\" has several meanings:", f"The word {word} can mean:", f"{word}:"))
            answer = "\n".join([intro] + [f"{k}. ({pos}) {d}." for k, (pos, d) in enumerate(senses, start=1)])
        return {"messages": [
            {"role": "user", "content": rng.choice(_DEFINE_QUESTIONS).format(word=word)},
            {"role": "assistant", "content": answer},
        ], "word": word}

    def evaluate(self, conversation, completion):
        """True if `completion` contains the word's first definition (case-insensitive)."""
        return self.senses[conversation["word"]][0][1].lower() in completion.lower()


LETTERS = ("A", "B", "C", "D")

_MC_QUESTIONS = (
    "Which of these is the meaning of \"{word}\"?",
    "What does the word {word} mean?",
    "Pick the correct definition of '{word}'.",
    "Which definition fits the word {word}?",
)


class DefinitionMC(_DictionaryTask):
    """Which of four definitions is the word's? The right one is its most frequent sense; the
    three others are other words' definitions with the same part of speech. Categorical,
    letters A-D, rendered with render_mc."""

    eval_type = "categorical"

    def __init__(self, split="train", size=None, wordnet_dir=WORDNET_DIR, **kwargs):
        super().__init__(split, size, wordnet_dir, **kwargs)
        self.words_by_pos = {}  # distractors come from words whose first sense has the same part of speech
        for w in self.words:
            self.words_by_pos.setdefault(self.senses[w][0][0], []).append(w)

    def get_example(self, index):
        rng = self._rng(index)
        word = self.words[index % len(self.words)]
        pos, definition = self.senses[word][0]
        own = {d for _, d in self.senses[word]}
        choices = [definition]
        while len(choices) < len(LETTERS):
            other = self.senses[rng.choice(self.words_by_pos[pos])][0][1]
            if other not in own and other not in choices:
                choices.append(other)
        rng.shuffle(choices)
        question = rng.choice(_MC_QUESTIONS).format(word=word)
        return {
            "messages": [
                {"role": "user", "content": render_mc(question, LETTERS, choices)},
                {"role": "assistant", "content": LETTERS[choices.index(definition)]},
            ],
            "letters": list(LETTERS),
            "word": word,
        }

    def evaluate(self, conversation, completion):
        """True if `completion` (the predicted letter) is the correct letter."""
        return completion.strip() == conversation["messages"][-1]["content"]
