"""
The BPE tokenizer: trained with our rustbpe extension, run with tiktoken (fast encoding), and
the chat format on top of it: special tokens and render_conversation() -> (ids, mask).

Not for: streaming documents into training batches (dataloader.py) or sampling replies and
running tools (engine.py). Training and evaluating a tokenizer on the corpus are the recipes
scripts/tok_train.py and scripts/tok_eval.py.

On disk, $NANOCHAT_BASE_DIR/tokenizer/ holds:
    tokenizer.pkl    plain data only: {"pattern": str, "mergeable_ranks": [(bytes, rank)],
                     "special_tokens": [str]}; loaded with an unpickler that refuses any class,
                     so opening a tokenizer file can never run code
    token_bytes.pt   int32 tensor (vocab_size,): raw byte length of every token, 0 for the
                     special tokens; turns a token-level loss into bits per byte
"""

import hashlib
import os
import pickle

import rustbpe
import tiktoken
import torch

from nanochat.common import atomic_write, get_base_dir

# -----------------------------------------------------------------------------
# The vocabulary's fixed parts

SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document, and every conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool...
    "<|python_end|>",
    "<|output_start|>",  # ...and the tool's output comes back between these
    "<|output_end|>",
]

# GPT-4's split pattern except numbers: \p{N}{1,2} instead of \p{N}{1,3}, because with a vocab
# of 64K (not 100K) the merges that 3-digit groups would spend are better spent on text.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

N_BYTE_TOKENS = 256  # byte-level BPE: ranks 0..255 are the single bytes, merges come after


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the state dict that
    Encoding.__getstate__ wrote (name, pat_str, mergeable_ranks, special_tokens) and runs nothing."""

    def __setstate__(self, state):
        self.state = state


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles builtins (dict, list, tuple, str, bytes, int) and, as plain data, the one class
    that published nanochat checkpoints pickle their tokenizer as, a tiktoken.Encoding (read into
    an _EncodingState: its state is data too). Any other class is refused, so a tokenizer.pkl
    downloaded from the internet cannot run code."""

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"tokenizer.pkl may only hold plain data, but it references {module}.{name}")


def _from_tiktoken_state(state, path):
    """The data of save()'s format from a pickled tiktoken.Encoding's state (upstream nanochat's
    tokenizer.pkl). Raises ValueError when it is not a nanochat tokenizer: a registered encoding
    pickled by name, other special tokens, or special ids that do not follow the merges."""
    if not isinstance(state, dict) or not {"pat_str", "mergeable_ranks", "special_tokens"} <= state.keys():
        raise ValueError(f"{path} holds a tiktoken encoding ({state!r:.60}) that is not a nanochat tokenizer")
    specials = sorted(state["special_tokens"].items(), key=lambda item: item[1])
    n = len(state["mergeable_ranks"])
    if [name for name, _ in specials] != SPECIAL_TOKENS or [i for _, i in specials] != list(range(n, n + len(specials))):
        raise ValueError(f"{path} is a tiktoken encoding with special tokens {dict(specials)}, not nanochat's "
                         f"{SPECIAL_TOKENS} right after the {n} merges")
    return {"pattern": state["pat_str"], "mergeable_ranks": state["mergeable_ranks"], "special_tokens": SPECIAL_TOKENS}


# -----------------------------------------------------------------------------
# The tokenizer

class RustBPETokenizer:
    """Byte-level BPE: merges learned by rustbpe, encoding and decoding done by tiktoken.

    Ids 0..255 are the bytes, then the merges in the order they were learned, then the
    SPECIAL_TOKENS in their listed order, so vocab_size = len(mergeable_ranks) + 9.
    """

    def __init__(self, mergeable_ranks, pattern=SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS):
        """Build from a {token bytes: rank} dict (ranks 0..n-1), a split regex and special tokens.

        Raises:
            ValueError: the ranks are not exactly 0..n-1, or the special tokens are not the
                chat format's (render_conversation needs every one of them).
        """
        ranks = sorted(mergeable_ranks.values())
        if ranks != list(range(len(ranks))):
            raise ValueError("mergeable_ranks must use every rank from 0 to n-1 exactly once")
        if list(special_tokens) != SPECIAL_TOKENS:
            raise ValueError(f"special tokens must be {SPECIAL_TOKENS}, got {list(special_tokens)}")
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(special_tokens)}
        self.enc = tiktoken.Encoding(
            name="rustbpe",
            pat_str=pattern,
            mergeable_ranks=self.mergeable_ranks,
            special_tokens=self.special_tokens,
        )
        self._content_hash = None

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size):
        """Learn BPE merges from an iterator of str so the total vocab (incl. specials) is vocab_size.

        Training stops early, with fewer tokens, if the text runs out of pairs to merge: read
        get_vocab_size() for the real size.

        Raises:
            ValueError: vocab_size leaves no room for the 256 byte tokens plus the special tokens.
        """
        n_special = len(SPECIAL_TOKENS)
        if not isinstance(vocab_size, int) or vocab_size < N_BYTE_TOKENS + n_special:
            raise ValueError(
                f"vocab_size={vocab_size!r} is too small: it must be at least {N_BYTE_TOKENS + n_special} "
                f"({N_BYTE_TOKENS} byte tokens + {n_special} special tokens); pass a larger --vocab-size"
            )
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iterator, vocab_size - n_special, pattern=SPLIT_PATTERN)
        mergeable_ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls(mergeable_ranks, trainer.get_pattern(), SPECIAL_TOKENS)

    @classmethod
    def from_directory(cls, tokenizer_dir):
        """Load the tokenizer that save() wrote to `tokenizer_dir`, or the tokenizer.pkl of a
        published upstream nanochat checkpoint (a pickled tiktoken.Encoding, read as data only).

        Raises:
            FileNotFoundError: no tokenizer.pkl in the directory.
            ValueError: the file is not a tokenizer written by save().
        """
        path = os.path.join(tokenizer_dir, "tokenizer.pkl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer at {path}; run `python -m scripts.tok_train` first")
        with open(path, "rb") as f:
            try:
                data = _PlainDataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
                raise ValueError(f"{path} is not a nanochat tokenizer file ({e}); re-run `python -m scripts.tok_train`") from e
        if isinstance(data, _EncodingState):  # upstream nanochat's format: a pickled tiktoken.Encoding
            data = _from_tiktoken_state(data.state, path)
        if not isinstance(data, dict) or not {"pattern", "mergeable_ranks", "special_tokens"} <= data.keys():
            raise ValueError(f"{path} is not a nanochat tokenizer file; re-run `python -m scripts.tok_train`")
        return cls(dict(data["mergeable_ranks"]), data["pattern"], data["special_tokens"])

    def save(self, tokenizer_dir):
        """Write tokenizer.pkl and token_bytes.pt into `tokenizer_dir` (created if needed).

        Both files are written together, each atomically, so a directory never pairs a
        tokenizer with another tokenizer's byte lengths.
        """
        data = {
            "pattern": self.pattern,
            "mergeable_ranks": sorted(self.mergeable_ranks.items(), key=lambda item: item[1]),
            "special_tokens": list(self.special_tokens),
        }
        atomic_write(os.path.join(tokenizer_dir, "tokenizer.pkl"), pickle.dumps(data, protocol=4))
        token_bytes = self.compute_token_bytes()
        atomic_write(os.path.join(tokenizer_dir, "token_bytes.pt"), lambda f: torch.save(token_bytes, f))

    # -- vocabulary ------------------------------------------------------------

    def get_vocab_size(self):
        """Number of token ids, special tokens included."""
        return self.enc.n_vocab

    def get_special_tokens(self):
        """The special token strings, in id order."""
        return list(self.special_tokens)

    def encode_special(self, name):
        """Return the id of one special token, e.g. encode_special("<|bos|>").

        Raises:
            ValueError: `name` is not one of SPECIAL_TOKENS.
        """
        if name not in self.special_tokens:
            raise ValueError(f"{name!r} is not a special token; the special tokens are {SPECIAL_TOKENS}")
        return self.special_tokens[name]

    def get_bos_token_id(self):
        """The id of <|bos|>, which starts every document and conversation."""
        return self.special_tokens["<|bos|>"]

    def id_to_token(self, token_id):
        """The text of one token (bytes that are not valid UTF-8 on their own come out as U+FFFD)."""
        return self.enc.decode([token_id])

    def compute_token_bytes(self):
        """Return an int32 tensor (vocab_size,): the raw byte length of every token, 0 for specials.

        Taken from the merge table's bytes, never by decoding, because a token may hold part
        of a multi-byte UTF-8 character and decoding would turn it into U+FFFD (3 bytes).
        """
        lengths = [0] * self.get_vocab_size()
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return torch.tensor(lengths, dtype=torch.int32)

    def content_hash(self):
        """sha256 hex digest of the pattern, the merges and the special tokens.

        Checkpoints record it, so a model is never run with a tokenizer it was not trained with.
        """
        if self._content_hash is None:
            h = hashlib.sha256()
            # every field is length-prefixed so that no two different tokenizers hash the same bytes
            def add(data):
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
            add(self.pattern.encode("utf-8"))
            for token, _ in sorted(self.mergeable_ranks.items(), key=lambda item: item[1]):
                add(token)
            for name in self.special_tokens:
                add(name.encode("utf-8"))
            self._content_hash = h.hexdigest()
        return self._content_hash

    # -- encoding and decoding -------------------------------------------------

    def _to_id(self, token):
        """A special token given as its string or as its id -> the id."""
        if isinstance(token, str):
            return self.encode_special(token)
        if not 0 <= token < self.get_vocab_size():
            raise ValueError(f"token id {token} is outside the vocabulary (0..{self.get_vocab_size() - 1})")
        return int(token)

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Encode a str -> list[int], or a list[str] -> list[list[int]] (in parallel threads).

        Text is always ordinary text: a special token's string inside it (a user typing
        "<|bos|>") is encoded as its characters, never as the special token, and never an error.
        `prepend` / `append` add one special token, given as its string or its id, to every row.

        Raises:
            ValueError: `text` is neither a str nor a list of str, or prepend/append is a
                string that is not a special token or an id outside the vocabulary.
        """
        prepend_id = None if prepend is None else self._to_id(prepend)
        append_id = None if append is None else self._to_id(append)
        if isinstance(text, str):
            rows = [self.enc.encode_ordinary(text)]
        elif isinstance(text, list) and all(isinstance(t, str) for t in text):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        else:
            raise ValueError(f"encode() takes a str or a list of str, got {type(text).__name__}")
        for ids in rows:
            if prepend_id is not None:
                ids.insert(0, prepend_id)
            if append_id is not None:
                ids.append(append_id)
        return rows[0] if isinstance(text, str) else rows

    def decode(self, ids):
        """list[int] -> str; special tokens come out as their strings, broken UTF-8 as U+FFFD."""
        return self.enc.decode(ids)

    # -- the chat format ---------------------------------------------------------

    def render_conversation(self, conversation, max_tokens=2048):
        """Render a conversation for supervised training -> (ids, mask), two list[int] of one length.

        `conversation` is {"messages": [{"role": ..., "content": ...}, ...]}. An optional first
        "system" message is merged into the first user message (system + "\\n\\n" + user); then
        the roles strictly alternate user, assistant, user, ... User content is a str or a list
        of {"type": "text", "text": str} parts; assistant content is a str or a list of parts of
        type "text", "python" (a tool call) or "python_output" (what the tool printed).

        Layout: <|bos|>, then <|user_start|>text<|user_end|> and
        <|assistant_start|>...<|assistant_end|> per turn, python parts wrapped in
        <|python_start|>..<|python_end|> and outputs in <|output_start|>..<|output_end|>.
        mask is 1 on what the assistant produces (its text, its python calls with their
        delimiters, and <|assistant_end|>) and 0 elsewhere, including <|assistant_start|> and
        tool outputs with their delimiters, because the engine writes those. Both lists are
        cut to max_tokens.

        Raises:
            ValueError: a malformed conversation; the message says what is wrong and at which
                message index.
        """
        ids, mask = self._render(_parse_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Render a conversation as a prompt for the model's next reply -> list[int].

        A final assistant message, if any, is dropped (it is the reply to be generated, e.g.
        in RL or evaluation), and <|assistant_start|> is appended to prime the reply.

        Raises:
            ValueError: a malformed conversation (see render_conversation).
        """
        messages = _parse_messages(conversation)
        if messages[-1][0] == "assistant":
            messages = messages[:-1]
        ids, _ = self._render(messages)
        return ids + [self.special_tokens["<|assistant_start|>"]]

    def _render(self, messages):
        """Normalised messages [(role, [(part_type, text)])] -> (ids, mask), untruncated."""
        s = self.special_tokens
        ids, mask = [], []

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        add([s["<|bos|>"]], 0)
        for role, parts in messages:
            if role == "user":
                add([s["<|user_start|>"]], 0)
                add(self.enc.encode_ordinary(parts[0][1]), 0)
                add([s["<|user_end|>"]], 0)
                continue
            add([s["<|assistant_start|>"]], 0)
            for part_type, text in parts:
                if part_type == "text":
                    add(self.enc.encode_ordinary(text), 1)
                elif part_type == "python":
                    add([s["<|python_start|>"]] + self.enc.encode_ordinary(text) + [s["<|python_end|>"]], 1)
                else:  # python_output
                    add([s["<|output_start|>"]] + self.enc.encode_ordinary(text) + [s["<|output_end|>"]], 0)
            add([s["<|assistant_end|>"]], 1)
        return ids, mask

    def visualize_tokenization(self, ids, mask):
        """Return the tokens as one str for a terminal: trained-on tokens (mask 1) in green,
        the rest in red, token boundaries shown by a '|'."""
        green, red, reset = "\033[92m", "\033[91m", "\033[0m"
        return "|".join(f"{green if m else red}{self.id_to_token(i)}{reset}" for i, m in zip(ids, mask))


# -----------------------------------------------------------------------------
# Conversation validation

_ASSISTANT_PART_TYPES = ("text", "python", "python_output")


def _parse_parts(content, where, allowed_types):
    """A message's content -> [(part_type, text)]; a str is one "text" part."""
    if isinstance(content, str):
        if not content:
            raise ValueError(f"{where} has empty content")
        return [("text", content)]
    if not isinstance(content, list):
        raise ValueError(f"{where} content must be a str or a list of parts, got {type(content).__name__}")
    if not content:
        raise ValueError(f"{where} has empty content (an empty list of parts)")
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or "type" not in part or "text" not in part:
            raise ValueError(f"{where} part {j} must be a dict with keys 'type' and 'text'")
        if part["type"] not in allowed_types:
            raise ValueError(f"{where} part {j} has unknown type {part['type']!r}; expected one of {list(allowed_types)}")
        if not isinstance(part["text"], str):
            raise ValueError(f"{where} part {j} text must be a str, got {type(part['text']).__name__}")
        parts.append((part["type"], part["text"]))
    return parts


def _parse_messages(conversation):
    """Validate a conversation -> [(role, [(part_type, text)])], system merged into the first user turn.

    User messages come back as a single ("text", str) part.
    """
    if not isinstance(conversation, dict) or "messages" not in conversation:
        raise ValueError("a conversation must be a dict with a 'messages' key")
    raw = conversation["messages"]
    if not isinstance(raw, list) or not raw:
        raise ValueError("the conversation's 'messages' must be a non-empty list")
    messages = []
    system_text = None
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where} must be a dict with keys 'role' and 'content'")
        role = message["role"]
        if role == "system":
            if i != 0:
                raise ValueError(f"{where} is a system message; only the first message may be one")
            system_text = _join_text(_parse_parts(message["content"], where, ("text",)))
            continue
        if role not in ("user", "assistant"):
            raise ValueError(f"{where} has unknown role {role!r}; expected 'system', 'user' or 'assistant'")
        expected = "user" if len(messages) % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"{where} is from the {role} but should be from the {expected}: roles must alternate, starting with the user")
        if role == "user":
            text = _join_text(_parse_parts(message["content"], where, ("text",)))
            if system_text is not None:
                text = system_text + "\n\n" + text
                system_text = None
            messages.append(("user", [("text", text)]))
        else:
            messages.append(("assistant", _parse_parts(message["content"], where, _ASSISTANT_PART_TYPES)))
    if not messages:
        raise ValueError("messages[0] is a system message but no user message follows it")
    return messages


def _join_text(parts):
    """Text parts -> one str (consecutive parts are joined directly, as a UI splits them)."""
    return "".join(text for _, text in parts)


# -----------------------------------------------------------------------------
# The pipeline's tokenizer

def get_tokenizer():
    """Load the tokenizer that scripts/tok_train.py saved under $NANOCHAT_BASE_DIR/tokenizer.

    Raises:
        FileNotFoundError: no tokenizer there yet (the message says to run tok_train).
    """
    return RustBPETokenizer.from_directory(os.path.join(get_base_dir(), "tokenizer"))


def get_token_bytes(device="cpu"):
    """Load token_bytes.pt: int32 tensor (vocab_size,), bytes per token (0 for specials), on `device`.

    Raises:
        FileNotFoundError: no token_bytes.pt yet (the message says to run tok_train).
    """
    path = os.path.join(get_base_dir(), "tokenizer", "token_bytes.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no token_bytes.pt at {path}; run `python -m scripts.tok_train` first")
    return torch.load(path, map_location=device)
