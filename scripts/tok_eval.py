"""
Measure the trained tokenizer's compression (bytes per token) on several kinds of text, next to
GPT-2's, GPT-4's (cl100k_base) and GPT-4o's (o200k_base) tokenizers, and write the table to
$NANOCHAT_BASE_DIR/report/tokenizer_eval.md.

Not for: training the tokenizer (scripts/tok_train.py).

The reference tokenizers load from tiktoken's cache when it has them; offline, cl100k_base and
o200k_base come from the merge tables that the `bpe-openai` package ships (checked against
OpenAI's published sha256). GPT-2's merge table ships in no installed package, so offline it
is left out, and the table says so.

    python -m scripts.tok_eval
"""

import base64
import gzip
import hashlib
import importlib.resources
import os
import socket
import sys

import tiktoken

from nanochat.common import ArgumentParser, get_base_dir, print0
from nanochat.dataset import list_parquet_files, parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

# -----------------------------------------------------------------------------
# Flags

parser = ArgumentParser(description="Compare the tokenizer's compression with GPT-2/GPT-4/GPT-4o")
parser.add_argument("--num-docs", type=int, default=1000,
                    help="documents read from the validation shard and from the training shards (default: 1000)")
parser.add_argument("--download-timeout", type=float, default=5.0,
                    help="seconds to wait for tiktoken to fetch a reference tokenizer before falling back (default: 5)")
args = parser.parse_args()
if args.num_docs < 0:
    sys.exit("error: --num-docs must be >= 0")

# -----------------------------------------------------------------------------
# Sample texts, written for this evaluation

news_text = """The city council voted 7 to 2 on Tuesday night to convert the old tram depot on Harbour Street into a public library and community kitchen, ending a dispute that had dragged on for almost four years.

Supporters packed the chamber, many holding hand-painted signs. "We have waited long enough," said Marta Olsen, a retired schoolteacher who has led the campaign since 2021. "Children in this neighbourhood walk forty minutes to borrow a book."

The project is expected to cost $18.4 million, of which roughly a third will come from a regional development grant. Councillor David Mensah, one of the two members who voted against it, warned that maintenance costs had been underestimated and that the building's roof would need replacing within a decade.

Construction is scheduled to begin in March, with the library opening in the autumn of next year if the work stays on schedule."""

code_text = '''import math
from dataclasses import dataclass


@dataclass
class Circle:
    """A circle in the plane, centred at (x, y)."""
    x: float
    y: float
    radius: float

    def area(self) -> float:
        return math.pi * self.radius ** 2

    def contains(self, px: float, py: float) -> bool:
        return (px - self.x) ** 2 + (py - self.y) ** 2 <= self.radius ** 2


def count_inside(circles: list[Circle], points: list[tuple[float, float]]) -> dict[int, int]:
    """Return how many points fall inside each circle, keyed by the circle's index."""
    counts = {}
    for i, circle in enumerate(circles):
        counts[i] = sum(1 for (px, py) in points if circle.contains(px, py))
    return counts


if __name__ == "__main__":
    shapes = [Circle(0.0, 0.0, 1.0), Circle(2.5, -1.0, 0.5)]
    print(count_inside(shapes, [(0.1, 0.2), (2.4, -1.1), (9.0, 9.0)]))
'''

math_text = r"""\begin{theorem}
Let $f \colon [a, b] \to \mathbb{R}$ be continuous on $[a, b]$ and differentiable on $(a, b)$. Then there exists $c \in (a, b)$ such that
\[
  f'(c) = \frac{f(b) - f(a)}{b - a}.
\]
\end{theorem}

\begin{proof}
Define $g(x) = f(x) - \frac{f(b) - f(a)}{b - a}(x - a)$. Then $g$ is continuous on $[a, b]$, differentiable on $(a, b)$, and $g(a) = g(b) = f(a)$. By Rolle's theorem there is a $c \in (a, b)$ with $g'(c) = 0$, that is, $f'(c) = \frac{f(b) - f(a)}{b - a}$.
\end{proof}

For the Gaussian integral we have
\begin{equation}
  \int_{-\infty}^{\infty} e^{-x^2}\,dx = \sqrt{\pi}, \qquad \sum_{n=1}^{\infty} \frac{1}{n^2} = \frac{\pi^2}{6}.
\end{equation}
"""

german_text = """Am frühen Morgen lag dichter Nebel über dem Fluss, und die Fähre wartete geduldig am Ufer. Die ersten Pendler tranken ihren Kaffee aus Pappbechern und sprachen leise über das Wetter, das seit Tagen ungewöhnlich mild gewesen war.

Die Gemeinde plant, im nächsten Jahr eine neue Brücke zu bauen. Viele Bewohner freuen sich darauf, doch einige befürchten, dass mit der Fähre auch ein Stück Geschichte verschwinden würde. Der Fährmann selbst sieht es gelassen: „Ich fahre hier seit dreißig Jahren. Irgendwann ist jede Fahrt die letzte.“"""

korean_text = """오늘 아침에는 비가 조금 내렸지만 오후가 되자 하늘이 맑아졌다. 우리는 공원에 가서 산책을 하고 작은 카페에서 따뜻한 차를 마셨다.

이번 주말에 도서관에서 어린이를 위한 과학 강연이 열린다. 강연에서는 별과 행성에 대해 쉽게 설명해 주고, 참가자들은 직접 망원경으로 달을 관찰할 수 있다. 참가비는 무료이며 미리 신청하면 된다."""

chinese_text = """今天早上下了一场小雨，空气变得格外清新。我们沿着河边散步，看见几位老人在树下下棋，孩子们在草地上放风筝。

这个城市正在建设一条新的地铁线路，预计明年年底通车。新线路将连接火车站、大学城和机场，可以大大缩短市民的通勤时间。不过，施工期间部分道路会临时封闭，请大家提前安排出行。"""

samples = [
    ("news", news_text),
    ("code", code_text),
    ("math", math_text),
    ("german", german_text),
    ("korean", korean_text),
    ("chinese", chinese_text),
]

# -----------------------------------------------------------------------------
# Setup: our tokenizer, the corpus samples, and the reference tokenizers

try:
    tokenizer = get_tokenizer()
except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")

notes = []  # what was left out of the table, and why


def read_shard_sample(split):
    """The first --num-docs documents of a split, joined into one text; None when there are none."""
    if args.num_docs == 0 or not list_parquet_files():
        return None
    docs = []
    for batch in parquets_iter_batched(split=split):
        docs.extend(batch[:args.num_docs - len(docs)])
        if len(docs) >= args.num_docs:
            break
    return "\n".join(docs) if docs else None


for split, name in (("val", "fwe-val"), ("train", "fwe-train")):
    try:
        text = read_shard_sample(split)
    except (FileNotFoundError, ValueError) as e:  # the shard reader's errors: one shard only, no text column
        notes.append(f"{name}: skipped; {e}")
        continue
    if text is None:
        notes.append(f"{name}: skipped; no {split} documents in {os.path.join(get_base_dir(), 'base_data')}")
    else:
        samples.append((name, text))

# Facts from OpenAI's tiktoken release: each reference's split pattern, its merge table's sha256,
# and its special tokens (ours are not counted in any row, so only their ids matter here).
CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
OFFLINE_REFERENCES = {
    "cl100k_base": (CL100K_PATTERN, "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
                    {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                     "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
    "o200k_base": (O200K_PATTERN, "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
                   {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
}


def load_shipped_encoding(name):
    """Build a tiktoken.Encoding from the merge table in the bpe-openai package; None if unavailable."""
    pattern, sha256, special_tokens = OFFLINE_REFERENCES[name]
    try:
        resource = importlib.resources.files("bpe_openai").joinpath("data", f"{name}.tiktoken.gz")
        data = gzip.decompress(resource.read_bytes())
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return None
    if hashlib.sha256(data).hexdigest() != sha256:
        return None
    # the .tiktoken format: one "<base64 token> <rank>" per line
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special_tokens)


def load_reference(name):
    """tiktoken's own loader (its cache, else a download), then the shipped table -> (Encoding, source)."""
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(args.download_timeout)  # tiktoken's download sets no timeout of its own
    try:
        return tiktoken.get_encoding(name), "tiktoken"
    except Exception:  # offline: DNS, connection or HTTP errors, whichever the network gives
        pass
    finally:
        socket.setdefaulttimeout(previous_timeout)
    if name in OFFLINE_REFERENCES:
        enc = load_shipped_encoding(name)
        if enc is not None:
            return enc, "bpe-openai package"
    return None, None


references = []  # (label, Encoding)
for label, name in (("GPT-2", "gpt2"), ("GPT-4", "cl100k_base"), ("GPT-4o", "o200k_base")):
    enc, source = load_reference(name)
    if enc is None:
        notes.append(f"{label} ({name}): skipped; tiktoken could not download it (offline?) and no installed package ships it")
    else:
        print0(f"{label} ({name}) loaded from {source}")
        references.append((label, enc))

# -----------------------------------------------------------------------------
# Evaluate: bytes per token for every text kind and tokenizer

rows = []  # (kind, n_bytes, our_tokens, [their_tokens per reference])
for kind, text in samples:
    n_bytes = len(text.encode("utf-8"))
    ours = len(tokenizer.encode(text))
    # encode_ordinary: a corpus document may contain "<|endoftext|>", which is text, not a token
    theirs = [len(enc.encode_ordinary(text)) for _, enc in references]
    rows.append((kind, n_bytes, ours, theirs))

# -----------------------------------------------------------------------------
# Report

header = ["text", "bytes", "ours tokens", "ours bytes/tok"]
for label, _ in references:
    header += [f"{label} bytes/tok", f"ours vs {label}"]
lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
for kind, n_bytes, ours, theirs in rows:
    cells = [kind, f"{n_bytes:,}", f"{ours:,}", f"{n_bytes / ours:.2f}"]
    for their in theirs:
        # > 1: ours packs more bytes into a token (fewer tokens) than the reference
        cells += [f"{n_bytes / their:.2f}", f"{their / ours:.3f}"]
    lines.append("| " + " | ".join(cells) + " |")
table = "\n".join(lines)

markdown = "\n".join([
    f"Our tokenizer: {tokenizer.get_vocab_size():,} tokens, content hash {tokenizer.content_hash()[:16]}.",
    "Compression in bytes (UTF-8) per token; higher is better. `ours vs X` = X's tokens / our tokens:",
    "above 1, ours needs fewer tokens for the same text.",
    "",
    table,
    "",
    *[f"- {note}" for note in notes],
]).rstrip() + "\n"

print0(table)
for note in notes:
    print0(f"note: {note}")

report_path = get_report().log("Tokenizer evaluation", [markdown])
print0(f"Wrote {report_path}")
