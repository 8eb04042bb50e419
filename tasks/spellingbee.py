"""
Spelling tasks generated from the system word list, which teach a small model what letters its
tokens are made of: SimpleSpelling (spell a word) and SpellingBee (count a letter in a word,
spelling it out and then checking with the python tool).

Not for: vocabulary or definitions (tasks/dictionary.py).

Data: /usr/share/dict/words from Debian's `wamerican` package (SCOWL-derived American English
word list, https://wordlist.aspell.net/, permissive SCOWL license); only the words made of
lowercase ascii letters are used. Words are split ~90/10 into train/test by a hash of the word,
so a test word is never trained on. Example i of a split is drawn by an RNG seeded with
(task, split, i), so the same index always gives the same conversation.
"""

import functools
import os
import random
import string

from tasks.common import Task, assistant_text, final_answers_match, in_test_split

WORDS_PATH = "/usr/share/dict/words"
SPLITS = ("train", "test")


@functools.lru_cache(maxsize=None)
def load_words(split, path=WORDS_PATH):
    """The lowercase ascii words (2+ letters) of the word list in `split`, sorted -> tuple of str.

    Raises:
        FileNotFoundError: no word list at `path` (install it: apt-get install wamerican).
        ValueError: an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no word list at {path}; install one with `sudo apt-get install wamerican`")
    with open(path, encoding="utf-8", errors="replace") as f:
        words = {w.strip() for w in f}
    words = (w for w in words if len(w) >= 2 and w.isascii() and w.isalpha() and w.islower())
    return tuple(sorted(w for w in words if in_test_split(w) == (split == "test")))


def spell(word):
    """'cat' -> 'c, a, t'."""
    return ", ".join(word)


class _WordTask(Task):
    """A generated task of `size` examples over the words of one split."""

    def __init__(self, size=1000, split="train", words_path=WORDS_PATH, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be an int >= 0, got {size!r}")
        self.size, self.split = size, split
        self.words = load_words(split, words_path)

    def num_examples(self):
        return self.size

    def _rng(self, index):
        return random.Random(f"{type(self).__name__}-{self.split}-{index}")


_SPELL_QUESTIONS = (
    "Spell the word {word}.",
    "How do you spell \"{word}\"?",
    "Spell out {word} letter by letter.",
    "spell {word}",
    "Can you spell '{word}' for me?",
    "What are the letters in the word {word}?",
)


class SimpleSpelling(_WordTask):
    """"Spell the word W" -> "W: w, o, r, d". Generative; graded by exact match."""

    def get_example(self, index):
        rng = self._rng(index)
        word = rng.choice(self.words)
        question = rng.choice(_SPELL_QUESTIONS).format(word=word)
        return {"messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"{word}: {spell(word)}"},
        ]}

    def evaluate(self, conversation, completion):
        """True if `completion` is the reference spelling (surrounding whitespace ignored)."""
        return completion.strip() == assistant_text(conversation)


_COUNT_QUESTIONS = (
    "How many {letter} are in the word {word}?",
    "How many times does the letter {letter} appear in \"{word}\"?",
    "Count the letter {letter} in {word}.",
    "how many {letter}s in {word}",
    "In the word '{word}', how many times do you see the letter {letter}?",
    "Can you tell me how many {letter}'s there are in {word}?",
    "What is the number of {letter} letters in the word \"{word}\"?",
)


class SpellingBee(_WordTask):
    """"How many R in strawberry?": the assistant spells the word keeping a running count of
    the letter, checks with the python tool ('strawberry'.count('r')), and ends with "#### 3".

    Generative; graded by the number after "####". The letter is one of the word's letters
    most of the time, and any letter (often absent, answer 0) otherwise.
    """

    def get_example(self, index):
        rng = self._rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice(string.ascii_lowercase)
        shown = rng.choice((letter, letter.upper(), f"'{letter}'", f'"{letter}"'))
        question = rng.choice(_COUNT_QUESTIONS).format(letter=shown, word=word)
        count, spelled = 0, []
        for c in word:
            if c == letter:
                count += 1
                spelled.append(f"{c} ({count})")
            else:
                spelled.append(c)
        times = "time" if count == 1 else "times"
        return {"messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": [
                {"type": "text", "text": f"Spelling \"{word}\" and counting each '{letter}': {', '.join(spelled)}. "
                                         f"That is {count}. Let me check with Python.\n\n"},
                {"type": "python", "text": f"'{word}'.count('{letter}')"},
                {"type": "python_output", "text": str(count)},
                {"type": "text", "text": f"\n\nThe letter '{letter}' appears {count} {times} in \"{word}\".\n\n#### {count}"},
            ]},
        ]}

    def evaluate(self, conversation, completion):
        """True if the number after "####" in `completion` is the right count."""
        return final_answers_match(assistant_text(conversation), completion)
