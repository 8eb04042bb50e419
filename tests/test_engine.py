"""Tests for nanochat/engine.py: sampling, and Engine generation with the KV cache."""

import math
from contextlib import nullcontext

import pytest
import torch

from nanochat.engine import Engine, KVCache, sample_next_token
from nanochat.gpt import GPT, GPTConfig

VOCAB = 64
BOS, ASSISTANT_END = 62, 63


class TinyTokenizer:
    """Stand-in for RustBPETokenizer: only what Engine uses."""

    def __init__(self, bos=BOS, assistant_end=ASSISTANT_END):
        self.bos, self.assistant_end = bos, assistant_end

    def encode_special(self, name):
        return {"<|bos|>": self.bos, "<|assistant_end|>": self.assistant_end}[name]

    def get_bos_token_id(self):
        return self.bos


# stop ids outside the vocabulary: the model can never emit them, so rows run to max_tokens
NEVER_STOPS = TinyTokenizer(bos=1000, assistant_end=1001)


def build_model(seed=0, n_kv_head=1):
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=32)
    model = GPT(config)
    model.init_weights()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a peaked, position-dependent distribution instead of uniform logits
        for block in model.transformer.h:
            for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                w.copy_(torch.randn(w.shape, generator=g) / math.sqrt(w.size(1)))
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=g))
    return model.eval()


def test_sampling_is_deterministic_given_the_seed():
    logits = torch.randn(4, 50)
    draw = lambda seed: sample_next_token(logits, torch.Generator().manual_seed(seed), temperature=1.0)
    assert torch.equal(draw(1), draw(1))
    draws = torch.cat([draw(s) for s in range(20)], dim=1)
    assert len(set(draws.flatten().tolist())) > 4  # and different seeds do differ


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 30)
    out = sample_next_token(logits, torch.Generator().manual_seed(0), temperature=0.0)
    assert out.shape == (5, 1) and out.dtype == torch.long
    assert torch.equal(out[:, 0], logits.argmax(dim=-1))


def test_top_k_only_samples_the_k_largest():
    torch.manual_seed(0)
    logits = torch.randn(3, 40)
    allowed = logits.topk(5, dim=-1).indices
    rng = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        out = sample_next_token(logits, rng, temperature=2.0, top_k=5)
        assert all(out[i, 0] in allowed[i] for i in range(3))
        seen.update(out[0].tolist())
    assert len(seen) > 1
    assert torch.equal(sample_next_token(logits, rng, temperature=1.0, top_k=1)[:, 0], logits.argmax(-1))


def test_bad_sampling_arguments_raise():
    rng = torch.Generator()
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(torch.zeros(1, 3), rng, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        sample_next_token(torch.zeros(1, 3), rng, top_k=0)


def naive_greedy(model, tokens, n):
    """Greedy decoding by re-running the whole sequence each step (no cache)."""
    ids = list(tokens)
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(tokens):]


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_greedy_generation_with_cache_matches_naive_generation(n_kv_head):
    model = build_model(n_kv_head=n_kv_head)
    prompt = [BOS, 5, 9, 17, 3]
    engine = Engine(model, NEVER_STOPS)
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0.0)
    want = naive_greedy(model, prompt, 12)
    for row, mask in zip(results, masks):
        assert row == prompt + want
        assert mask == [0] * len(prompt) + [1] * 12


def test_stop_tokens_end_rows():
    model = build_model()
    prompt = [BOS, 1, 2]
    first = int(model(torch.tensor([prompt]))[0, -1].argmax())
    engine = Engine(model, TinyTokenizer(bos=BOS, assistant_end=first))  # greedy emits the stop at once
    steps = list(engine.generate(prompt, num_samples=3, max_tokens=10, temperature=0.0))
    assert steps == [([first] * 3, [1] * 3)]
    results, masks = engine.generate_batch(prompt, num_samples=3, max_tokens=10, temperature=0.0)
    assert results == [prompt] * 3 and masks == [[0] * 3] * 3  # the stop token is not kept


def test_rows_stop_independently_and_bos_stops_too():
    model = build_model()
    engine = Engine(model, TinyTokenizer())
    prompt = [BOS, 7]
    results, masks = engine.generate_batch(prompt, num_samples=16, max_tokens=40, temperature=3.0, seed=3)
    lengths = {len(r) for r in results}
    assert len(lengths) > 1  # rows end at different steps
    for row, mask in zip(results, masks):
        assert len(row) == len(mask) and row[:2] == prompt
        assert BOS not in row[2:] and ASSISTANT_END not in row[2:]
    steps = list(engine.generate(prompt, num_samples=16, max_tokens=40, temperature=3.0, seed=3))
    enders = [steps[len(row) - 2][0][i] for i, row in enumerate(results) if len(row) < 2 + 40]
    assert set(enders) == {BOS, ASSISTANT_END}  # a stopped row's next token was a stop token, of both kinds


def test_num_samples_after_one_prefill_are_seeded_and_diverse():
    model = build_model()
    engine = Engine(model, NEVER_STOPS)
    prompt = [BOS, 4, 8]
    calls = []
    original_forward = model.forward
    model.forward = lambda idx, **kw: calls.append(tuple(idx.shape)) or original_forward(idx, **kw)
    results, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=6, temperature=1.0, seed=11)
    model.forward = original_forward
    assert calls[0] == (1, 3)  # one batch-1 prefill ...
    assert calls[1:] == [(4, 1)] * 5  # ... then one token per row per step
    assert len({tuple(r) for r in results}) > 1
    again, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=6, temperature=1.0, seed=11)
    assert again == results


def test_sampled_generation_matches_naive_sampling_with_the_same_rng():
    model = build_model(n_kv_head=2)
    prompt = [BOS, 11, 12]
    engine = Engine(model, NEVER_STOPS)
    results, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=8, temperature=0.8, top_k=10, seed=5)
    rng = torch.Generator().manual_seed(5)
    ids = list(prompt)
    for _ in range(8):
        logits = model(torch.tensor([ids]))[:, -1]
        ids.append(int(sample_next_token(logits, rng, 0.8, 10)))
    assert results[0] == ids


def test_kv_cache_copy_slot_copies_the_filled_positions():
    cache = KVCache(num_slots=3, num_layers=2, capacity=4)
    cache.select(0, 1)
    k = torch.randn(1, 3, 2, 5)
    cache.prepare(1, 2, "cpu")
    for layer in range(2):
        cache.insert_kv(layer, k, -k)
    cache.copy_slot(0, 2)
    assert cache.lengths == [2, 0, 2]
    cache.select(2, 1)
    cache.prepare(1, 1, "cpu")
    k_all, v_all = cache.insert_kv(0, torch.zeros(1, 3, 1, 5), torch.zeros(1, 3, 1, 5))
    assert k_all.shape == (1, 3, 3, 5)
    assert torch.equal(k_all[:, :, :2], k) and torch.equal(v_all[:, :, :2], -k)


# ---------------------------------------------------------------------------
# bf16 autocast, the GPU default, run here with CPU autocast.
#
# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%) and autocast rounds every matmul's
# inputs to it, so logits carry a few tenths of a percent of error from the two layers and the
# lm_head. On these models' logits (|logit| up to ~13 of the softcap's 15), measured over 40
# models (seeds 0-19, n_kv_head 1 and 2): bf16 vs fp32 differ by at most 0.23, and the cached
# decode vs one full bf16 forward by at most 0.15 (not 0: bf16 attention rounds differently for
# different sequence lengths, so even a 12-token prefill differs from the first 12 positions of
# a 20-token forward). The tolerances below give ~2x headroom and stay far below what a real
# cache bug does (a key at the wrong position moves logits by whole units).
BF16_VS_FP32_ATOL = 0.5
BF16_CACHE_ATOL = 0.25


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def emulate_cuda_autocast_norm(monkeypatch):
    """Make CPU autocast treat rms_norm as CUDA autocast does: computed and returned in fp32 (it is
    on torch's CUDA autocast-to-fp32 list, not on the CPU one), so a test here sees the dtypes a GPU sees."""
    rms_norm = torch.nn.functional.rms_norm

    def fp32_rms_norm(x, *args, **kwargs):
        if not torch.is_autocast_enabled("cpu"):
            return rms_norm(x, *args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            return rms_norm(x.float(), *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "rms_norm", fp32_rms_norm)


@pytest.mark.parametrize("autocast_policy", ["cpu", "cuda"])
@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_bf16_kv_cache_holds_bf16_keys_and_values_and_matches_the_full_forward(autocast_policy, n_kv_head, monkeypatch):
    """Under bf16 autocast the cache stores keys and values in bf16, the dtype attention computes
    them in, on the CPU and with CUDA's autocast rules (where rms_norm returns fp32, and the
    QK-normed keys were cached in fp32 next to bf16 values before norm() cast back); and a prefill,
    a chunk and single-token steps give the logits of one full forward."""
    if autocast_policy == "cuda":
        emulate_cuda_autocast_norm(monkeypatch)
    model = build_model(n_kv_head=n_kv_head)
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    cache = KVCache(num_slots=2, num_layers=model.config.n_layer, capacity=8)  # small: forces growth
    inserted = []
    insert_kv = cache.insert_kv
    cache.insert_kv = lambda layer, k, v: inserted.append((k.dtype, v.dtype)) or insert_kv(layer, k, v)
    with torch.no_grad(), bf16_autocast():
        full = model(idx)  # (2, 20, V)
        pieces = [model(idx[:, :12], kv_cache=cache), model(idx[:, 12:15], kv_cache=cache)]
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(15, 20)]
    assert set(inserted) == {(torch.bfloat16, torch.bfloat16)}
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16
    assert full.dtype == torch.float32  # the logits leave the model in fp32 (softcap in fp32)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=BF16_CACHE_ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(full, model(idx), atol=BF16_VS_FP32_ATOL, rtol=0)


def assert_near_greedy(model, prompt, tokens, autocast, atol):
    """Each of `tokens` (generated after `prompt`) is the argmax, within atol, of a full forward of
    the sequence before it under `autocast`: where the best logit leads by more than atol the token
    must be that argmax; where two logits are closer, either may rightly be picked."""
    with torch.no_grad(), autocast:
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1]  # (len(tokens), V)
    chosen = logits.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    behind = logits.max(dim=-1).values - chosen
    assert (behind <= atol).all(), behind
    return (behind == 0).float().mean().item()


def test_bf16_greedy_generation_with_cache_picks_the_tokens_of_full_forwards():
    model = build_model(n_kv_head=1)
    prompt = [BOS, 5, 9, 17, 3]
    with bf16_autocast():
        results, _ = Engine(model, NEVER_STOPS).generate_batch(prompt, num_samples=2, max_tokens=16, temperature=0.0)
    assert results[0] == results[1]
    generated = results[0][len(prompt):]
    assert len(generated) == 16
    exact = assert_near_greedy(model, prompt, generated, bf16_autocast(), BF16_CACHE_ATOL)
    assert exact >= 0.9  # near-ties are rare: almost every token is the full forward's argmax itself
    # and the bf16 tokens are near-greedy for the fp32 model too
    assert_near_greedy(model, prompt, generated, nullcontext(), BF16_VS_FP32_ATOL)


# ---------------------------------------------------------------------------
# The calculator tool

def test_calculator_handles_arithmetic_and_count():
    from nanochat.engine import use_calculator
    assert use_calculator("6*24") == "144"
    assert use_calculator(" (12 + 30) // 4 ") == "10"
    assert use_calculator("48/2") == "24"  # integral floats print as ints, like GSM8K's annotations
    assert use_calculator("7/2") == "3.5"
    assert use_calculator("-3 + 2**10 % 7") == str(-3 + 2 ** 10 % 7)
    assert use_calculator("1,000 + 1") == "1001"
    assert use_calculator("'strawberry'.count('r')") == "3"


def test_calculator_rejects_everything_else():
    from nanochat.engine import use_calculator
    for expr in ["__import__('os').system('true')", "open('/etc/passwd').read()", "x + 1", "9**9**9",
                 "10**100 * 10**100", "1/0", "[1, 2]", "'a' * 3", "lambda: 1", "'abc'.upper()", "",
                 "1 +", "1" * 300, "2**0.5**-100000"]:
        assert use_calculator(expr) is None, expr


class ScriptedModel(torch.nn.Module):
    """A 'model' whose greedy choice at its n-th forward call is script[n] (ignoring its input)."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.script, self.vocab_size, self.calls = script, vocab_size, 0
        self.lm_head = torch.nn.Linear(1, 1)
        self.config = type("Config", (), {"n_layer": 1, "sequence_len": 64})()

    def forward(self, idx, kv_cache=None, last_only=False):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits


def test_engine_runs_the_calculator_and_forces_its_output():
    from nanochat.engine import Engine
    from nanochat.tokenizer import RustBPETokenizer
    tok = RustBPETokenizer.train_from_iterator(iter(["byte level"]), 256 + 9)  # one token per byte
    special = tok.encode_special
    script = [special("<|python_start|>"), *tok.encode("12*3"), special("<|python_end|>"),
              *tok.encode("xxxx"),  # what the model would say during the 4 forced steps: overridden
              *tok.encode(" ok"), special("<|assistant_end|>")]
    engine = Engine(ScriptedModel(script, tok.get_vocab_size()), tok)
    results, masks = engine.generate_batch([tok.get_bos_token_id()], num_samples=2, temperature=0.0, max_tokens=30)
    expected = [special("<|python_start|>"), *tok.encode("12*3"), special("<|python_end|>"),
                special("<|output_start|>"), *tok.encode("36"), special("<|output_end|>"), *tok.encode(" ok")]
    for row, mask in zip(results, masks):
        assert row[1:] == expected
        assert mask[1:] == [1] * 6 + [0] * 4 + [1] * 3


def test_top_p_keeps_the_nucleus_only():
    from nanochat.engine import sample_next_token
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(2000, 1)  # (2000, 3)
    rng = torch.Generator().manual_seed(0)
    seen = set(sample_next_token(logits, rng, temperature=1.0, top_p=0.6)[:, 0].tolist())
    assert seen == {0, 1}  # 0.5 + 0.3 covers 0.6; the 0.2 token lies beyond the nucleus
    assert set(sample_next_token(logits, rng, temperature=1.0, top_p=0.0)[:, 0].tolist()) == {0}
    assert set(sample_next_token(logits, rng, temperature=1.0, top_p=1.0)[:, 0].tolist()) == {0, 1, 2}
    assert set(sample_next_token(logits, rng, temperature=1.0, top_k=2, top_p=0.5)[:, 0].tolist()) == {0}
    with pytest.raises(ValueError, match="top_p"):
        sample_next_token(logits, rng, top_p=1.5)


# ---------------------------------------------------------------------------
# Continuous batching

def run_alone(model, prompt, **settings):
    engine = Engine(model, NEVER_STOPS)
    (seq,) = engine.add(prompt, **settings)
    while engine.has_work():
        engine.step()
    return seq.tokens[len(prompt):]


def test_a_sequence_generates_the_same_tokens_alone_and_in_a_changing_batch():
    """Sequences join and leave around it (other prompts, lengths, settings), and some are
    cancelled; each one's tokens are those it generates alone."""
    model = build_model(n_kv_head=1)
    requests = [([BOS, 5, 9], dict(max_tokens=20, temperature=0.9, top_k=20, seed=1)),
                ([BOS, 3], dict(max_tokens=6, temperature=0.0)),
                ([BOS, 7, 7, 7, 7, 7, 7, 2], dict(max_tokens=11, temperature=1.3, top_p=0.8, seed=2)),
                ([BOS, 5, 9], dict(max_tokens=20, temperature=0.9, top_k=20, seed=3)),
                ([BOS, 1, 2, 3, 4], dict(max_tokens=9, temperature=0.7, seed=4))]
    engine = Engine(model, NEVER_STOPS, max_batch=3)
    seqs = [engine.add(requests[0][0], **requests[0][1])[0]]
    for step in range(60):
        if step in (1, 2, 4, 5):  # joiners: the queue holds them while all 3 slots are busy
            i = {1: 1, 2: 2, 4: 3, 5: 4}[step]
            seqs += engine.add(requests[i][0], **requests[i][1])
        if step == 3:
            cancelled = engine.add([BOS, 8, 8], max_tokens=30, temperature=1.0, seed=9)[0]
        if step == 8:
            cancelled.cancel()
        assert len(engine.running) <= 3
        engine.step()
        assert [s.slot for s in engine.running] == list(range(len(engine.running)))
    assert not engine.has_work()
    assert cancelled.finish_reason == "cancelled" and cancelled.slot is None
    for seq, (prompt, settings) in zip(seqs, requests):
        assert seq.finish_reason == "length"
        assert seq.tokens[len(prompt):] == run_alone(model, prompt, **settings)
    assert seqs[0].tokens != seqs[3].tokens  # the seed, not the batch, decides


@pytest.mark.slow
def test_the_compiled_decode_step_generates_what_eager_decoding_does(capsys):
    """Engine(compile_decode=True): one torch.compile trace per padded batch size (1, 2, 3 here),
    attention over the whole slot. Sequences join, leave and run past the slot (eager from
    there), and each still gets the tokens it generates alone, eagerly."""
    model = build_model(n_kv_head=1)
    requests = [([BOS, 5, 9], dict(max_tokens=14, temperature=0.9, top_k=20, seed=1)),
                ([BOS, 3], dict(max_tokens=5, temperature=0.0)),
                ([BOS] + [7] * 56, dict(max_tokens=12, temperature=1.3, top_p=0.8, seed=2)),  # past the 64-token slot
                ([BOS, 1, 2, 3, 4], dict(max_tokens=9, temperature=0.7, seed=4))]
    engine = Engine(model, NEVER_STOPS, max_batch=3, compile_decode=True)
    compiled, batch_sizes = engine.compiled_decode, []
    engine.compiled_decode = lambda ids, *args: batch_sizes.append(ids.size(0)) or compiled(ids, *args)
    seqs = []
    for step in range(40):
        if step < len(requests):
            seqs += engine.add(requests[step][0], **requests[step][1])
        engine.step()
    assert not engine.has_work() and engine.compiled_decode is not None
    assert sorted(set(batch_sizes)) == [1, 2, 3]  # 2 running rows padded to 2, 3 to 3 (the slots), not 4
    for seq, (prompt, settings) in zip(seqs, requests):
        assert seq.finish_reason == "length" and seq.tokens[len(prompt):] == run_alone(model, prompt, **settings)
    assert "failed" not in capsys.readouterr().out

    def broken(*args):  # what a machine without a C++ compiler for inductor gets
        raise RuntimeError("inductor: no working C++ compiler")
    engine.compiled_decode = broken
    prompt, settings = requests[0]
    (seq,) = engine.add(prompt, **settings)
    while engine.has_work():
        engine.step()
    assert seq.tokens[len(prompt):] == run_alone(model, prompt, **settings) and engine.compiled_decode is None
    assert "the compiled decode step failed (RuntimeError: inductor: no working C++ compiler)" in capsys.readouterr().out


def test_out_of_memory_in_the_compiled_decode_step_is_raised_and_keeps_it_compiled():
    """A CUDA out-of-memory belongs to the batch that ran into it (chat_web ends those requests
    and serves on): it is raised, not taken as a broken compiler, so the next batch still decodes
    through torch.compile."""
    engine = Engine(build_model(), NEVER_STOPS, max_batch=2, compile_decode=True)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    engine.compiled_decode = out_of_memory
    engine.add([BOS, 5, 9], max_tokens=4)
    with pytest.raises(torch.OutOfMemoryError):
        engine.step()
    assert engine.compiled_decode is out_of_memory


def test_bf16_sequences_in_a_batch_stay_near_greedy():
    """Under bf16 autocast the ragged batch rounds differently from one row alone, so exact
    equality is not promised; each greedy token is still the full forward's argmax within the
    bf16 tolerance."""
    model = build_model(n_kv_head=1)
    engine = Engine(model, NEVER_STOPS)
    prompts = [[BOS, 5, 9, 17, 3], [BOS, 2], [BOS, 9, 9, 9, 9, 9, 9, 9, 9, 1]]
    with bf16_autocast():
        outputs = engine.generate_many(prompts, max_tokens=12, temperature=0.0)
    for prompt, (results, _) in zip(prompts, outputs):
        assert_near_greedy(model, prompt, results[0][len(prompt):], bf16_autocast(), BF16_CACHE_ATOL)


def test_cancel_frees_the_slot_at_the_next_step_and_queued_sequences_take_it():
    model = build_model()
    engine = Engine(model, NEVER_STOPS, max_batch=2)
    a, b, c = (engine.add([BOS, i], max_tokens=50, temperature=1.0, seed=i)[0] for i in range(3))
    engine.step()
    assert [s.slot for s in (a, b, c)] == [0, 1, None] and engine.num_waiting() == 1
    a.cancel()
    events = engine.step()
    assert a.finish_reason == "cancelled" and a.slot is None
    assert {id(s) for s, _, _ in events} == {id(b), id(c)} and (b.slot, c.slot) == (0, 1)  # b moved into the freed slot
    queued = engine.add([BOS, 4], max_tokens=50)[0]
    queued.cancel()  # cancelled before it ever ran: it never takes a slot
    b.cancel(), c.cancel()
    assert engine.step() == [] and not engine.has_work()
    assert queued.finish_reason == "cancelled"


def test_generate_many_matches_each_prompt_alone_and_bounds_the_batch():
    model = build_model(n_kv_head=2)
    prompts = [[BOS, i, i + 1] for i in range(7)]
    engine = Engine(model, TinyTokenizer())
    widths = []
    step = engine.step
    engine.step = lambda: widths.append(len(engine.running) + engine.num_waiting()) or step()
    outputs = engine.generate_many(prompts, num_samples=2, max_batch=4, seeds=range(7), max_tokens=10, temperature=1.0)
    assert max(widths) == 4 and not engine.has_work()
    for i, prompt in enumerate(prompts):
        alone = Engine(model, TinyTokenizer()).generate_batch(prompt, 2, seed=i, max_tokens=10, temperature=1.0)
        assert outputs[i] == alone


def test_an_abandoned_generate_leaves_the_engine_free():
    engine = Engine(build_model(), NEVER_STOPS)
    for _ in zip(range(3), engine.generate([BOS, 1], num_samples=2, max_tokens=20)):
        pass
    assert not engine.has_work()
    assert len(engine.generate_batch([BOS, 1], max_tokens=4)[0][0]) == 6


def test_kv_cache_bytes_counts_keys_and_values_of_every_layer():
    from nanochat.engine import kv_cache_bytes
    d20 = GPTConfig.from_depth(20, sequence_len=2048)
    assert kv_cache_bytes(d20, 1, torch.bfloat16) == 200 * 2 ** 20  # 2 x 20 x 10 x 128 x 2048 x 2 bytes
    assert kv_cache_bytes(d20, 3, torch.float32, capacity=100) == 2 * 20 * 1280 * 100 * 3 * 4
