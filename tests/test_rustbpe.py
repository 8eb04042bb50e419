"""Tests for the rustbpe extension: training matches a slow pure-Python BPE, encoding round
trips, and user mistakes raise Python exceptions instead of crashing the interpreter."""

import ast
import os
import subprocess
import sys
from collections import Counter

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

import rustbpe

# The default split pattern: GPT-4's, with numbers in groups of 1-2 digits.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s+"""
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog didn't care; it's 12:45 and 2025 is here.\n",
    "We'll see, THEY'RE sure you've 1234567 apples and 89 pears!!\n\n    def f(x):\r\n        return x ** 2\n",
    "Ünïcödé wörds, naïve café, Σίσυφος, 東京タワー 東京 東京, emoji 😀😀 and    spaces\t\ttabs.\n",
    "the the the then there these those thesis theme ",
] * 3


def reference_bpe(texts, vocab_size, pattern=SPLIT_PATTERN):
    """Textbook BPE: recount all pairs before every merge; ties go to the smallest pair."""
    chunk_counts = Counter(m for text in texts for m in regex.findall(pattern, text))
    words = [(list(chunk.encode("utf-8")), n) for chunk, n in chunk_counts.items()]
    tokens = [bytes([b]) for b in range(256)]
    while len(tokens) < vocab_size:
        pairs = Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        new_id = len(tokens)
        tokens.append(tokens[best[0]] + tokens[best[1]])
        for ids, _ in words:
            i = 0
            while i < len(ids) - 1:
                if (ids[i], ids[i + 1]) == best:
                    ids[i : i + 2] = [new_id]
                i += 1
    return [(token, rank) for rank, token in enumerate(tokens)]


def train(texts, vocab_size, **kwargs):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tok


def decode(tok, ids):
    vocab = [token for token, _ in tok.get_mergeable_ranks()]
    return b"".join(vocab[i] for i in ids).decode("utf-8")


@pytest.fixture(scope="module")
def multilingual():
    """A tokenizer with merges inside multi-byte characters: many distinct CJK characters (3 bytes)
    and emoji (4 bytes) make their shared leading bytes the frequent pairs."""
    cjk = "".join(chr(0x4E00 + 3 * i) for i in range(300))
    emoji = "".join(chr(0x1F600 + 2 * i) for i in range(30))
    texts = [cjk, emoji, "東京タワー 東京 京都 ÄÖÜ äöü " * 20] + CORPUS
    return train(texts, 400)


def test_training_matches_reference_bpe():
    for vocab_size in (256, 300, 420):
        ranks = train(CORPUS, vocab_size).get_mergeable_ranks()
        assert ranks == reference_bpe(CORPUS, vocab_size)
    assert len(ranks) == 420


def test_custom_pattern_matches_reference_bpe():
    pattern = r"\w+|\s+|[^\w\s]+"
    tok = train(CORPUS, 350, pattern=pattern)
    assert tok.get_mergeable_ranks() == reference_bpe(CORPUS, 350, pattern=pattern)
    assert tok.get_pattern() == pattern


def test_custom_pattern_decides_what_can_merge():
    # One chunk per character: nothing to merge, so training stops at the 256 bytes.
    assert len(train(["hello hello hello"], 300, pattern=".").get_mergeable_ranks()) == 256
    # The whole text as one chunk: merges may cross spaces, which the default pattern forbids.
    tokens = [t for t, _ in train(["ab ab ab ab"], 260, pattern=r"[\s\S]+").get_mergeable_ranks()]
    assert any(b" " in t and len(t) > 1 and not t.startswith(b" ") for t in tokens)


def test_vocab_256_gives_exactly_the_byte_tokens():
    tok = train(CORPUS, 256)
    assert tok.get_mergeable_ranks() == [(bytes([b]), b) for b in range(256)]
    assert tok.vocab_size == 256
    assert tok.encode("hi") == [ord("h"), ord("i")]


def test_training_is_deterministic_and_independent_of_buffering():
    first = train(CORPUS, 400).get_mergeable_ranks()
    assert train(CORPUS, 400).get_mergeable_ranks() == first
    assert train(CORPUS, 400, buffer_size=1).get_mergeable_ranks() == first


def test_default_pattern_and_get_pattern():
    assert rustbpe.Tokenizer().get_pattern() == SPLIT_PATTERN
    assert train(CORPUS, 260).get_pattern() == SPLIT_PATTERN
    # Numbers split into groups of at most two digits, so no token holds three.
    tokens = [t for t, _ in train(["1234567 " * 50], 300).get_mergeable_ranks()]
    assert b"12" in tokens and not any(regex.search(rb"\d{3}", t) for t in tokens)


def test_mergeable_ranks_build_a_tiktoken_encoding():
    tiktoken = pytest.importorskip("tiktoken")
    tok = train(CORPUS, 400)
    enc = tiktoken.Encoding(
        name="test", pat_str=tok.get_pattern(), mergeable_ranks=dict(tok.get_mergeable_ranks()), special_tokens={}
    )
    text = "The quick brown fox didn't jump over 12345 dogs."
    assert enc.decode(enc.encode(text)) == text
    assert enc.encode(text) == tok.encode(text)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_encode_round_trips(multilingual, text):
    assert decode(multilingual, multilingual.encode(text)) == text


def test_round_trip_through_tokens_that_split_characters(multilingual):
    vocab = [token for token, _ in multilingual.get_mergeable_ranks()]

    def is_utf8(b):
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    # Characters absent from training: their leading bytes are one token, the rest another.
    text = "丁丂 😁😃 東京"
    ids = multilingual.encode(text)
    assert any(not is_utf8(vocab[i]) for i in ids), "no token splits a character"
    assert decode(multilingual, ids) == text


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(), max_size=10))
def test_batch_encode_equals_encode(multilingual, texts):
    assert multilingual.batch_encode(texts) == [multilingual.encode(t) for t in texts]


def test_decode_inverts_encode(multilingual):
    text = "東京 😀 naïve café"
    assert multilingual.decode(multilingual.encode(text)) == text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        multilingual.decode([10**6])


def test_bad_vocab_size_is_a_value_error():
    with pytest.raises(ValueError, match="vocab_size must be at least 256"):
        train(CORPUS, 255)
    with pytest.raises(ValueError, match="vocab_size"):
        train(CORPUS, -1)
    with pytest.raises(ValueError, match="at most 2\\^32"):
        train(CORPUS, 2**40)
    with pytest.raises(ValueError, match="buffer_size"):
        train(CORPUS, 300, buffer_size=0)


def test_huge_vocab_or_buffer_just_runs_out_of_pairs():
    tok = train(CORPUS, 2**32 - 1, buffer_size=2**40)
    assert tok.get_mergeable_ranks() == reference_bpe(CORPUS, 10**6)


def test_non_string_items_are_a_type_error():
    with pytest.raises(TypeError, match="iterator of str.*bytes"):
        train(["fine", b"not a str"], 300)
    with pytest.raises(TypeError, match="iterator of str.*int"):
        train(["fine", 3], 300)
    with pytest.raises(TypeError):
        rustbpe.Tokenizer().train_from_iterator(42, 300)


def test_invalid_pattern_is_a_value_error():
    with pytest.raises(ValueError, match="invalid split pattern"):
        train(CORPUS, 300, pattern="(unclosed")


def test_errors_raised_by_the_iterator_propagate():
    def texts():
        yield "some text"
        raise RuntimeError("storage went away")

    with pytest.raises(RuntimeError, match="storage went away"):
        rustbpe.Tokenizer().train_from_iterator(texts(), 300)


def test_encode_before_training_is_an_error():
    tok = rustbpe.Tokenizer()
    with pytest.raises(ValueError, match="not trained"):
        tok.encode("hello")
    with pytest.raises(ValueError, match="not trained"):
        tok.batch_encode(["hello"])


PYPI_RUSTBPE = os.environ.get("PYPI_RUSTBPE_PATH", "/tmp/pypi_rustbpe")


@pytest.mark.skipif(not os.path.isdir(os.path.join(PYPI_RUSTBPE, "rustbpe")), reason="PyPI rustbpe not unpacked")
def test_matches_pypi_rustbpe():
    # Both break ties the same way, so given the same pattern the merges must be identical.
    # The PyPI package runs in a subprocess: it is also called `rustbpe`.
    script = (
        "import sys, rustbpe\n"
        "tok = rustbpe.Tokenizer()\n"
        f"tok.train_from_iterator(iter({CORPUS!r}), 420, pattern={SPLIT_PATTERN!r})\n"
        "print(repr(tok.get_mergeable_ranks()))\n"
    )
    env = dict(os.environ, PYTHONPATH=PYPI_RUSTBPE)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    theirs = [(bytes(token), rank) for token, rank in ast.literal_eval(out.stdout)]
    assert train(CORPUS, 420).get_mergeable_ranks() == theirs
