"""Tests for nanochat/muon.py and nanochat/adamw.py: the Newton–Schulz property, that the
optimizers train, and that the distributed variants (2 gloo ranks) match one process."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.adamw import DistAdamW
from nanochat.gpt import GPT, GPTConfig
from nanochat.muon import DistMuon, Muon, orthogonalize


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (100, 37), (256, 640), (3, 48, 96)])
def test_newton_schulz_singular_values_near_one(shape):
    torch.manual_seed(0)
    G = torch.randn(shape) * 123.0  # the scale must not matter
    X = orthogonalize(G)
    assert X.shape == G.shape and X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.float())
    # measured: 0.67 to 1.15 for these shapes (the quintic trades exactness for speed)
    assert s.min() > 0.6 and s.max() < 1.25


@pytest.mark.parametrize("n", [64, 256])
def test_newton_schulz_keeps_singular_vectors_and_lifts_small_values(n):
    torch.manual_seed(0)
    U, _, Vh = torch.linalg.svd(torch.randn(n, n))
    S = torch.logspace(-3, 0, n)  # condition number 1000
    X = orthogonalize(U @ torch.diag(S) @ Vh).float()
    D = U.T @ X @ Vh.T  # diagonal if X = U f(S) V^T
    s = torch.diagonal(D)
    assert (D - torch.diag(s)).norm() / D.norm() < 0.15  # bf16 noise only (measured 0.06-0.08)
    assert s.max() < 1.25
    big = S >= 1e-2  # values down to 1% of the largest end in the band (measured >= 0.68)
    assert s[big].min() > 0.6


def regression_loss(W, X, Y):
    return ((X @ W.T - Y) ** 2).mean()


@pytest.mark.parametrize("make_opt", [
    lambda p: Muon([p], lr=0.02),
    lambda p: torch.optim.AdamW([p], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0),
])
def test_optimizers_reduce_a_regression_loss(make_opt):
    torch.manual_seed(0)
    X = torch.randn(256, 32)
    Y = X @ torch.randn(16, 32).T * 0.1
    W = torch.nn.Parameter(torch.zeros(16, 32))
    opt = make_opt(W)
    initial = regression_loss(W, X, Y).item()
    for _ in range(100):
        opt.zero_grad()
        regression_loss(W, X, Y).backward()
        opt.step()
    assert regression_loss(W, X, Y).item() < 0.1 * initial


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="AdamW"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_gpt_optimizers_overfit_one_batch():
    config = GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    optimizers = model.setup_optimizers()
    idx = torch.randint(0, 50, (4, 16))
    losses = []
    for _ in range(30):
        loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---- distributed == single process ----------------------------------------------------------

CONFIG = GPTConfig(sequence_len=16, vocab_size=70, n_layer=3, n_head=4, n_kv_head=2, n_embd=32)
STEPS = 3


def make_batch():
    g = torch.Generator().manual_seed(123)
    idx = torch.randint(0, CONFIG.vocab_size, (4, 17), generator=g)
    return idx[:, :-1], idx[:, 1:]


def make_toy_params():
    """Params that exercise the padding paths: odd dim 0 and a 1-D tensor for DistAdamW, shape
    groups of 3 and 1 matrices for DistMuon (so one rank owns nothing in a group)."""
    g = torch.Generator().manual_seed(7)
    adam = [torch.nn.Parameter(torch.randn(7, 3, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    muon = [torch.nn.Parameter(torch.randn(6, 4, generator=g)) for _ in range(3)]
    muon.append(torch.nn.Parameter(torch.randn(4, 9, generator=g)))
    return adam, muon


def toy_grad(p_index, shape, step, rank):
    """Rank `rank`'s gradient: small multiples of 1/8, so the average over ranks is exact in fp32
    and the single-process run (rank=None: the average) sees bit-identical gradients."""
    def one(r):
        g = torch.Generator().manual_seed(1000 * step + 10 * p_index + r)
        return torch.randint(-16, 17, shape, generator=g).float() / 8
    return one(rank) if rank is not None else (one(0) + one(1)) / 2


def train_toy(rank, distributed):
    """STEPS steps of AdamW and Muon on the toy params with given gradients."""
    adam_params, muon_params = make_toy_params()
    adam_cls, muon_cls = (DistAdamW, DistMuon) if distributed else (torch.optim.AdamW, Muon)
    # eps=0.5 makes AdamW's update depend on the gradient's scale (with a tiny eps it is nearly
    # scale-free), so summing instead of averaging across ranks would fail the comparison
    optimizers = [adam_cls(adam_params, lr=0.05, betas=(0.8, 0.95), eps=0.5, weight_decay=0.1),
                  muon_cls(muon_params, lr=0.05, momentum=0.9)]
    for step in range(STEPS):
        for i, p in enumerate(adam_params + muon_params):
            p.grad = toy_grad(i, p.shape, step, rank)
        optimizers[1].param_groups[0]["momentum"] = 0.85 + 0.05 * step  # the trainer's warmup pattern
        for opt in optimizers:
            opt.step()
    return [p.detach().clone() for p in adam_params + muon_params]


def train_gpt_one_step(rows, distributed):
    """One step of the GPT with setup_optimizers() on batch rows `rows`; returns the parameters.

    One step only: after that, AdamW at the embedding's lr (~1 at this width) turns fp32
    rounding differences between the half-batch and full-batch gradients into ~1e-2 changes,
    so multi-step exactness is checked on given gradients (train_toy) instead."""
    torch.manual_seed(0)
    model = GPT(CONFIG)
    model.init_weights()
    with torch.no_grad():  # non-zero residual projections, so every matrix gets a gradient
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.1)
            block.mlp.c_proj.weight.normal_(std=0.1)
    optimizers = model.setup_optimizers()
    assert isinstance(optimizers[0], DistAdamW) == distributed
    assert isinstance(optimizers[1], DistMuon) == distributed
    inputs, targets = make_batch()
    model(inputs[rows], targets[rows]).backward()
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())
    for opt in optimizers:
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def distributed_worker(rank, world_size, port, out_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = dict(toy=train_toy(rank, distributed=True),
                       gpt=train_gpt_one_step(slice(rank * 2, rank * 2 + 2), distributed=True))
        gathered = [None] * world_size
        dist.all_gather_object(gathered, results)
        if rank == 0:
            torch.save(gathered, out_path)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_dist_optimizers_on_two_gloo_ranks_match_single_process(tmp_path):
    out_path = tmp_path / "params.pt"
    mp.spawn(distributed_worker, args=(2, free_port(), str(out_path)), nprocs=2, join=True)
    rank0, rank1 = torch.load(out_path)
    for a, b in zip(rank0["toy"] + rank0["gpt"], rank1["toy"] + rank1["gpt"]):
        assert torch.equal(a, b)  # every rank holds identical parameters
    for got, want in zip(rank0["toy"], train_toy(None, distributed=False)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # same grads: same update
    # half-batch grads averaged == full-batch grads up to fp32 rounding, which Muon's bf16
    # Newton–Schulz turns into rare differences (measured 4.7e-4 at most; a wrong shard or a
    # missing reduction moves elements by ~lr = 2e-2)
    for got, want in zip(rank0["gpt"], train_gpt_one_step(slice(0, 4), distributed=False)):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
