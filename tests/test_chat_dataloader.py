"""Tests for nanochat/chat_dataloader.py: the global row order (any world size and accumulation
split trains on the same rows per step) and exact resume, with a byte-level stand-in tokenizer."""

import json

import pytest
import torch

from nanochat.chat_dataloader import packed_conversation_loader, sft_batches
from test_dataloader import global_rows

PAD = 300


class ChatTokenizer:
    """render_conversation: <|bos|> (256), then the user's bytes (mask 0) and the assistant's (mask 1)."""

    def render_conversation(self, conversation, max_tokens=None):
        user, assistant = (m["content"].encode("utf-8") for m in conversation["messages"])
        ids = [256] + list(user) + list(assistant)
        mask = [0] * (1 + len(user)) + [1] * len(assistant)
        return ids[:max_tokens], mask[:max_tokens]

    def encode_special(self, name):
        assert name == "<|assistant_end|>"
        return PAD


DATASET = [{"messages": [{"role": "user", "content": f"q{i}" + "?" * (i % 5)},
                         {"role": "assistant", "content": f"a{i}" + "!" * (i % 7)}]} for i in range(23)]


def packed(B, rank=0, world_size=1, loader_state=None):
    return packed_conversation_loader(ChatTokenizer(), DATASET, B, 8, "cpu", rank, world_size, loader_state)


def sft(B, rank=0, world_size=1, loader_state=0):
    return sft_batches(ChatTokenizer(), DATASET, B, 64, "cpu", rank, world_size, loader_state)


def test_packed_rows_are_the_same_on_every_world_size():
    reference = global_rows(packed, 4, 1, 15)  # past an epoch: 23 conversations, ~15 tokens each
    assert reference[-1][2][0]["epoch"] >= 1
    for B, world_size in ((2, 2), (1, 4)):
        for (x, y, states), (rx, ry, (rs,)) in zip(global_rows(packed, B, world_size, 15), reference):
            assert torch.equal(x, rx) and torch.equal(y, ry) and all(s == rs for s in states)
    assert (reference[0][1] == -1).any() and (reference[0][1] >= 0).any()  # user tokens masked, assistant kept


def test_packed_resumes_on_another_world_size():
    reference = global_rows(packed, 4, 1, 12)
    state = json.loads(json.dumps(reference[4][2][0]))
    for (x, y, states), (rx, ry, (rs,)) in zip(global_rows(packed, 2, 2, 7, loader_state=state), reference[5:]):
        assert torch.equal(x, rx) and torch.equal(y, ry) and all(s == rs for s in states)


def test_sft_conversations_are_the_same_on_every_world_size():
    # 2 ranks x 2 conversations per batch vs 1 process x 2 accumulation steps of 2: rank r's batch
    # is the single process's r-th micro-batch of the step, padding included, and the states agree
    ranks = [sft(2, rank, 2) for rank in range(2)]
    single = sft(2)
    for _ in range(10):
        for rank in range(2):
            x, y, used = next(ranks[rank])
            sx, sy, single_used = next(single)
            assert torch.equal(x, sx) and torch.equal(y, sy)
        assert used == single_used
    assert used == 40 > len(DATASET)  # it looped over the mixture


def test_sft_resumes_on_another_world_size():
    single = sft(2)
    batches = [next(single) for _ in range(12)]
    used = batches[5][2]  # a checkpoint after 6 batches of one process
    ranks = [sft(1, rank, 2, loader_state=used) for rank in range(2)]
    for x, y, state in batches[6:]:  # now 2 processes x 1 conversation: the same pairs of conversations
        (x0, y0, s0), (x1, y1, s1) = next(ranks[0]), next(ranks[1])
        assert s0 == s1 == state
        for got, want, pad in ((x0, x[:1], PAD), (x1, x[1:], PAD), (y0, y[:1], -1), (y1, y[1:], -1)):
            assert torch.equal(got, want[:, :got.shape[1]])  # a batch of one has no padding
            assert (want[:, got.shape[1]:] == pad).all()


@pytest.mark.parametrize("make", [packed, sft])
def test_an_empty_mixture_is_an_error(make):
    global DATASET
    saved, DATASET = DATASET, []
    try:
        with pytest.raises(ValueError, match="empty"):
            next(make(2))
    finally:
        DATASET = saved
