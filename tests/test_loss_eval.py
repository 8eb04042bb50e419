"""Tests for nanochat/loss_eval.py: bits per byte on hand-computed examples, across ranks, and the progress line."""

import math
import os
import re
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nanochat.loss_eval import evaluate_bpb


class FixedLossModel:
    """Per-token loss = LOSSES[target] regardless of the inputs (and 50.0 for target -1, which must be masked)."""

    LOSSES = torch.tensor([100.0, 1.0, 1.5, 2.0])  # token 0 is a special token: its loss must not count

    def __call__(self, inputs, targets, loss_reduction="mean"):
        assert loss_reduction == "none"
        return torch.where(targets >= 0, self.LOSSES[targets.clamp(min=0)], 50.0)  # (B, T)


class BigramModel(torch.nn.Module):
    """A real model: logits = table[input]; returns per-token cross entropy like GPT does."""

    def __init__(self, vocab_size):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab_size, vocab_size))

    def forward(self, inputs, targets, loss_reduction="mean"):
        logits = self.table[inputs]  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction=loss_reduction)


TOKEN_BYTES = torch.tensor([0, 1, 2, 3], dtype=torch.int32)


def test_bpb_hand_computed_excludes_special_and_ignored_targets():
    inputs = torch.zeros(2, 3, dtype=torch.long)
    targets = torch.tensor([[1, 0, 3], [-1, 2, 2]])
    # counted: 1 (1 byte, 1.0 nat), 3 (3 bytes, 2.0), 2 (2 bytes, 1.5) twice; 0 is special, -1 ignored
    expected = (1.0 + 2.0 + 1.5 + 1.5) / (math.log(2) * (1 + 3 + 2 + 2))
    bpb = evaluate_bpb(FixedLossModel(), iter([(inputs, targets)]), 1, TOKEN_BYTES)
    assert bpb == pytest.approx(expected, rel=1e-12)


def test_bpb_sums_over_steps_before_dividing():
    x = torch.zeros(1, 2, dtype=torch.long)
    batches = iter([(x, torch.tensor([[1, 1]])), (x, torch.tensor([[3, 3]])), (x, torch.tensor([[2, 2]]))])
    # two steps only: nats 1+1+2+2 = 6 over bytes 1+1+3+3 = 8 (a mean of per-step bpb would differ)
    bpb = evaluate_bpb(FixedLossModel(), batches, 2, TOKEN_BYTES)
    assert bpb == pytest.approx(6 / (math.log(2) * 8), rel=1e-12)
    assert next(batches)[1].tolist() == [[2, 2]]  # the third batch was not taken


def test_bpb_matches_manual_log_softmax_on_a_real_model():
    torch.manual_seed(0)
    vocab = 7
    token_bytes = torch.tensor([0, 1, 2, 3, 1, 4, 2], dtype=torch.int32)  # token 0 special
    model = BigramModel(vocab)
    batches = [(torch.randint(0, vocab, (2, 5)), torch.randint(-1, vocab, (2, 5))) for _ in range(3)]
    nats, num_bytes = 0.0, 0
    for x, y in batches:
        logp = torch.log_softmax(model.table[x].double(), dim=-1)  # (B, T, V)
        for b in range(y.size(0)):
            for t in range(y.size(1)):
                target = y[b, t].item()
                if target >= 0 and token_bytes[target] > 0:
                    nats -= logp[b, t, target].item()
                    num_bytes += token_bytes[target].item()
    assert num_bytes > 0
    bpb = evaluate_bpb(model, iter(batches), 3, token_bytes)
    assert bpb == pytest.approx(nats / (math.log(2) * num_bytes), rel=1e-5)


def test_bpb_of_the_gpt_matches_its_logits():
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    token_bytes = torch.randint(0, 4, (300,), dtype=torch.int32)
    x, y = torch.randint(0, 300, (2, 8)), torch.randint(-1, 300, (2, 8))
    with torch.no_grad():
        nats = F.cross_entropy(model(x).flatten(0, 1).double(), y.flatten(), ignore_index=-1, reduction="none")
    counted = (y.flatten() >= 0) & (token_bytes[y.flatten().clamp(min=0)] > 0)
    expected = nats[counted].sum().item() / (math.log(2) * token_bytes[y.flatten()[counted]].sum().item())
    assert evaluate_bpb(model, iter([(x, y)]), 1, token_bytes) == pytest.approx(expected, rel=1e-5)


def test_bpb_is_the_same_for_a_coarser_tokenization_of_equal_probability():
    # text "abab": byte tokens a, b with 0.5 nats each, or one token "ab" with 1.0 nat: same bpb
    class PerTokenLoss:
        def __init__(self, losses):
            self.losses = losses

        def __call__(self, inputs, targets, loss_reduction="mean"):
            return self.losses[targets]

    fine = evaluate_bpb(PerTokenLoss(torch.tensor([0.0, 0.5, 0.5])), iter([(None, torch.tensor([[1, 2, 1, 2]]))]), 1,
                        torch.tensor([0, 1, 1]))
    coarse = evaluate_bpb(PerTokenLoss(torch.tensor([0.0, 1.0])), iter([(None, torch.tensor([[1, 1]]))]), 1,
                          torch.tensor([0, 2]))
    assert fine == pytest.approx(coarse) == pytest.approx(4 * 0.5 / (math.log(2) * 4))


def test_bpb_errors():
    x = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="ran out after 1 of 2"):
        evaluate_bpb(FixedLossModel(), iter([(x, torch.tensor([[1, 2]]))]), 2, TOKEN_BYTES)
    with pytest.raises(ValueError, match="no target had any bytes"):
        evaluate_bpb(FixedLossModel(), iter([(x, torch.tensor([[0, -1]]))]), 1, TOKEN_BYTES)
    with pytest.raises(ValueError, match="steps must be positive"):
        evaluate_bpb(FixedLossModel(), iter([]), 0, TOKEN_BYTES)


def test_a_long_evaluation_prints_its_progress(capsys):
    x = torch.zeros(1, 2, dtype=torch.long)
    batches = [(x, torch.tensor([[1, 2]]))] * 4
    quiet = evaluate_bpb(FixedLossModel(), iter(batches), 4, TOKEN_BYTES)  # fast: nothing printed
    assert capsys.readouterr().out == ""
    # progress_every_s=0: a line after every batch but the last
    loud = evaluate_bpb(FixedLossModel(), iter(batches), 4, TOKEN_BYTES, progress_every_s=0)
    lines = capsys.readouterr().out.splitlines()
    assert loud == quiet
    assert [line.split(" | ")[0] for line in lines] == [f"evaluate_bpb: {i}/4 batches ({25 * i}%)" for i in (1, 2, 3)]
    assert all(re.search(r"\| \d+s \| eta \d+s$", line) for line in lines), lines


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bpb_worker(rank, world_size, port, batches, result_queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        bpb = evaluate_bpb(FixedLossModel(), iter(batches[rank::world_size]), len(batches) // world_size, TOKEN_BYTES)
        result_queue.put((rank, bpb))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_bpb_all_reduces_sums_across_ranks():
    x = torch.zeros(1, 3, dtype=torch.long)
    # rank 0 gets cheap long tokens, rank 1 costly short ones: a mean of per-rank bpb would be wrong
    batches = [(x, torch.tensor([[3, 3, 3]])), (x, torch.tensor([[1, 1, 0]])),
               (x, torch.tensor([[3, 2, -1]])), (x, torch.tensor([[1, 1, 1]]))]
    single = evaluate_bpb(FixedLossModel(), iter(batches), 4, TOKEN_BYTES)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.spawn(_bpb_worker, args=(2, _free_port(), batches, queue), nprocs=2, join=True)
    results = dict(queue.get(timeout=30) for _ in range(2))
    assert results[0] == pytest.approx(single, rel=1e-12)
    assert results[1] == pytest.approx(single, rel=1e-12)
