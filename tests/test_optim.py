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
from nanochat.muon import DistMuon, Muon, normalize_neurons, orthogonalization_dtype, orthogonalize


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


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (256, 640)])
def test_polar_express_lands_closer_to_one_than_newton_schulz(shape):
    torch.manual_seed(0)
    G = torch.randn(shape)
    spread = {}
    for method in ("newton_schulz", "polar_express"):
        s = torch.linalg.svdvals(orthogonalize(G, method=method, dtype=torch.float32))
        spread[method] = (s - 1).abs().max().item()
    # measured: Newton–Schulz 0.25-0.32 from 1, Polar Express under 0.1
    assert spread["polar_express"] < 0.15 < spread["newton_schulz"]


def test_orthogonalize_refuses_unknown_methods_and_too_many_polar_express_steps():
    with pytest.raises(ValueError, match="pick one of newton_schulz, polar_express"):
        orthogonalize(torch.randn(4, 4), method="svd")
    with pytest.raises(ValueError, match="coefficients for 5 steps"):
        orthogonalize(torch.randn(4, 4), steps=6, method="polar_express")


def test_orthogonalization_runs_in_fp32_on_a_cpu_without_amx(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert orthogonalization_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert orthogonalization_dtype(torch.device("cpu")) == torch.bfloat16


def test_normalize_neurons_keeps_the_update_norm_and_evens_out_the_neurons():
    torch.manual_seed(0)
    U = torch.randn(2, 64, 16) * torch.linspace(0.1, 3.0, 64)[:, None]  # rows of very different size
    moment = torch.zeros(2, 64, 1)
    V = normalize_neurons(U, moment, beta2=0.0)  # beta2 0: the moment is this update's row mean square
    torch.testing.assert_close(V.norm(dim=(-2, -1)), U.norm(dim=(-2, -1)))
    row_rms = V.square().mean(dim=-1).sqrt()  # (2, 64)
    assert torch.all(row_rms.amax(-1) / row_rms.amin(-1) < 1.001)  # every neuron of a matrix moves by the same RMS
    wide = torch.randn(1, 8, 32)
    moment = torch.zeros(1, 1, 32)  # neurons along the longer side: columns here
    normalize_neurons(wide, moment, beta2=0.9)
    torch.testing.assert_close(moment, 0.1 * wide.square().mean(dim=-2, keepdim=True))


def test_cautious_weight_decay_only_decays_where_update_and_weight_agree():
    def one_step(weight_decay):
        torch.manual_seed(1)
        W = torch.nn.Parameter(torch.randn(16, 32))
        start = W.detach().clone()
        W.grad = torch.randn(16, 32)
        Muon([W], lr=0.1, weight_decay=weight_decay).step()
        return start, W.detach()
    start, plain = one_step(0.0)
    _, decayed = one_step(0.5)
    update = (start - plain) / 0.1  # the orthogonalised update the step subtracted
    agree = (update * start) >= 0
    decay = plain - decayed
    torch.testing.assert_close(decay[agree], 0.1 * 0.5 * start[agree])
    assert torch.all(decay[~agree] == 0) and 0 < agree.float().mean() < 1


def regression_loss(W, X, Y):
    return ((X @ W.T - Y) ** 2).mean()


@pytest.mark.parametrize("make_opt", [
    lambda p: Muon([p], lr=0.02),
    lambda p: Muon([p], lr=0.02, orthogonalizer="polar_express", normuon_beta2=0.9, weight_decay=0.01),
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


MUON_OPTIONS = [dict(), dict(orthogonalizer="polar_express", normuon_beta2=0.9, weight_decay=0.2)]


def train_toy(rank, distributed, muon_options):
    """STEPS steps of AdamW and Muon (with muon_options) on the toy params with given gradients."""
    adam_params, muon_params = make_toy_params()
    adam_cls, muon_cls = (DistAdamW, DistMuon) if distributed else (torch.optim.AdamW, Muon)
    # eps=0.5 makes AdamW's update depend on the gradient's scale (with a tiny eps it is nearly
    # scale-free), so summing instead of averaging across ranks would fail the comparison
    optimizers = [adam_cls(adam_params, lr=0.05, betas=(0.8, 0.95), eps=0.5, weight_decay=0.1),
                  muon_cls(muon_params, lr=0.05, momentum=0.9, **muon_options)]
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
        results = dict(toy=[p for options in MUON_OPTIONS for p in train_toy(rank, True, options)],
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
    single = [p for options in MUON_OPTIONS for p in train_toy(None, False, options)]
    for got, want in zip(rank0["toy"], single):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # same grads: same update
    # half-batch grads averaged == full-batch grads up to fp32 rounding, which Muon's bf16
    # Newton–Schulz turns into rare differences (measured 4.7e-4 at most; a wrong shard or a
    # missing reduction moves elements by ~lr = 2e-2)
    for got, want in zip(rank0["gpt"], train_gpt_one_step(slice(0, 4), distributed=False)):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
