"""Tests for nanochat/gpt.py: sizes, FLOPs, masking, KV-cache equivalence, loss and logits."""

import copy
import math

import pytest
import torch

from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig, padded_vocab_size


def build(config, seed=0):
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    return model


def meta_model(config):
    with torch.device("meta"):
        return GPT(config)


def randomize_residual_projections(model, seed=1):
    """init_weights zeroes c_proj, which would make every block the identity; give them values
    so the tests below see real attention/MLP outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.transformer.h:
            for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(w.size(1)))
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g) * 0.5)


def expected_params(config):
    d, L = config.n_embd, config.n_layer
    head_dim = d // config.n_head
    v = padded_vocab_size(config.vocab_size)
    attn = d * config.n_head * head_dim * 2 + d * config.n_kv_head * head_dim * 2  # q, proj; k, v
    mlp = 8 * d * d
    return 2 * v * d + L * (attn + mlp)


TINY = GPTConfig(sequence_len=32, vocab_size=101, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
MODERN = GPTConfig(sequence_len=32, vocab_size=101, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, arch="modern")


def randomize_modern_parameters(model, seed=2):
    """Move the modern model's scalars and gates away from their init, so a wrong index
    (layer i reading layer j's lambda or value embedding) changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.resid_lambdas.copy_(0.5 + torch.rand(model.config.n_layer, generator=g))
        model.x0_lambdas.copy_(torch.rand(model.config.n_layer, generator=g))
        for block in model.transformer.h:
            if block.attn.ve_gate is not None:
                block.attn.ve_gate.weight.copy_(torch.randn(block.attn.ve_gate.weight.shape, generator=g))


@pytest.mark.parametrize("depth", [1, 2, 4, 5, 8, 12])
def test_param_count_matches_closed_form(depth):
    config = GPTConfig.from_depth(depth, vocab_size=50000, sequence_len=256)
    assert config.n_embd == 64 * depth
    assert config.n_embd % config.n_head == 0 and config.n_embd // config.n_head <= 128
    assert meta_model(config).num_scaling_params() == expected_params(config)


def test_param_count_with_gqa_and_padding():
    assert padded_vocab_size(101) == 128
    assert meta_model(TINY).num_scaling_params() == expected_params(TINY)


def test_d20_is_561m_params():
    config = GPTConfig.from_depth(20, vocab_size=65536, sequence_len=2048)
    assert (config.n_embd, config.n_head, config.n_kv_head) == (1280, 10, 10)
    n = meta_model(config).num_scaling_params()
    assert abs(n - 561e6) / 561e6 < 0.005, n


def test_estimate_flops_formula():
    config = GPTConfig.from_depth(4, vocab_size=1000, sequence_len=128)
    model = meta_model(config)
    non_embedding = model.num_scaling_params() - model.transformer.wte.weight.numel()
    attention = 12 * config.n_layer * config.n_head * (config.n_embd // config.n_head) * config.sequence_len
    assert model.estimate_flops() == 6 * non_embedding + attention


def test_causal_future_tokens_do_not_change_past_logits():
    model = build(TINY)
    randomize_residual_projections(model)
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, TINY.vocab_size, (2, 6))
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("config", [TINY, MODERN], ids=["classic", "modern"])
def test_kv_cache_decoding_matches_full_forward(config):
    model = build(config)
    randomize_residual_projections(model)
    if config.arch == "modern":
        randomize_modern_parameters(model)
    idx = torch.randint(0, config.vocab_size, (3, 20))
    full = model(idx)  # (3, 20, V)
    cache = KVCache(num_slots=3, num_layers=config.n_layer, capacity=8)  # small: forces growth
    pieces = [model(idx[:, :12], kv_cache=cache)]  # prefill
    pieces.append(model(idx[:, 12:15], kv_cache=cache))  # a chunk of 3 after the prefix
    for t in range(15, 20):  # then single tokens
        pieces.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.lengths == [20, 20, 20]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_rows_at_different_positions_match_their_full_forwards():
    """Continuous batching: slots holding prefixes of different lengths decode one token each in
    one forward (per-row rotary positions and masks), and a copied slot continues independently."""
    model = build(TINY)
    randomize_residual_projections(model)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, TINY.vocab_size, (1, n), generator=g) for n in (9, 4, 13)]
    cache = KVCache(4, TINY.n_layer, 16)
    for slot, prompt in enumerate(prompts):  # each prefilled alone into its own slot
        cache.select(slot, 1)
        model(prompt, kv_cache=cache)
    cache.copy_slot(1, 3)
    prompts.append(prompts[1])
    nxt = torch.tensor([[3], [7], [5], [1]])
    cache.select(0, 4)
    for _ in range(2):  # two ragged decode steps
        got = model(nxt, kv_cache=cache)[:, 0]  # (4, V)
        prompts = [torch.cat([p, n[None]], dim=1) for p, n in zip(prompts, nxt)]
        want = torch.cat([model(p)[:, -1] for p in prompts])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        nxt = got.argmax(-1, keepdim=True)
    assert cache.lengths == [11, 6, 15, 6]


def test_last_only_gives_the_last_position_s_logits():
    model = build(TINY)
    randomize_residual_projections(model)
    idx = torch.randint(0, TINY.vocab_size, (2, 7))
    last = model(idx, last_only=True)
    assert last.shape == (2, 1, TINY.vocab_size)
    torch.testing.assert_close(last, model(idx)[:, -1:], atol=1e-6, rtol=1e-6)


def test_loss_ignores_minus_one_targets_and_reductions_agree():
    model = build(TINY)
    randomize_residual_projections(model)
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    targets = torch.randint(0, TINY.vocab_size, (2, 8))
    targets[0, :3] = -1
    per_pos = model(idx, targets, loss_reduction="none")
    assert per_pos.shape == (2, 8)
    assert torch.all(per_pos[0, :3] == 0) and torch.all(per_pos[0, 3:] > 0)
    valid = targets != -1
    torch.testing.assert_close(model(idx, targets, loss_reduction="sum"), per_pos.sum())
    torch.testing.assert_close(model(idx, targets), per_pos.sum() / valid.sum())
    # the ignored positions' targets do not matter
    other = targets.clone()
    other[0, :3] = -1
    other[1, 0] = -1
    torch.testing.assert_close(model(idx, other, loss_reduction="none")[0], per_pos[0])
    # and the mean equals the cross-entropy of the returned logits
    logits = model(idx)
    ce = torch.nn.functional.cross_entropy(logits[valid], targets[valid])
    torch.testing.assert_close(model(idx, targets), ce)


def test_logits_have_vocab_size_columns_in_fp32_and_softcap_bounds_them():
    model = build(TINY)
    randomize_residual_projections(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)  # huge raw logits: only the cap keeps them in range
    logits = model(torch.randint(0, TINY.vocab_size, (2, 8)))
    assert logits.shape == (2, 8, TINY.vocab_size) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0
    assert logits.abs().max() > 14.0


def test_initial_loss_is_uniform_over_vocab():
    model = build(TINY)
    idx = torch.randint(0, TINY.vocab_size, (4, 16))
    loss = model(idx, idx)
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.05


def test_meta_build_then_to_empty_then_init_weights():
    with torch.device("meta"):
        model = GPT(TINY)
    model.to_empty(device="cpu")
    model.init_weights()
    reference = build(TINY)
    torch.testing.assert_close(model.cos, reference.cos)
    assert torch.all(model.transformer.h[0].attn.c_proj.weight == 0)
    assert abs(model.transformer.wte.weight.std().item() - 1.0) < 0.1
    assert torch.isfinite(model(torch.zeros(1, 4, dtype=torch.long))).all()


def test_init_scales_set_the_embedding_std_and_the_mlp_input_bound_only():
    config = GPTConfig.from_depth(4, vocab_size=4096, sequence_len=64)
    default = build(config)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights(wte_init_std=0.8, fc_init_scale=0.4)  # upstream nanochat's 2026 values
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.8, rel=0.01)
    assert default.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.01)
    for block, default_block in zip(model.transformer.h, default.transformer.h):
        fc, bound = block.mlp.c_fc.weight, math.sqrt(3 / config.n_embd)
        assert fc.abs().max().item() <= 0.4 * bound and fc.std().item() == pytest.approx(0.4 / math.sqrt(config.n_embd), rel=0.02)
        assert default_block.mlp.c_fc.weight.abs().max().item() > 0.99 * bound
        assert block.attn.c_q.weight.std().item() == pytest.approx(1 / math.sqrt(config.n_embd), rel=0.02)


@pytest.mark.parametrize("config", [TINY, MODERN], ids=["classic", "modern"])
def test_backward_reaches_every_parameter(config):
    model = build(config)
    randomize_residual_projections(model)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    model(idx, idx).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_setup_optimizers_groups_and_initial_lr():
    config = GPTConfig.from_depth(4, vocab_size=200, sequence_len=32)  # n_embd 256
    model = build(config)
    adamw, muon = model.setup_optimizers()
    scale = (256 / 768) ** -0.5
    assert sorted(g["lr"] for g in adamw.param_groups) == pytest.approx(sorted([0.004 * scale, 0.2 * scale]))
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    adam_params = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert muon_params.isdisjoint(adam_params)
    assert len(muon_params) + len(adam_params) == len(list(model.parameters()))
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    for opt in (adamw, muon):
        for g in opt.param_groups:
            assert g["initial_lr"] == g["lr"]


def test_sequence_longer_than_rotary_tables_raises():
    model = build(GPTConfig(sequence_len=2, vocab_size=16, n_layer=1, n_head=1, n_kv_head=1, n_embd=8))
    with pytest.raises(ValueError, match="rotary"):
        model(torch.zeros(1, 21, dtype=torch.long))


# bf16 autocast (the GPU default), run here with CPU autocast. bf16 keeps 8 significant bits
# (relative rounding 2^-9 ~ 0.2%) and autocast rounds every matmul's inputs to it: on TINY's
# logits (|logit| up to ~12) bf16 and fp32 differ by ~0.11 (measured); 0.25 allows ~2x that, and
# is still a small fraction of the softcap's [-15, 15] range.
BF16_VS_FP32_ATOL = 0.25


def test_rotary_tables_stay_fp32_and_bf16_autocast_rotates_in_bf16():
    """The tables are fp32 on every device, so an fp32 run (a GPU older than Ampere, or chat_cli
    --dtype float32 on CUDA) is fp32 throughout: the bf16 tables this model used to keep on CUDA
    moved an fp32 run's logits by ~1e-2 where fp32 rounding moves them by ~1e-6. Under bf16
    autocast forward rounds them to bf16 once and q/k are rotated in bf16, as on the GPU."""
    model = build(TINY)
    randomize_residual_projections(model)
    assert model.cos.dtype == model.sin.dtype == torch.float32
    idx = torch.randint(0, TINY.vocab_size, (2, TINY.sequence_len))
    with torch.no_grad():
        fp32 = model(idx)
        fp64 = copy.deepcopy(model).double()(idx)  # everything in float64, tables included
        torch.testing.assert_close(fp32, fp64.float(), atol=1e-4, rtol=0)
        bf16_tables = copy.deepcopy(model)
        bf16_tables.cos, bf16_tables.sin = model.cos.bfloat16(), model.sin.bfloat16()
        assert (bf16_tables(idx) - fp32).abs().max() > 1e-3  # why the fp32 path needs fp32 tables
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(idx)
            assert torch.equal(bf16, bf16_tables(idx))  # rotation in bf16: the GPU's numbers on the CPU
    torch.testing.assert_close(bf16, fp32, atol=BF16_VS_FP32_ATOL, rtol=0)


def test_bf16_autocast_logits_are_softcapped_in_fp32():
    """Under bf16 autocast lm_head's matmul runs in bf16, and its output is upcast before the
    softcap: the logits are fp32 values (not bf16 ones), exactly 15*tanh(x/15) of the bf16 matmul's
    output, inside (-15, 15). The loss is the fp32 cross entropy of those logits, within 0.5% of fp32's."""
    model = build(TINY)
    randomize_residual_projections(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # raw logits past the cap, where a bf16 tanh would round to 15
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    raw = []
    model.lm_head.register_forward_hook(lambda module, args, out: raw.append(out))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        loss = model(idx, idx)
    assert raw[0].dtype == torch.bfloat16 and logits.dtype == torch.float32 and loss.dtype == torch.float32
    capped = GPT.softcap * torch.tanh(raw[0][..., :TINY.vocab_size].float() / GPT.softcap)
    assert torch.equal(logits, capped)
    assert not torch.equal(logits, logits.bfloat16().float())  # the cap's output is not rounded to bf16
    assert logits.abs().max() < GPT.softcap and (raw[0].abs() > 3 * GPT.softcap).any()
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), idx.view(-1)))
    with torch.no_grad():
        fp32_loss = model(idx, idx).item()
    assert loss.item() == pytest.approx(fp32_loss, rel=5e-3)  # measured 0.13%: bf16's rounding scale (2^-9 ~ 0.2%)


def test_modern_arch_has_value_embeddings_on_alternating_layers_ending_with_the_last():
    model = build(GPTConfig.from_depth(4, vocab_size=200, sequence_len=32, arch="modern"))
    assert sorted(model.value_embeds) == ["1", "3"]
    assert [b.attn.ve_gate is not None for b in model.transformer.h] == [False, True, False, True]
    assert model.value_embeds["3"].weight.shape == (padded_vocab_size(200), 256)  # (vocab, n_kv_head * head_dim)
    torch.testing.assert_close(model.resid_lambdas.data, torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05]))
    torch.testing.assert_close(model.x0_lambdas.data, torch.tensor([0.20, 0.15, 0.10, 0.05]))
    # value embeddings and scalars are lookups / elementwise: the FLOPs only gain the gates (12 x n_kv_head each)
    classic = build(GPTConfig.from_depth(4, vocab_size=200, sequence_len=32))
    assert model.estimate_flops() - classic.estimate_flops() == 6 * 2 * 12 * 2


def test_modern_arch_at_init_differs_from_classic_and_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="unknown --arch 'bogus'; pick one of classic, modern"):
        GPTConfig(arch="bogus")
    idx = torch.randint(0, 101, (1, 8))
    classic = build(TINY)
    modern = build(GPTConfig(**{**TINY.__dict__, "arch": "modern"}))
    assert not torch.allclose(classic(idx), modern(idx))


def test_setup_optimizers_puts_modern_parameters_in_their_adamw_groups():
    config = GPTConfig.from_depth(4, vocab_size=200, sequence_len=32, arch="modern")
    model = build(config)
    adamw, muon = model.setup_optimizers(embedding_lr=0.3, scalar_lr=0.5, adam_betas=(0.8, 0.96),
                                         embedding_betas=(0.8, 0.995), x0_beta1=0.96)
    scale = (256 / 768) ** -0.5
    groups = {tuple(id(p) for p in g["params"]): g for g in adamw.param_groups}
    assert groups[(id(model.resid_lambdas),)]["lr"] == pytest.approx(0.005)
    x0 = groups[(id(model.x0_lambdas),)]
    assert x0["lr"] == 0.5 and x0["betas"] == (0.96, 0.96)
    ve = groups[tuple(id(p) for p in model.value_embeds.parameters())]
    assert ve["lr"] == pytest.approx(0.15 * scale) and ve["betas"] == (0.8, 0.995)
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(model.transformer.h[1].attn.ve_gate.weight) not in muon_params  # a gate is tiny: AdamW
    assert len(muon_params) == 4 * 6
