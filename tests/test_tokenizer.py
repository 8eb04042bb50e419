"""Tests for nanochat/tokenizer.py and the tok_train / tok_eval recipes, on a tiny trained tokenizer."""

import os
import pickle
import random
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, get_token_bytes, get_tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 512


def make_corpus(n_docs, seed=0):
    """Deterministic documents mixing English, code, digits and multi-byte scripts.

    Many different Hangul/CJK characters share their leading UTF-8 bytes, so BPE learns merges
    that hold only part of a character: the case token_bytes must get right.
    """
    rng = random.Random(seed)
    words = ["the", "model", "token", "hello", "world", "über", "café", "naïve", "def", "return",
             "x = 1", "print(x)", "3.14159", "2025", "안녕하세요", "감사합니다", "학교", "你好", "世界",
             "中文", "数据", "🙂", "€100", "日本語"]
    hangul = [chr(c) for c in range(0xAC00, 0xAC00 + 400, 7)]
    docs = []
    for _ in range(n_docs):
        parts = [rng.choice(words) if rng.random() < 0.7 else "".join(rng.choices(hangul, k=rng.randint(1, 4)))
                 for _ in range(rng.randint(20, 60))]
        docs.append(" ".join(parts) + ".\n")
    return docs


@pytest.fixture(scope="module")
def tokenizer():
    return RustBPETokenizer.train_from_iterator(iter(make_corpus(400)), VOCAB_SIZE)


def sp(tokenizer, name):
    return tokenizer.encode_special(name)


# -----------------------------------------------------------------------------
# Vocabulary and encoding

def test_vocab_layout(tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    assert tokenizer.get_special_tokens() == SPECIAL_TOKENS
    # specials come last, in their listed order
    assert [sp(tokenizer, s) for s in SPECIAL_TOKENS] == list(range(VOCAB_SIZE - len(SPECIAL_TOKENS), VOCAB_SIZE))
    assert tokenizer.get_bos_token_id() == sp(tokenizer, "<|bos|>")


def test_vocab_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match=r"at least 265.*--vocab-size"):
        RustBPETokenizer.train_from_iterator(iter(["hello"]), 260)


def test_special_tokens_encode_and_decode(tokenizer):
    for name in SPECIAL_TOKENS:
        token_id = sp(tokenizer, name)
        assert tokenizer.decode([token_id]) == name
        assert tokenizer.id_to_token(token_id) == name
    with pytest.raises(ValueError, match="not a special token"):
        tokenizer.encode_special("hello")


def test_round_trip(tokenizer):
    text = "Hello world! 안녕하세요 你好 🙂 über\n\tdef f(x): return 12345"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_list_equals_encode_each(tokenizer):
    texts = ["hello world", "", "안녕하세요 학교", "print(x) 3.14159"]
    assert tokenizer.encode(texts) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode(texts, num_threads=1) == tokenizer.encode(texts)


def test_prepend_and_append(tokenizer):
    bos, end = sp(tokenizer, "<|bos|>"), sp(tokenizer, "<|assistant_end|>")
    plain = tokenizer.encode("hello world")
    assert tokenizer.encode("hello world", prepend="<|bos|>") == [bos] + plain
    assert tokenizer.encode("hello world", prepend=bos, append=end) == [bos] + plain + [end]
    assert tokenizer.encode(["hello world", "the"], prepend="<|bos|>") == [[bos] + plain, [bos] + tokenizer.encode("the")]
    with pytest.raises(ValueError, match="not a special token"):
        tokenizer.encode("hi", prepend="<|nope|>")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.encode("hi", append=VOCAB_SIZE)


def test_encode_rejects_other_types(tokenizer):
    with pytest.raises(ValueError, match="str or a list of str"):
        tokenizer.encode(b"bytes")
    with pytest.raises(ValueError, match="str or a list of str"):
        tokenizer.encode(["ok", 3])


def test_special_token_strings_in_text_are_ordinary_text(tokenizer):
    specials = {sp(tokenizer, s) for s in SPECIAL_TOKENS}
    for text in ["<|bos|>", "a user typed <|bos|> and <|assistant_end|> here", "<|endoftext|>"]:
        ids = tokenizer.encode(text)
        assert not specials & set(ids)
        assert tokenizer.decode(ids) == text
    for ids in tokenizer.encode(["<|bos|>", "<|python_start|>x"]):
        assert not specials & set(ids)


# -----------------------------------------------------------------------------
# token_bytes

def test_token_bytes_are_raw_byte_lengths(tokenizer):
    token_bytes = tokenizer.compute_token_bytes()
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB_SIZE,)
    n_regular = VOCAB_SIZE - len(SPECIAL_TOKENS)
    raw = [tokenizer.enc.decode_single_token_bytes(i) for i in range(n_regular)]
    assert token_bytes[:n_regular].tolist() == [len(b) for b in raw]
    assert token_bytes[n_regular:].tolist() == [0] * len(SPECIAL_TOKENS)

    def is_utf8(b):
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False
    # the corpus makes BPE learn merges holding part of a character; decode->encode would count those wrong
    partial = [b for b in raw[256:] if not is_utf8(b)]
    assert partial, "the corpus should produce merges that split a UTF-8 character"
    assert any(len(b) != len(b.decode("utf-8", errors="replace").encode("utf-8")) for b in partial)


# -----------------------------------------------------------------------------
# The chat format

def tool_conversation():
    return {"messages": [
        {"role": "user", "content": "what is 2+3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "let me compute"},
            {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"},
            {"type": "text", "text": "it is 5"},
        ]},
        {"role": "user", "content": "thanks"},
        {"role": "assistant", "content": "you are welcome"},
    ]}


def test_render_conversation_ids_and_mask(tokenizer):
    enc = tokenizer.encode
    s = lambda name: [sp(tokenizer, name)]  # noqa: E731
    # (tokens, mask value) in the order they must appear
    expected = [
        (s("<|bos|>"), 0),
        (s("<|user_start|>") + enc("what is 2+3?") + s("<|user_end|>"), 0),
        (s("<|assistant_start|>"), 0),
        (enc("let me compute"), 1),
        (s("<|python_start|>") + enc("2+3") + s("<|python_end|>"), 1),
        (s("<|output_start|>") + enc("5") + s("<|output_end|>"), 0),
        (enc("it is 5"), 1),
        (s("<|assistant_end|>"), 1),
        (s("<|user_start|>") + enc("thanks") + s("<|user_end|>"), 0),
        (s("<|assistant_start|>"), 0),
        (enc("you are welcome"), 1),
        (s("<|assistant_end|>"), 1),
    ]
    ids, mask = tokenizer.render_conversation(tool_conversation())
    assert ids == [t for tokens, _ in expected for t in tokens]
    assert mask == [m for tokens, m in expected for _ in tokens]
    # the exact trained-on positions, spelled out
    trained = [i for i, m in enumerate(mask) if m]
    start = 1 + len(expected[1][0]) + 1
    first = list(range(start, start + len(expected[3][0]) + len(expected[4][0])))
    after_output = start + len(expected[3][0]) + len(expected[4][0]) + len(expected[5][0])
    first += list(range(after_output, after_output + len(expected[6][0]) + 1))
    second_start = len(ids) - 1 - len(expected[10][0])
    assert trained == first + list(range(second_start, len(ids)))
    assert ids[trained[-1]] == sp(tokenizer, "<|assistant_end|>")


def test_system_message_is_merged_into_first_user_message(tokenizer):
    with_system = {"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
    ]}
    merged = {"messages": [
        {"role": "user", "content": "be brief\n\nhello"},
        {"role": "assistant", "content": "hi"},
    ]}
    assert tokenizer.render_conversation(with_system) == tokenizer.render_conversation(merged)


def test_content_as_list_of_text_parts(tokenizer):
    parts = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
    ]}
    plain = {"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hi"}]}
    assert tokenizer.render_conversation(parts) == tokenizer.render_conversation(plain)


@pytest.mark.parametrize("conversation, message", [
    ({}, "'messages' key"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, r"messages\[0\].*should be from the user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     r"messages\[1\].*should be from the assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     r"messages\[1\].*only the first"),
    ({"messages": [{"role": "system", "content": "s"}]}, "no user message follows"),
    ({"messages": [{"role": "user", "content": ""}]}, r"messages\[0\] has empty content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": []}]},
     r"messages\[1\] has empty content"),
    ({"messages": [{"role": "robot", "content": "a"}]}, r"messages\[0\] has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]},
     r"messages\[1\] part 0 has unknown type 'image'"),
    ({"messages": [{"role": "user", "content": [{"type": "python", "text": "1+1"}]}]},
     r"messages\[0\] part 0 has unknown type 'python'"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be a dict with keys 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, r"messages\[0\] part 0 must be a dict"),
    ({"messages": [{"role": "user", "content": 42}]}, r"messages\[0\] content must be a str or a list"),
])
def test_malformed_conversations_raise(tokenizer, conversation, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.render_conversation(conversation)
    with pytest.raises(ValueError, match=message):
        tokenizer.render_for_completion(conversation)


def test_truncation(tokenizer):
    ids, mask = tokenizer.render_conversation(tool_conversation())
    short_ids, short_mask = tokenizer.render_conversation(tool_conversation(), max_tokens=7)
    assert short_ids == ids[:7] and short_mask == mask[:7]


def test_render_for_completion(tokenizer):
    assistant_start = sp(tokenizer, "<|assistant_start|>")
    conversation = tool_conversation()
    prompt = tokenizer.render_for_completion(conversation)
    assert prompt[-1] == assistant_start
    # the final assistant reply is dropped: the prompt is the rendering up to that reply's start
    ids, _ = tokenizer.render_conversation(conversation)
    assert prompt == ids[:len(prompt)]
    assert ids[len(prompt):][-1] == sp(tokenizer, "<|assistant_end|>")
    # ending on a user message: nothing is dropped
    ends_with_user = {"messages": conversation["messages"][:3]}
    ids_user, _ = tokenizer.render_conversation(ends_with_user)
    assert tokenizer.render_for_completion(ends_with_user) == ids_user + [assistant_start]
    assert conversation == tool_conversation()  # the caller's conversation is not modified


def test_visualize_tokenization(tokenizer):
    ids, mask = tokenizer.render_conversation(tool_conversation())
    shown = tokenizer.visualize_tokenization(ids, mask)
    assert "<|python_start|>" in shown and "\033[92m" in shown and "\033[91m" in shown


# -----------------------------------------------------------------------------
# Saving and loading

def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["token_bytes.pt", "tokenizer.pkl"]  # no temp files left behind
    loaded = RustBPETokenizer.from_directory(str(tmp_path))
    texts = make_corpus(20, seed=1) + ["<|bos|> typed by a user", ""]
    assert loaded.encode(texts) == tokenizer.encode(texts)
    assert loaded.content_hash() == tokenizer.content_hash()
    assert loaded.get_vocab_size() == tokenizer.get_vocab_size()
    conversation = tool_conversation()
    assert loaded.render_conversation(conversation) == tokenizer.render_conversation(conversation)
    assert torch.equal(torch.load(tmp_path / "token_bytes.pt"), tokenizer.compute_token_bytes())


def test_content_hash_tells_tokenizers_apart(tokenizer):
    other = RustBPETokenizer.train_from_iterator(iter(make_corpus(400)), VOCAB_SIZE - 1)
    assert len(tokenizer.content_hash()) == 64
    assert other.content_hash() != tokenizer.content_hash()


def test_tokenizer_file_must_be_plain_data(tmp_path):
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump({"pattern": "x", "mergeable_ranks": [], "special_tokens": SPECIAL_TOKENS, "x": os.getcwd}, f)
    with pytest.raises(ValueError, match="not a nanochat tokenizer file"):
        RustBPETokenizer.from_directory(str(tmp_path))


def test_get_tokenizer_and_token_bytes(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no tokenizer at .*tokenizer\.pkl; run `python -m scripts\.tok_train` first"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match=r"run `python -m scripts\.tok_train` first"):
        get_token_bytes()
    tokenizer.save(str(tmp_path / "tokenizer"))
    assert get_tokenizer().content_hash() == tokenizer.content_hash()
    assert torch.equal(get_token_bytes("cpu"), tokenizer.compute_token_bytes())


# -----------------------------------------------------------------------------
# The recipes, end to end on tiny shards

def write_shards(base_dir, n_shards=3, docs_per_shard=300):
    data_dir = os.path.join(base_dir, "base_data")
    os.makedirs(data_dir, exist_ok=True)
    for i in range(n_shards):
        docs = make_corpus(docs_per_shard, seed=100 + i)
        table = pa.table({"text": docs})
        pq.write_table(table, os.path.join(data_dir, f"shard_{i:05d}.parquet"), row_group_size=100)


def run_script(module, base_dir, *flags):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir))
    return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_tok_train_and_tok_eval_scripts(tmp_path):
    write_shards(str(tmp_path))
    result = run_script("scripts.tok_train", tmp_path, "--vocab-size", "512", "--max_chars", "100000")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vocab size:" in result.stdout and "characters read:" in result.stdout
    tokenizer_dir = tmp_path / "tokenizer"
    loaded = RustBPETokenizer.from_directory(str(tokenizer_dir))
    assert loaded.get_vocab_size() == 512
    token_bytes = torch.load(tokenizer_dir / "token_bytes.pt")
    assert torch.equal(token_bytes, loaded.compute_token_bytes())

    result = run_script("scripts.tok_eval", tmp_path, "--num-docs", "50")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| text | bytes | ours tokens | ours bytes/tok |" in result.stdout
    for kind in ["news", "code", "math", "german", "korean", "chinese", "fwe-val", "fwe-train"]:
        assert f"| {kind} |" in result.stdout
    report = (tmp_path / "report" / "tokenizer-evaluation.md").read_text()
    assert "| fwe-val |" in report and "GPT-4 bytes/tok" in report


@pytest.mark.slow
def test_tok_train_without_shards_is_a_clear_error(tmp_path):
    result = run_script("scripts.tok_train", tmp_path, "--vocab-size", "512")
    assert result.returncode != 0
    assert "python -m nanochat.dataset --offline" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_tok_eval_without_tokenizer_is_a_clear_error(tmp_path):
    result = run_script("scripts.tok_eval", tmp_path)
    assert result.returncode != 0
    assert "run `python -m scripts.tok_train` first" in result.stderr
    assert "Traceback" not in result.stderr


def test_upstream_tiktoken_pickle_loads_as_data(tokenizer, tmp_path):
    """Published nanochat checkpoints ship tokenizer.pkl as a pickled tiktoken.Encoding: it loads
    (the same ids as ours), without running tiktoken's code or anything else in the pickle."""
    import tiktoken
    upstream = tiktoken.Encoding(name="rustbpe", pat_str=tokenizer.pattern, mergeable_ranks=tokenizer.mergeable_ranks,
                                 special_tokens=tokenizer.special_tokens)
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(upstream, f)
    loaded = RustBPETokenizer.from_directory(str(tmp_path))
    assert loaded.content_hash() == tokenizer.content_hash()
    text = "Hello world, 12345 <|bos|> tokens!"
    assert loaded.encode(text, prepend="<|bos|>") == tokenizer.encode(text, prepend="<|bos|>")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(ValueError, match=r"references (posix|os)\.system"):
        RustBPETokenizer.from_directory(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_a_tiktoken_pickle_of_another_tokenizer_is_refused(tmp_path):
    import tiktoken
    other = tiktoken.Encoding(name="x", pat_str=r"\w+", mergeable_ranks={bytes([i]): i for i in range(256)},
                              special_tokens={"<|endoftext|>": 256})
    with open(tmp_path / "tokenizer.pkl", "wb") as f:
        pickle.dump(other, f)
    with pytest.raises(ValueError, match="not nanochat's"):
        RustBPETokenizer.from_directory(str(tmp_path))
