"""Tests for nanochat/dataloader.py on tiny parquet shards written into a temporary base dir."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import json

from nanochat.dataloader import bos_bestfit_data_loader, tokenizing_distributed_data_loader, without_state

BOS = 256
ROWS_PER_GROUP = 3


class ByteTokenizer:
    """Byte-level stand-in with the tokenizer's batch interface: token id = byte value, BOS = 256."""

    def __init__(self):
        self.calls = 0

    def get_bos_token_id(self):
        return BOS

    def encode(self, texts, prepend=None, num_threads=8):
        assert isinstance(texts, list) and prepend == BOS
        self.calls += 1
        return [[prepend] + list(text.encode("utf-8")) for text in texts]


def make_shards(base_dir, num_shards=3, row_groups=(4, 3, 2)):
    """Write shard_XXXXX.parquet files of short, varied documents; return the docs as [shard][row_group][doc]."""
    rng = random.Random(0)
    data_dir = base_dir / "base_data"
    data_dir.mkdir(parents=True)
    shards = []
    for s in range(num_shards):
        groups = [[f"s{s}g{g}d{d}:" + "é" * rng.randint(0, 3) + "x" * rng.randint(0, 12)
                   for d in range(ROWS_PER_GROUP)] for g in range(row_groups[s])]
        table = pa.table({"text": [doc for group in groups for doc in group]})
        pq.write_table(table, data_dir / f"shard_{s:05d}.parquet", row_group_size=ROWS_PER_GROUP)
        assert pq.ParquetFile(data_dir / f"shard_{s:05d}.parquet").num_row_groups == row_groups[s]
        shards.append(groups)
    return shards


def expected_stream(shards, epochs=3):
    """The token stream every rank reads: every row group of each shard, in order."""
    stream = []
    for _ in range(epochs):
        for groups in shards:
            for group in groups:
                for doc in group:
                    stream += [BOS] + list(doc.encode("utf-8"))
    return stream


@pytest.fixture
def shards(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return make_shards(tmp_path)


def make_loader(B=2, T=5, split="train", **kwargs):
    kwargs.setdefault("tokenizer", ByteTokenizer())
    kwargs.setdefault("rank", 0)
    kwargs.setdefault("world_size", 1)
    kwargs.setdefault("tokenizer_batch_size", 2)
    return tokenizing_distributed_data_loader(B, T, split, device="cpu", **kwargs)


def make_bestfit(B=2, T=16, **kwargs):
    kwargs.setdefault("tokenizer", ByteTokenizer())
    kwargs.setdefault("rank", 0)
    kwargs.setdefault("world_size", 1)
    kwargs.setdefault("tokenizer_batch_size", 2)
    kwargs.setdefault("pool_size", 4)
    return bos_bestfit_data_loader(B, T, "train", device="cpu", **kwargs)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_the_document_stream_with_bos_before_every_document(shards):
    B, T = 2, 5
    stream = expected_stream(shards[:-1])  # train = all shards but the last
    loader = make_loader(B, T)
    num_batches = (len(stream) - 1) // (B * T)
    for k, (inputs, targets, state) in enumerate(take(loader, num_batches)):
        assert inputs.shape == targets.shape == (B, T)
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.device.type == "cpu"
        start = k * B * T
        assert inputs.flatten().tolist() == stream[start:start + B * T]
        assert targets.flatten().tolist() == stream[start + 1:start + B * T + 1]
    assert state["epoch"] == 2  # the stream of 3 epochs was used up: the loader looped over the data


def test_val_split_reads_only_the_last_shard(shards):
    stream = expected_stream(shards[-1:])
    inputs, targets, state = next(make_loader(2, 5, split="val"))
    assert inputs.flatten().tolist() == stream[:10]
    assert state["shard_index"] == 0  # indexes the val split's shards


def test_two_loaders_yield_identical_batches(shards):
    a, b = make_loader(), make_loader(tokenizer_batch_size=5)  # tokenizer batching must not matter
    for (xa, ya, sa), (xb, yb, sb) in zip(take(a, 20), take(b, 20)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and sa == sb


@pytest.mark.parametrize("B,T", [(1, 3), (2, 5), (3, 16)])
def test_resume_after_every_batch_continues_exactly(shards, B, T):
    num = int(1.3 * len(expected_stream(shards[:-1], epochs=1)) / (B * T)) + 4  # past the first epoch
    reference = take(make_loader(B, T), num)
    positions = set()
    for k in range(1, num - 3):
        state = reference[k - 1][2]
        positions.add((state["epoch"], state["shard_index"], state["row_group_index"], state["token_offset"] > 0))
        resumed = make_loader(B, T, loader_state=dict(state), tokenizer_batch_size=3)
        for (x, y, s), (rx, ry, rs) in zip(reference[k:k + 3], take(resumed, 3)):
            assert torch.equal(x, rx) and torch.equal(y, ry) and s == rs
    # the resume points crossed row groups, shards and epochs, mid-document and at document starts
    assert len({p[1] for p in positions}) == 2 and len({p[2] for p in positions}) >= 4
    assert len({p[0] for p in positions}) >= 2 and True in {p[3] for p in positions}
    if B * T <= 10:  # small windows also end exactly at document starts (token_offset 0)
        assert False in {p[3] for p in positions}


def test_state_is_json_able_ints(shards):
    _, _, state = next(make_loader())
    assert all(type(v) is int for v in state.values())


def global_rows(make, B, world_size, n, **kwargs):
    """n batches of `make` (B=, rank=, world_size=, **kwargs) under world_size ranks, the ranks'
    (B, T) rows stacked rank after rank: [(inputs (B*W, T), targets (B*W, T), [state of each rank])].
    Also used by tests/test_chat_dataloader.py."""
    loaders = [make(B=B, rank=r, world_size=world_size, **kwargs) for r in range(world_size)]
    out = []
    for _ in range(n):
        batches = [next(loader) for loader in loaders]
        out.append((torch.cat([x for x, _, _ in batches]), torch.cat([y for _, y, _ in batches]),
                    [s for _, _, s in batches]))
    return out


@pytest.mark.parametrize("make", [make_loader, make_bestfit], ids=["stream", "bestfit"])
def test_every_world_size_trains_on_the_same_rows_in_the_same_order(shards, make):
    # one process with 4 rows per batch is the reference: 2 ranks x 2 rows and 4 ranks x 1 row must
    # hold the same rows, rank r the r-th block, and report the same (global) state on every rank
    reference = global_rows(make, 4, 1, 12)
    for B, world_size in ((2, 2), (1, 4)):
        for (x, y, states), (rx, ry, (rs,)) in zip(global_rows(make, B, world_size, 12), reference):
            assert x.shape == (B * world_size, x.shape[1])
            assert torch.equal(x, rx) and torch.equal(y, ry)
            assert all(s == rs for s in states)
    # 1 process x 2 accumulation steps of 2 rows reads the same rows as 2 processes x 2 rows
    loader = make(B=2)
    for rx, ry, _ in reference[:6]:
        (x1, y1, _), (x2, y2, _) = next(loader), next(loader)
        assert torch.equal(torch.cat([x1, x2]), rx) and torch.equal(torch.cat([y1, y2]), ry)


@pytest.mark.parametrize("make", [make_loader, make_bestfit], ids=["stream", "bestfit"])
def test_a_run_resumes_on_another_world_size(shards, make):
    reference = global_rows(make, 4, 1, 10)
    state = json.loads(json.dumps(reference[3][2][0]))  # after 4 batches of one process (a checkpoint)
    resumed = [make(B=2, rank=r, world_size=2, loader_state=dict(state)) for r in range(2)]
    for rx, ry, (rs,) in reference[4:]:
        (x0, y0, s0), (x1, y1, s1) = next(resumed[0]), next(resumed[1])
        assert torch.equal(torch.cat([x0, x1]), rx) and torch.equal(torch.cat([y0, y1]), ry) and s0 == s1 == rs


@pytest.mark.parametrize("make", [make_loader, make_bestfit], ids=["stream", "bestfit"])
def test_a_resume_state_of_the_old_per_rank_loader_is_refused(shards, make):
    _, _, state = next(make())
    with pytest.raises(ValueError, match="rank 1's of 2 from an older version"):
        next(make(loader_state={**state, "rank": 1, "world_size": 2}))
    next(make(loader_state={**state, "rank": 0, "world_size": 1}))  # one process read the same order then
    with pytest.raises(ValueError, match="lacks"):
        next(make(loader_state={"shard_index": 0}))


def test_resume_state_that_does_not_fit_the_data_is_refused(shards):
    _, _, state = next(make_loader())
    with pytest.raises(ValueError, match="token 10000, which does not exist"):
        next(make_loader(loader_state={**state, "token_offset": 10_000}))
    with pytest.raises(ValueError, match=r"document \(0, 0, 0, 99\)"):  # past the row group's documents
        next(make_loader(loader_state={**state, "row_group_index": 0, "doc_index": 99}))
    with pytest.raises(ValueError, match="does not exist"):  # past the shard's row groups
        next(make_loader(loader_state={**state, "row_group_index": 50}))
    with pytest.raises(ValueError, match="shards in base_data/ changed"):
        next(make_loader(loader_state={**state, "shard_index": 7}))


def test_shards_without_documents_are_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    (tmp_path / "base_data").mkdir()
    for shard in range(2):
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "base_data" / f"shard_{shard:05d}.parquet")
    with pytest.raises(ValueError, match="hold no documents"):
        next(make_loader())


def test_no_shards_names_the_dataset_command(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset --offline"):
        next(make_loader())


def test_single_shard_has_val_but_no_train(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    make_shards(tmp_path, num_shards=1)
    assert next(make_loader(split="val"))[0].shape == (2, 5)
    with pytest.raises(FileNotFoundError, match="at least 2 shards"):
        next(make_loader(split="train"))
    with pytest.raises(ValueError, match="'train' or 'val'"):
        next(make_loader(split="test"))


def test_without_state_yields_pairs(shards):
    pairs = take(without_state(make_loader()), 2)
    triples = take(make_loader(), 2)
    for (x, y), (tx, ty, _) in zip(pairs, triples):
        assert torch.equal(x, tx) and torch.equal(y, ty)


def test_real_tokenizer_prepends_bos_to_every_document(shards, tmp_path):
    from nanochat.tokenizer import RustBPETokenizer
    docs = [doc for groups in shards[:-1] for group in groups for doc in group]
    tokenizer = RustBPETokenizer.train_from_iterator(iter(docs * 3), 300)
    tokenizer.save(str(tmp_path / "tokenizer"))  # the loader's default: $NANOCHAT_BASE_DIR/tokenizer
    bos = tokenizer.get_bos_token_id()
    stream = []
    for doc in docs:
        stream += [bos] + tokenizer.encode(doc)
    loader = make_loader(2, 8, tokenizer=None, tokenizer_threads=2)
    got = []
    while len(got) < len(stream):
        got += next(loader)[0].flatten().tolist()
    assert got[:len(stream)] == stream


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_match_cpu_batches(shards):
    cpu = take(make_loader(), 5)
    gpu = take(tokenizing_distributed_data_loader(2, 5, "train", device="cuda", tokenizer=ByteTokenizer(),
                                                  rank=0, world_size=1, tokenizer_batch_size=2), 5)
    for (x, y, s), (gx, gy, gs) in zip(cpu, gpu):
        assert gx.device.type == "cuda" and torch.equal(x, gx.cpu()) and torch.equal(y, gy.cpu()) and s == gs


# ---- BOS-aligned best-fit packing ------------------------------------------------------------

def split_documents(row):
    """A row's tokens cut at every BOS: the documents (or crops) it holds."""
    docs = []
    for token in row:
        if token == BOS:
            docs.append([])
        docs[-1].append(token)
    return docs


def test_bestfit_rows_start_with_bos_and_hold_whole_documents_but_the_last(shards):
    B, T = 2, 16
    whole = {tuple([BOS] + list(doc.encode("utf-8"))) for groups in shards[:-1] for group in groups for doc in group}
    cropped = 0
    for inputs, targets, _ in take(make_bestfit(B, T), 12):
        assert inputs.shape == targets.shape == (B, T) and inputs.dtype == torch.long
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets: the next token of the same row
        for b in range(B):
            row = inputs[b].tolist() + [targets[b, -1].item()]  # the T + 1 tokens of the row
            assert row[0] == BOS  # every row starts at a document boundary
            docs = split_documents(row)
            assert all(tuple(d) in whole for d in docs[:-1])  # only the row's last document may be cropped
            last = tuple(docs[-1])
            assert last in whole or any(doc[:len(last)] == last for doc in whole)
            cropped += last not in whole
    assert cropped > 0  # these documents (up to 29 tokens) do not all fit 17-token rows whole


def test_bestfit_packs_the_longest_fitting_document_first(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    (tmp_path / "base_data").mkdir()
    texts = ["a" * 3, "b" * 9, "c" * 5, "d" * 30, "e" * 2]
    for shard in range(2):
        pq.write_table(pa.table({"text": texts}), tmp_path / "base_data" / f"shard_{shard:05d}.parquet")
    loader = make_bestfit(B=2, T=15, pool_size=5, tokenizer_batch_size=5)
    inputs, targets, _ = next(loader)
    rows = [[chr(d[1]) * (len(d) - 1) for d in split_documents(inputs[b].tolist() + [targets[b, -1].item()])]
            for b in range(2)]
    # 16 tokens per row. Row 1: b (10 with BOS) + c (6), exactly full. Row 2, pool a d e + the next
    # epoch's a b c d e: b (10), then c (6) again: the longest that fits, nothing cropped
    assert rows == [["b" * 9, "c" * 5], ["b" * 9, "c" * 5]]
    inputs, targets, _ = next(loader)
    row = inputs[0].tolist() + [targets[0, -1].item()]
    # pool a d e a d e (+ a b c d e): no b/c left to fit exactly: a (4) + a (4) + e (3) + e (3) = 14,
    # then nothing of <= 2 tokens fits, so the earliest-read document (d) is cropped to 2
    assert [chr(d[1]) for d in split_documents(row)] == ["a", "a", "e", "e", "d"]


def test_bestfit_resumes_exactly_from_any_batch(shards):
    reference = take(make_bestfit(), 14)
    for k in (1, 5, 9):
        state = json.loads(json.dumps(reference[k - 1][2]))  # a checkpoint stores it as JSON
        resumed = take(make_bestfit(loader_state=state), 14 - k)
        for (a_in, a_tg, a_state), (b_in, b_tg, b_state) in zip(reference[k:], resumed):
            assert torch.equal(a_in, b_in) and torch.equal(a_tg, b_tg) and a_state == b_state


def test_bestfit_resume_state_from_elsewhere_is_refused(shards):
    state = take(make_bestfit(), 3)[-1][2]
    with pytest.raises(ValueError, match="lacks"):
        next(make_bestfit(loader_state={k: v for k, v in state.items() if k != "pool"}))
    with pytest.raises(ValueError, match="do not exist"):
        next(make_bestfit(loader_state=dict(state, doc_index=999)))  # the shards changed under the checkpoint
    with pytest.raises(ValueError, match="only 2"):
        next(make_bestfit(loader_state=dict(state, shard_index=7)))
