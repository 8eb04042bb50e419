"""
Train the BPE tokenizer on the pretraining shards and save it, with token_bytes.pt, to
$NANOCHAT_BASE_DIR/tokenizer/.

Not for: measuring the tokenizer (scripts/tok_eval.py) or fetching shards (nanochat/dataset.py).

    python -m scripts.tok_train                      # 65,536 tokens on the first 2B characters
    python -m scripts.tok_train --vocab-size 4096 --max-chars 10000000   # a tiny CPU demo
"""

import os
import sys
import time

from nanochat.common import ArgumentParser, get_base_dir, print0
from nanochat.dataset import list_parquet_files, parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer

# -----------------------------------------------------------------------------
# Flags

parser = ArgumentParser(description="Train the BPE tokenizer on the training shards")
parser.add_argument("--vocab-size", type=int, default=65536,
                    help="total vocabulary incl. the 256 byte tokens and the special tokens (default: 65536)")
parser.add_argument("--max-chars", type=int, default=2_000_000_000,
                    help="stop reading text after this many characters (default: 2e9)")
parser.add_argument("--doc-cap", type=int, default=10_000,
                    help="use at most this many characters of each document (default: 10000)")
args = parser.parse_args()
min_vocab = 256 + len(SPECIAL_TOKENS)
if args.vocab_size < min_vocab:
    sys.exit(f"error: --vocab-size {args.vocab_size} is too small; it must be at least {min_vocab} "
             f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
if args.max_chars <= 0 or args.doc_cap <= 0:
    sys.exit("error: --max-chars and --doc-cap must be positive")

# -----------------------------------------------------------------------------
# Setup: the training text

base_dir = get_base_dir()
if not list_parquet_files():
    sys.exit(f"error: no pretraining shards in {os.path.join(base_dir, 'base_data')}; download them with "
             f"`python -m nanochat.dataset`, or build the offline corpus with `python -m nanochat.dataset --offline`")

chars_seen = 0  # counted by text_iterator as the trainer pulls documents
docs_seen = 0


def text_iterator():
    """Yield training documents, each cut to --doc-cap characters, until --max-chars are read."""
    global chars_seen, docs_seen
    for batch in parquets_iter_batched(split="train"):
        for doc in batch:
            doc = doc[:args.doc_cap]
            chars_seen += len(doc)
            docs_seen += 1
            yield doc
            if chars_seen >= args.max_chars:
                return

# -----------------------------------------------------------------------------
# Train

print0(f"Training a {args.vocab_size:,}-token tokenizer on up to {args.max_chars:,} characters "
       f"(documents cut to {args.doc_cap:,})")
t0 = time.time()
try:
    tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(), args.vocab_size)
except (FileNotFoundError, ValueError) as e:  # raised by the shard reader: one shard only, no text column
    sys.exit(f"error: {e}")
train_time = time.time() - t0
if chars_seen == 0:
    sys.exit("error: the training shards hold no text; re-create them with `python -m nanochat.dataset --offline`")
print0(f"Read {docs_seen:,} documents, {chars_seen:,} characters in {train_time:.1f}s "
       f"({chars_seen / max(train_time, 1e-9) / 1e6:.2f}M chars/s)")

# -----------------------------------------------------------------------------
# Save

tokenizer_dir = os.path.join(base_dir, "tokenizer")
tokenizer.save(tokenizer_dir)
print0(f"Saved tokenizer.pkl and token_bytes.pt to {tokenizer_dir}")

# -----------------------------------------------------------------------------
# Sanity check: the saved files load and round-trip text, including a special token's
# string typed as ordinary text

loaded = RustBPETokenizer.from_directory(tokenizer_dir)
sample = "Hello world! 1234567 x² ≠ y³; 안녕하세요, 你好. A user typed <|bos|> here.\n\tdef f(x): return x"
ids = loaded.encode(sample)
assert loaded.decode(ids) == sample, "round trip failed: decode(encode(text)) != text"
assert loaded.get_bos_token_id() not in ids, "a special token's string was encoded as the special token"
assert loaded.content_hash() == tokenizer.content_hash(), "the saved tokenizer differs from the trained one"

# -----------------------------------------------------------------------------
# Report

token_bytes = tokenizer.compute_token_bytes()
regular = token_bytes[token_bytes > 0].float()
vocab_size = tokenizer.get_vocab_size()
print0("-" * 60)
print0(f"vocab size:        {vocab_size:,} ({vocab_size - 256 - len(SPECIAL_TOKENS):,} merges + 256 bytes "
       f"+ {len(SPECIAL_TOKENS)} special)")
if vocab_size < args.vocab_size:
    print0(f"                   fewer than the {args.vocab_size:,} asked for: the text ran out of pairs to merge")
print0(f"characters read:   {chars_seen:,} in {docs_seen:,} documents")
print0(f"training time:     {train_time:.1f}s")
print0(f"bytes per token:   min {int(regular.min())}, max {int(regular.max())}, mean {regular.mean():.2f} (over the vocab)")
print0(f"sample round trip: {len(sample.encode('utf-8'))} bytes -> {len(ids)} tokens")
print0(f"content hash:      {tokenizer.content_hash()}")
get_report().log("Tokenizer training", [vars(args), {
    "vocab size": vocab_size, "characters": f"{chars_seen:,}", "documents": f"{docs_seen:,}",
    "training time (s)": round(train_time, 1), "mean token length (bytes)": round(float(regular.mean()), 2),
}])
