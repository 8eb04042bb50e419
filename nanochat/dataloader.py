"""
Streaming pretraining data loader: parquet shards -> tokens -> (B, T) int64 inputs/targets.

Documents are read row group by row group with pyarrow, tokenized on the fly in batches
(several threads), each prefixed with <|bos|>. Two ways to make (B, T) batches of them:
- tokenizing_distributed_data_loader: one concatenated token stream cut into rows (every
  token is trained on; a row may start in the middle of a document);
- bos_bestfit_data_loader: every row starts at a document's <|bos|> and holds whole documents
  picked best-fit from a pool, the last one cropped to fill the row (no padding; the crop's
  tail is dropped). Upstream nanochat's BestFit-Crop (dev/LOG.md 2026-01-13).
One global order of rows, whatever the number of processes: every process reads every row
group and builds the same stream of rows; each batch is the next B x world_size rows of it, of
which rank r keeps rows r*B ... r*B + B - 1. So 1 process with B=2 and 2 processes with B=1
(or 2 accumulation steps of B=1) train on the same rows in every optimizer step, and a run moves
between one node and two, or resumes on another world size, without its data changing. The price
is that every process reads and tokenizes all of it (world_size times the host work; a few % of
one core per GPU at the token rates of a DGX Spark). Every batch comes with a small state dict,
the same on every rank, from which a new loader resumes exactly where this one stopped.

Not for: chat/SFT data (those are `Task`s rendered by the tokenizer) or downloading
shards (nanochat/dataset.py).
"""

import bisect
from array import array
from collections import deque
from itertools import islice

import pyarrow.parquet as pq
import torch

from nanochat.common import get_dist_info
from nanochat.dataset import get_data_dir, list_parquet_files
from nanochat.tokenizer import get_tokenizer

STATE_KEYS = ("epoch", "shard_index", "row_group_index", "doc_index", "token_offset")


def _split_paths(split):
    """Return the parquet paths of `split`: train = all shards but the last, val = the last."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data_dir = get_data_dir()
    paths = list_parquet_files(data_dir)
    if not paths:
        raise FileNotFoundError(
            f"no pretraining shards (shard_*.parquet) in {data_dir}; download them with "
            "`python -m nanochat.dataset -n 8` or build the offline corpus with `python -m nanochat.dataset --offline`")
    if split == "train" and len(paths) < 2:
        raise FileNotFoundError(
            f"only one shard in {data_dir}, and the last shard is held out for validation, so the train split "
            "is empty; get at least 2 shards with `python -m nanochat.dataset -n 8` (or `--offline`)")
    return paths[:-1] if split == "train" else paths[-1:]


def _iter_documents(paths, epoch, shard_index, row_group_index, doc_index):
    """Yield ((epoch, shard_index, row_group_index, doc_index), text) forever, in loader order.

    Starts at the given position; afterwards walks every row group of every shard in order,
    then starts the next epoch at shard 0.

    Raises:
        ValueError: a whole epoch holds no document (only empty shards).
    """
    full_epoch = (shard_index, row_group_index, doc_index) == (0, 0, 0)
    while True:
        found = False
        for si in range(shard_index, len(paths)):
            pf = pq.ParquetFile(paths[si])
            for rgi in range(row_group_index, pf.num_row_groups):
                texts = pf.read_row_group(rgi, columns=["text"]).column("text").to_pylist()
                for di in range(doc_index, len(texts)):
                    found = True
                    yield (epoch, si, rgi, di), texts[di]
                doc_index = 0
            row_group_index = 0
        if full_epoch and not found:
            raise ValueError(f"the shards {paths} hold no documents; rebuild them (python -m nanochat.dataset)")
        epoch, shard_index, row_group_index, doc_index = epoch + 1, 0, 0, 0
        full_epoch = True


def _rank_batch(rows, rank, B, device):
    """(inputs, targets) of this rank's B rows of a global batch: rows[rank*B:(rank+1)*B] of a
    (B * world_size, T + 1) int64 CPU tensor (a view is fine), both (B, T) int64 on `device`."""
    mine = rows[rank * B:(rank + 1) * B]  # (B, T + 1)
    use_cuda = torch.device(device).type == "cuda"
    if use_cuda:
        mine = mine.contiguous().pin_memory()  # page-locked, so the copies below run asynchronously
    return mine[:, :-1].to(device, non_blocking=use_cuda), mine[:, 1:].to(device, non_blocking=use_cuda)


def tokenizing_distributed_data_loader(B, T, split, tokenizer_threads=4, tokenizer_batch_size=128, device="cuda",
                                       loader_state=None, tokenizer=None, rank=None, world_size=None):
    """Yield (inputs, targets, loader_state) forever from the pretraining shards of `split`.

    inputs, targets: (B, T) int64 tensors on `device`; targets[b, t] is the token after
    inputs[b, t] in the stream. Global row i is stream tokens i*T ... i*T + T (rows overlap by
    one token, so every token of the stream is a target exactly once); a batch is the next
    B * world_size rows, of which this rank gets rows rank*B ... rank*B + B - 1.
    Both splits loop over epochs forever; the caller decides how many batches to take.

    loader_state (a dict of plain ints, JSON-able) locates the first token of the next window:
      epoch, shard_index, row_group_index, doc_index: the document it belongs to
        (shard_index indexes this split's shards);
      token_offset: its index in that document's tokens (<|bos|> is index 0).
    It is the same on every rank and does not depend on B or the world size, so a run may
    resume with other ones as long as B * world_size divides the rows already consumed.
    Resuming re-reads that row group, re-tokenizes from that document and drops the first
    token_offset tokens. Tokenization is per document and deterministic, so the rebuilt
    token buffer, and every batch after it, equals what the uninterrupted loader yields.

    Args:
        B, T: batch size and sequence length (tokens).
        split: "train" (all shards but the last) or "val" (the last shard).
        tokenizer_threads: threads the tokenizer encodes a batch of documents with.
        tokenizer_batch_size: documents per encode call.
        device: where the batches go; on CUDA via pinned memory and a non-blocking copy.
        loader_state: a loader_state yielded earlier by a loader of the same split, data and
            tokenizer; None starts at the beginning.
        tokenizer: defaults to nanochat.tokenizer.get_tokenizer().
        rank, world_size: default to the torchrun environment (get_dist_info()).

    Raises:
        FileNotFoundError: no shards, or a single shard and split="train".
        ValueError: bad split, or a resume state from another set of shards, another tokenizer
            or the per-rank loader of an older version.
    """
    if rank is None or world_size is None:
        _, rank, _, world_size = get_dist_info()
    assert 0 <= rank < world_size
    paths = _split_paths(split)
    if tokenizer is None:
        tokenizer = get_tokenizer()
    bos = tokenizer.get_bos_token_id()

    start = {"epoch": 0, "shard_index": 0, "row_group_index": 0, "doc_index": 0, "token_offset": 0}
    if loader_state is not None:
        _check_resume_state(loader_state, STATE_KEYS, paths, split)
        start = {k: int(loader_state[k]) for k in start}

    documents = _iter_documents(paths, start["epoch"], start["shard_index"], start["row_group_index"],
                                start["doc_index"])
    start_position = (start["epoch"], start["shard_index"], start["row_group_index"], start["doc_index"])
    resuming = loader_state is not None
    docs = deque()  # (position, token ids) of every document that still has unconsumed tokens
    head_offset = start["token_offset"]  # tokens of docs[0] already consumed
    buffered = -head_offset  # tokens available in docs
    rows = B * world_size  # global rows per batch
    window = rows * T + 1

    while True:
        # refill: tokenize the next tokenizer_batch_size documents until a window fits
        while buffered < window:
            batch = list(islice(documents, tokenizer_batch_size))
            positions = [position for position, _ in batch]
            token_lists = tokenizer.encode([text for _, text in batch], prepend=bos, num_threads=tokenizer_threads)
            for position, ids in zip(positions, token_lists):
                docs.append((position, ids))
                buffered += len(ids)
            if resuming:  # the resume point must still exist, or the stream would silently shift
                resuming = False
                position, ids = docs[0]
                if position != start_position or head_offset >= len(ids):
                    raise ValueError(
                        f"dataloader resume state points at document {start_position} (epoch, shard, row group, doc), "
                        f"token {head_offset}, which does not exist (first document found: {position}, {len(ids)} "
                        "tokens); the shards or the tokenizer changed since the checkpoint")
        tokens = array("q")  # int64; ~4x faster than torch.tensor(list) to turn into a tensor (CPU, 65K tokens)
        head_offset = read_window(docs, head_offset, window, rows * T, (tokens,), lambda doc: (doc[1],))
        buffered -= rows * T
        (epoch, shard_index, row_group_index, doc_index), _ = docs[0]
        state = {"epoch": epoch, "shard_index": shard_index, "row_group_index": row_group_index,
                 "doc_index": doc_index, "token_offset": head_offset}
        scratch = torch.frombuffer(tokens, dtype=torch.long)  # (rows*T+1,)
        inputs, targets = _rank_batch(scratch.unfold(0, T + 1, T), rank, B, device)  # rows overlap by one token
        yield inputs, targets, state


def _check_resume_state(loader_state, keys, paths, split):
    """Raise ValueError when loader_state was not made by a loader with these keys and shards."""
    missing = [k for k in keys if k not in loader_state]
    if missing:
        raise ValueError(f"dataloader resume state lacks {missing}; it was not made by this loader")
    if loader_state.get("world_size", 1) != 1:  # this version's states are global and carry no rank
        raise ValueError(
            f"dataloader resume state is rank {loader_state['rank']}'s of {loader_state['world_size']} from an older "
            "version that gave each process its own documents; it cannot be resumed in the global row order. "
            "Finish the run with that version, or start the stage again without --resume")
    if loader_state["shard_index"] >= len(paths):
        raise ValueError(f"dataloader resume state points at {split} shard {loader_state['shard_index']} but "
                         f"there are only {len(paths)}; the shards in base_data/ changed since the checkpoint")


BESTFIT_STATE_KEYS = ("epoch", "shard_index", "row_group_index", "doc_index", "documents_read", "pool")


def bos_bestfit_data_loader(B, T, split, pool_size=1000, tokenizer_threads=4, tokenizer_batch_size=128,
                            device="cuda", loader_state=None, tokenizer=None, rank=None, world_size=None):
    """Yield (inputs, targets, loader_state) forever: B rows that each start with a document's <|bos|>.

    The loader builds one global sequence of rows; a batch is the next B * world_size of them,
    of which this rank gets rows rank*B ... rank*B + B - 1. Each row is T + 1 tokens
    (inputs row[:-1], targets row[1:], both (B, T) int64 on `device`),
    filled from a pool of at least pool_size tokenized documents: repeatedly the longest document
    that fits the space left (the earliest read among equal lengths), and when none fits, the
    earliest-read document of the pool cropped to the space left (its tail is dropped, so a row
    never starts mid-document). Taking the earliest for the crop keeps every document's wait
    bounded, and long documents (> T + 1 tokens) are used as crops. The pool is topped up with
    tokenizer_batch_size documents at a time before each row while it holds fewer than pool_size.

    loader_state (plain ints and a list, JSON-able): the position (epoch, shard_index,
    row_group_index, doc_index) of the earliest-read document still in the pool, documents_read
    (how many documents from that one on have been read) and pool (the indices, counted from that
    document, of those still in the pool); the same on every rank, for any B and world size (the
    rows do not depend on how they are batched). Resuming re-reads those
    documents and tokenizes the pool's again, so every later batch equals the uninterrupted
    loader's. Other arguments and errors: as tokenizing_distributed_data_loader.
    """
    if rank is None or world_size is None:
        _, rank, _, world_size = get_dist_info()
    assert 0 <= rank < world_size and pool_size >= 1
    paths = _split_paths(split)
    if tokenizer is None:
        tokenizer = get_tokenizer()
    bos = tokenizer.get_bos_token_id()
    start = {"epoch": 0, "shard_index": 0, "row_group_index": 0, "doc_index": 0}
    if loader_state is not None:
        _check_resume_state(loader_state, BESTFIT_STATE_KEYS, paths, split)
        start = {k: int(loader_state[k]) for k in start}
    documents = _iter_documents(paths, *start.values())
    # The pool: ordinal (documents read before it, counted from the first document this loader
    # read) -> (position, token ids), in reading order; by_length: sorted (length, ordinal) of the same
    pool, by_length, read = {}, [], 0

    def add(ordinal, position, ids):
        pool[ordinal] = (position, ids)
        bisect.insort(by_length, (len(ids), ordinal))

    def take(ordinal):
        _, ids = pool.pop(ordinal)
        del by_length[bisect.bisect_left(by_length, (len(ids), ordinal))]
        return ids

    def fill_pool():
        nonlocal read
        while len(pool) < pool_size:
            batch = list(islice(documents, tokenizer_batch_size))
            for (position, _), ids in zip(batch, tokenizer.encode([text for _, text in batch], prepend=bos,
                                                                  num_threads=tokenizer_threads)):
                add(read, position, ids)
                read += 1

    if loader_state is not None:  # rebuild the pool: re-read the documents, tokenize the pool's again
        batch = list(islice(documents, int(loader_state["documents_read"])))
        keep = [i for i in loader_state["pool"] if i < len(batch)]
        if len(batch) < loader_state["documents_read"] or len(keep) != len(loader_state["pool"]) or (
                keep and batch[0][0] != tuple(start.values())):
            raise ValueError(f"dataloader resume state points at documents from {tuple(start.values())} (epoch, shard, "
                             "row group, doc) that do not exist; the shards changed since the checkpoint")
        for i, ids in zip(keep, tokenizer.encode([batch[i][1] for i in keep], prepend=bos,
                                                 num_threads=tokenizer_threads)):
            add(i, batch[i][0], ids)
        read = len(batch)
    while True:
        rows = array("q")  # B * world_size * (T + 1) int64
        for _ in range(B * world_size):
            fill_pool()
            space = T + 1
            while space > 0:
                i = bisect.bisect_right(by_length, (space, read)) - 1
                if i >= 0:  # the longest document that fits, the earliest read of that length
                    i = bisect.bisect_left(by_length, (by_length[i][0], -1))
                    ids = take(by_length[i][1])
                else:  # nothing fits: crop the earliest-read document
                    ids = take(next(iter(pool)))[:space]
                rows.extend(ids)
                space -= len(ids)
        fill_pool()  # so the state below can point at a document of the pool
        first = next(iter(pool))  # the earliest-read document left: where a resume starts reading
        (epoch, shard_index, row_group_index, doc_index), _ = pool[first]
        state = {"epoch": epoch, "shard_index": shard_index, "row_group_index": row_group_index,
                 "doc_index": doc_index, "documents_read": read - first, "pool": [i - first for i in pool]}
        inputs, targets = _rank_batch(torch.frombuffer(rows, dtype=torch.long).view(-1, T + 1), rank, B, device)
        yield inputs, targets, state


def read_window(pending, head_offset, window, stride, outs, fields):
    """Copy the next `window` tokens of a stream of documents into `outs`, then advance it by `stride`.

    The stream is `pending`, a deque of documents of which pending[0]'s first `head_offset`
    tokens are already consumed; fields(doc) gives a document's parallel token sequences (its ids, and
    for chat its loss mask), one per list/array in `outs`, which are extended in place. Documents
    used up by the first `stride` tokens are popped. Returns the new head_offset. `pending` must
    hold at least `window` tokens. Shared by the pretraining and the midtraining loaders, whose
    windows overlap by window - stride tokens (the last input's target starts the next window).
    """
    offset = head_offset
    for doc in pending:
        take = window - len(outs[0])
        for out, seq in zip(outs, fields(doc)):
            out.extend(seq[offset:offset + take])
        offset = 0
        if len(outs[0]) == window:
            break
    while stride > 0:
        left_in_head = len(fields(pending[0])[0]) - head_offset
        if left_in_head <= stride:
            pending.popleft()
            stride -= left_in_head
            head_offset = 0
        else:
            head_offset += stride
            stride = 0
    return head_offset


def without_state(loader):
    """Yield (inputs, targets) from a loader that yields (inputs, targets, loader_state).

    For consumers that never resume, e.g. evaluate_bpb on the val split.
    """
    for inputs, targets, _ in loader:
        yield inputs, targets
