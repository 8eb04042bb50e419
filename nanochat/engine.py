"""
Inference: the KV cache, next-token sampling (temperature, top-k, top-p), the calculator tool,
and the Engine, which decodes a changing set of sequences as one batch (continuous batching).

Each Engine.step() runs one forward pass over every running sequence, one token each. Sequences
join between steps: a new one's prompt is prefilled on its own (batch 1, so its cost does not
depend on who else is running) and its first token is sampled in the same step; sequences that
produce a stop token, reach their max_tokens or are cancelled leave at once and free their slot.
Every sequence has its own temperature, top-k, top-p, random stream and calculator state, so
what it generates does not depend on what else is in the batch.

The KV cache layout: preallocated slots, one per sequence, each with room for a full context
((num_layers, num_slots, H_kv, capacity, head_dim) keys and values), rather than pages. The running
sequences always occupy slots 0..B-1: when one leaves, the last one moves into its slot (one copy
of its cached rows, cheap next to the tokens decoded meanwhile), so every decode step reads the
cache as a plain view, [0:B, :, 0:max length], with no gather and no paging table; rows shorter
than the longest are masked. Pages (vLLM's PagedAttention) would use memory in proportion to the
tokens actually cached rather than to the context, which matters when thousands of sequences
share a GPU; with the tens that one desk GPU serves, slots cost little (a d20 slot of 2,048 bf16
tokens is 200 MiB, see kv_cache_bytes) and keep the decode step simple enough for torch.compile
(Engine(compile_decode=True) reads each slot's whole capacity under a mask, so the step's shapes
depend only on the batch size; see FixedShapeDecode).

Not for: training, the chat format (tokenizer.py renders conversations), scheduling requests
from many clients (scripts/chat_web.py does that and drives step() from one thread per model),
or mixed precision (callers wrap generation in torch.autocast when they want bf16).
"""

import ast
import hashlib
import math
import operator
import threading
from collections import deque

import torch


class KVCache:
    """Keys and values of every layer for the tokens each slot has seen, so decoding step t costs
    O(t) instead of re-running the whole prefix.

    Storage is allocated on the first insert (taking the dtype/device of the keys and values,
    e.g. bf16 under autocast), zero-filled (masked-out positions must hold finite numbers: a
    softmax weight of 0 times NaN is NaN), and grows if a slot runs past `capacity`. Tensors are
    (num_layers, num_slots, H_kv, capacity, head_dim); lengths[s] is the number of tokens slot s
    holds (its next token's position).

    A forward pass works on the slots select(first, count) chose (default: all): GPT.forward
    calls prepare(B, T) once, then insert_kv(layer_idx, k, v) per layer; after the last layer
    each selected slot's length grows by T.
    """

    def __init__(self, num_slots, num_layers, capacity):
        self.num_slots, self.num_layers, self.capacity = num_slots, num_layers, capacity
        self.lengths = [0] * num_slots
        self.k = self.v = None
        self.first, self.count = 0, num_slots

    def select(self, first, count):
        """The next forward pass feeds slots [first, first + count), one row each, in order."""
        assert 0 <= first and count >= 1 and first + count <= self.num_slots, (first, count, self.num_slots)
        self.first, self.count = first, count

    def prepare(self, B, T, device):
        """Set up a forward of T new tokens for each of the B selected slots.

        Returns the positions of the new tokens: an int p when every row starts at p (positions
        p..p+T-1), else a (B, T) int64 tensor. Afterwards self.t_key is the number of key
        positions attention sees (the longest row's), and self.attn_mask / self.is_causal are
        what F.scaled_dot_product_attention takes.
        """
        assert B == self.count, f"the cache selected {self.count} slots, the input has {B} rows"
        starts = self.lengths[self.first:self.first + B]
        self.t_key = max(starts) + T
        if self.k is not None and self.t_key > self.k.size(3):
            self._grow(self.t_key)
        self.capacity = max(self.capacity, self.t_key)
        if min(starts) == max(starts):  # every row at the same position: no per-row mask needed
            start = starts[0]
            self.rows_at = start
            self.is_causal = start == 0 and T > 1
            self.attn_mask = attention_mask(T, self.t_key, device) if start > 0 and T > 1 else None
            return start
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)  # (B, T)
        self.rows_at = positions
        self.is_causal = False
        # (B, 1, T, t_key): row b's query i sees keys up to its own position; keys past a shorter
        # row's length hold another row's or an old sequence's data, and are masked here
        self.attn_mask = torch.arange(self.t_key, device=device)[None, None, None, :] <= positions[:, None, :, None]
        return positions

    def insert_kv(self, layer_idx, k, v):
        """Store k, v of shape (B, H_kv, T, head_dim) at the selected slots' next positions;
        return the layer's keys and values for positions [0, t_key), each (B, H_kv, t_key, head_dim)."""
        B, H, T, D = k.shape
        if self.k is None:
            self.k = k.new_zeros(self.num_layers, self.num_slots, H, self.capacity, D)
            self.v = v.new_zeros(self.num_layers, self.num_slots, H, self.capacity, v.size(-1))
        rows = slice(self.first, self.first + B)
        if isinstance(self.rows_at, int):
            self.k[layer_idx, rows, :, self.rows_at:self.rows_at + T] = k
            self.v[layer_idx, rows, :, self.rows_at:self.rows_at + T] = v
        else:  # ragged rows: scatter each (row, position) pair
            slots = torch.arange(self.first, self.first + B, device=k.device)[:, None]  # (B, 1)
            self.k[layer_idx, slots, :, self.rows_at] = k.transpose(1, 2)  # indexed as (B, T, H, D)
            self.v[layer_idx, slots, :, self.rows_at] = v.transpose(1, 2)
        if layer_idx == self.num_layers - 1:
            for s in range(self.first, self.first + B):
                self.lengths[s] += T
        return self.k[layer_idx, rows, :, :self.t_key], self.v[layer_idx, rows, :, :self.t_key]

    def _grow(self, needed):
        """Reallocate to at least `needed` positions, doubling, keeping the cached tokens."""
        new_capacity = max(needed, 2 * self.k.size(3))
        pad = new_capacity - self.k.size(3)
        self.k = torch.cat([self.k, self.k.new_zeros(*self.k.shape[:3], pad, self.k.size(4))], dim=3)
        self.v = torch.cat([self.v, self.v.new_zeros(*self.v.shape[:3], pad, self.v.size(4))], dim=3)
        self.capacity = new_capacity

    def add_slots(self, num_slots):
        """Grow to num_slots slots (empty, zero-filled), keeping the cached tokens."""
        pad = num_slots - self.num_slots
        if self.k is not None:
            self.k = torch.cat([self.k, self.k.new_zeros(self.k.size(0), pad, *self.k.shape[2:])], dim=1)
            self.v = torch.cat([self.v, self.v.new_zeros(self.v.size(0), pad, *self.v.shape[2:])], dim=1)
        self.lengths += [0] * pad
        self.num_slots = num_slots

    def copy_slot(self, src, dst):
        """Make slot dst hold what slot src holds (only the filled positions are copied)."""
        n = self.lengths[src]
        if self.k is not None and n:
            self.k[:, dst, :, :n] = self.k[:, src, :, :n]
            self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def clear_slot(self, slot):
        """Mark slot `slot` empty (its old keys and values stay, masked, until overwritten)."""
        self.lengths[slot] = 0


class FixedShapeDecode:
    """KVCache's forward-pass interface (prepare, insert_kv) for one decode step in shapes that do
    not change from step to step, so that torch.compile traces it once per batch size (and CUDA
    graphs can replay it): every row attends over the slot's whole capacity, masked past its own
    position, where KVCache.prepare cuts the keys at the longest row (a shape that grows by one
    each step). Costs attention over the full capacity instead of the longest row; on a GPU that
    is little next to the kernel launches it saves.

    k, v: the cache's (num_layers, num_slots, H_kv, capacity, head_dim) storage, written in place.
    positions: (B,) int64, row b's next position (its slot's length); row b is slot b.
    Does not update KVCache.lengths (the caller does, after the step).
    """

    def __init__(self, k, v, positions):
        self.k, self.v, self.positions = k, v, positions

    def prepare(self, B, T, device):
        assert T == 1 and B == self.positions.size(0), (B, T, self.positions.shape)
        capacity = self.k.size(3)
        self.t_key, self.is_causal = capacity, False
        self.attn_mask = torch.arange(capacity, device=device)[None, None, None, :] <= self.positions[:, None, None, None]
        self.rows = torch.arange(B, device=device)
        return self.positions[:, None]  # (B, 1)

    def insert_kv(self, layer_idx, k, v):
        B = k.size(0)
        self.k[layer_idx, self.rows, :, self.positions] = k[:, :, 0]  # (B, H_kv, head_dim) at (slot b, position b)
        self.v[layer_idx, self.rows, :, self.positions] = v[:, :, 0]
        return self.k[layer_idx, :B], self.v[layer_idx, :B]


def kv_cache_bytes(config, num_slots, dtype, capacity=None):
    """Bytes of a KVCache of num_slots slots of `capacity` tokens (default: the model's
    sequence_len) for a GPTConfig, keys and values in `dtype`: 2 x n_layer x n_kv_head x head_dim x
    capacity x num_slots x element size. A d20 (20 layers, 10 heads of 128) at 2,048 tokens in bf16
    is 200 MiB per slot."""
    head_dim = config.n_embd // config.n_head
    capacity = config.sequence_len if capacity is None else capacity
    return 2 * config.n_layer * config.n_kv_head * head_dim * capacity * num_slots * torch.empty((), dtype=dtype).element_size()


def attention_mask(t_query, t_key, device):
    """Boolean (t_query, t_key) mask for queries at the last t_query of t_key positions.

    Query i sits at absolute position t_key - t_query + i and may attend to keys <= it.
    """
    offset = t_key - t_query
    q_pos = torch.arange(t_query, device=device).unsqueeze(1) + offset
    k_pos = torch.arange(t_key, device=device).unsqueeze(0)
    return k_pos <= q_pos


def sample_tokens(logits, uniforms, temperature=1.0, top_k=None, top_p=None):
    """Pick one token per row by inverse-CDF sampling with the given uniform draws.

    logits: (B, vocab_size) float; uniforms: (B,) float in [0, 1) on logits.device, one per row
    (a row's token depends only on its logits and its draw, never on the other rows: this is
    what keeps a sequence's output independent of the batch it is decoded in). temperature 0
    means greedy (argmax, draws unused); top_k keeps the k largest logits; top_p (nucleus
    sampling, Holtzman et al. 2019, https://arxiv.org/abs/1904.09751) then keeps the smallest set
    of most likely tokens whose probability adds up to top_p (always at least the most likely
    one). Returns (B,) int64. Arguments are not checked (sample_next_token checks them).
    """
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    indices = None
    if top_k is not None and top_k < logits.size(-1):
        logits, indices = torch.topk(logits, top_k, dim=-1)  # (B, k), sorted
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1:
        if indices is None:
            probs, indices = probs.sort(dim=-1, descending=True)
        beyond = probs.cumsum(dim=-1) - probs > top_p  # the mass before them already exceeds top_p
        probs = probs.masked_fill(beyond, 0.0)
    cdf = probs.cumsum(dim=-1)  # (B, k)
    # the first token whose cumulative probability passes u x total; zero-probability tokens
    # never do (their cdf equals their predecessor's)
    choice = torch.searchsorted(cdf, (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(1), right=True)
    choice = choice.clamp_max(cdf.size(-1) - 1)  # (B, 1)
    return (choice if indices is None else indices.gather(-1, choice))[:, 0]


def check_sampling(temperature, top_k, top_p):
    """Raise ValueError for temperature < 0, top_k < 1, or top_p outside [0, 1]."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1] or None, got {top_p}")


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Pick one token per row, all rows with the same settings and one random stream.

    logits: (B, vocab_size) float; rng: a torch.Generator on logits.device (seeded by the
    caller, so sampling is reproducible; B uniforms are drawn from it per call, greedy or not).
    See sample_tokens for the settings. Returns (B, 1) int64.

    Raises:
        ValueError: temperature < 0, top_k < 1, or top_p outside [0, 1].
    """
    check_sampling(temperature, top_k, top_p)
    uniforms = torch.rand(logits.size(0), generator=rng, device=rng.device).to(logits.device)
    return sample_tokens(logits, uniforms, temperature, top_k, top_p)[:, None]


# The calculator: arithmetic on numbers and str.count, evaluated by walking the syntax tree
# (never eval), with bounds on exponents and operand sizes so no expression can run long.
_BIN_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
            ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPR_CHARS = 200
_MAX_ABS = 10 ** 60  # larger intermediate results are refused (keeps every operation cheap)


def _evaluate_node(node):
    if isinstance(node, ast.Expression):
        return _evaluate_node(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        value = _evaluate_node(node.operand)
        if not isinstance(value, (int, float)):
            raise ValueError("unary operator on a non-number")
        return _UNARY_OPS[type(node.op)](value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        left, right = _evaluate_node(node.left), _evaluate_node(node.right)
        if not all(isinstance(v, (int, float)) for v in (left, right)):
            raise ValueError("arithmetic on a non-number")
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 10 ** 6):
            raise ValueError("exponent too large")
        result = _BIN_OPS[type(node.op)](left, right)
        if isinstance(result, complex) or abs(result) > _MAX_ABS:
            raise ValueError("result out of range")
        return result
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and len(node.args) == 1 and not node.keywords):
        haystack, needle = _evaluate_node(node.func.value), _evaluate_node(node.args[0])
        if isinstance(haystack, str) and isinstance(needle, str):
            return haystack.count(needle)
    raise ValueError(f"unsupported expression: {ast.dump(node)[:80]}")


def use_calculator(expr):
    """Evaluate a tool call: arithmetic (+ - * / // % ** and parentheses on ints/floats) or
    'text'.count('x'). Returns the result as the string Python would print (an integral float
    prints as an int, "24" not "24.0", as in GSM8K's calculator annotations), or None for
    anything else (names, other calls, huge numbers, division by zero, over 200 characters).
    """
    expr = expr.strip()
    if "count" not in expr:
        expr = expr.replace(",", "")  # thousands separators (1,000); in a count() call a comma is syntax
    if not expr or len(expr) > _MAX_EXPR_CHARS:
        return None
    try:
        result = _evaluate_node(ast.parse(expr, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None
    if isinstance(result, float):
        if not math.isfinite(result):
            return None
        if result.is_integer():
            result = int(result)
    return str(result)


class RowState:
    """Tool-use state of one generated row: inside a python block or not, and the tokens the
    engine must force next (a tool result) instead of sampling."""

    def __init__(self):
        self.in_python = False
        self.python_tokens = []
        self.forced = []


class Sequence:
    """One sequence the Engine decodes: its prompt, limits and sampling settings, its own random
    stream, its calculator state and, while it runs, its KV-cache slot.

    What callers read: tokens (the prompt and every token emitted so far), num_generated,
    finish_reason (None while it runs; "stop": it emitted a stop token, the last of tokens;
    "length": max_tokens emitted; "cancelled": cancel() was called; "error": the model raised).
    """

    def __init__(self, tokens, max_tokens, temperature, top_k, top_p, seed):
        self.tokens = list(tokens)
        self.max_tokens = max_tokens
        self.sampling = (temperature, top_k, top_p)
        self.rng = torch.Generator().manual_seed(seed)  # on the CPU: one uniform per step, whatever the device
        self.tool = RowState()
        self.slot = None
        self.num_generated = 0
        self.finish_reason = None
        self.cancelled = False
        self.fork_of = None  # a sequence with the same prompt added just before: its prefill is copied

    @property
    def finished(self):
        return self.finish_reason is not None

    def cancel(self):
        """Stop this sequence (from any thread): it leaves the batch at the next step and frees its slot."""
        self.cancelled = True


def row_seed(seed, row):
    """The seed of row `row` of a request seeded `seed`: `seed` itself for row 0, and for the
    others a 63-bit hash of (seed, row), so rows and nearby seeds get unrelated streams."""
    if row == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest(), "little") >> 1


class Engine:
    """Continuous-batching generation with a KV cache, for a GPT and a tokenizer that has
    encode_special(name) and get_bos_token_id(). Sequences stop at <|assistant_end|> or <|bos|>.

    add() queues sequences (thread-safe); step() advances every running sequence by one token.
    generate() / generate_batch() / generate_many() drive step() themselves for callers with a
    fixed set of prompts (chat_eval, chat_rl, chat_cli); they must not share an Engine with a
    thread that calls step(). max_batch bounds the running sequences (None: no bound).
    compile_decode: run the decode step through torch.compile (mode "reduce-overhead", i.e. CUDA
    graphs, on CUDA), in fixed shapes (FixedShapeDecode): slots as long as the model's context,
    the batch padded to a power of two (at most the slots), one trace per padded size. A row past
    the slot's capacity decodes eagerly; if compiling fails the engine says so and decodes eagerly.
    An out-of-memory error in the compiled step is raised to step()'s caller like an eager one's
    (torch.OutOfMemoryError), and the step stays compiled.
    """

    def __init__(self, model, tokenizer, max_batch=None, compile_decode=False):
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        # the decode step through torch.compile (CUDA graphs on CUDA), one trace per batch size
        # rounded up to a power of two; prefill stays eager (one request at a time)
        self.compiled_decode, self.static_cache = None, None
        if compile_decode:
            # a trace per (engine, padded batch): 7 batch sizes up to 64 per replica would pass
            # dynamo's default limit of 8 per function, after which it decodes eagerly unannounced
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            on_cuda = model.lm_head.weight.device.type == "cuda"
            self.compiled_decode = torch.compile(self._decode_fixed, fullgraph=True, dynamic=False,
                                                 mode="reduce-overhead" if on_cuda else None)
        self.stop_tokens = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.tool = self._tool_tokens()
        self.cache = None
        self.running = []  # running[i] holds slot i
        self.logits = None  # (len(running), vocab_size) fp32: each running sequence's next-token logits
        self.waiting = deque()
        self.lock = threading.Lock()  # guards `waiting`, which add() fills from other threads

    def add(self, tokens, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42, num_samples=1):
        """Queue num_samples sequences continuing `tokens` (a list of ints); they join the batch
        at a coming step (the first of them prefills the prompt, the others copy its cache).
        max_tokens: tokens to generate at most (default: up to the model's sequence_len). Row i
        samples with row_seed(seed, i). Returns the list of Sequence.

        Raises:
            ValueError: empty `tokens`, num_samples < 1, max_tokens < 0, bad sampling settings
                (see sample_next_token), or prompt + max_tokens past the model's rotary tables.
        """
        if not tokens:
            raise ValueError("generation needs at least one prompt token (e.g. <|bos|>)")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        check_sampling(temperature, top_k, top_p)
        if max_tokens is None:
            max_tokens = max(0, self.model.config.sequence_len - len(tokens))
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        rotary = getattr(self.model, "cos", None)
        if rotary is not None and len(tokens) + max_tokens > rotary.size(1):
            raise ValueError(f"{len(tokens)} prompt tokens + max_tokens {max_tokens} run past the model's "
                             f"{rotary.size(1)} positions")
        seqs = [Sequence(tokens, max_tokens, temperature, top_k, top_p, row_seed(seed, i)) for i in range(num_samples)]
        for seq in seqs[1:]:
            seq.fork_of = seqs[0]
        for seq in seqs:
            if max_tokens == 0:
                seq.finish_reason = "length"
        with self.lock:
            self.waiting.extend(seq for seq in seqs if not seq.finished)
        return seqs

    def has_work(self):
        """Whether step() has anything to do (running or waiting sequences)."""
        return bool(self.running or self.waiting)

    def num_waiting(self):
        """Sequences added but not yet admitted into a slot."""
        return len(self.waiting)

    @torch.inference_mode()
    def step(self):
        """One step of the batch: drop cancelled sequences, prefill waiting ones into free slots,
        sample one token for every running sequence, retire the finished, and run one decode
        forward over the rest (B rows of one token each, each at its own position).

        Returns [(sequence, token, mask)] for every sequence that emitted a token: mask 1 for a
        sampled token, 0 for one forced by the calculator tool. A sequence whose
        finish_reason is set afterwards has left the batch.
        """
        self._retire([seq for seq in self.running if seq.cancelled], "cancelled")
        self._admit()
        if not self.running:
            return []
        events = self._sample()
        self._retire([seq for seq, _, _ in events if seq.finished], None)
        if self.running:
            self._decode()
        return events

    def _decode(self):
        """One forward over every running sequence's last token: self.logits (B, vocab_size)."""
        device = self.model.lm_head.weight.device
        B, cache = len(self.running), self.cache
        if self.compiled_decode is not None and max(cache.lengths[:B]) < cache.k.size(3):
            padded = min(1 << (B - 1).bit_length(), cache.num_slots)  # rows B.. write into free slots, unread
            ids = torch.zeros(padded, 1, dtype=torch.long)
            ids[:B, 0] = torch.tensor([seq.tokens[-1] for seq in self.running])
            positions = torch.tensor(cache.lengths[:B] + [0] * (padded - B))
            if self.static_cache is not cache.k:  # CUDA graphs write into the cache in place instead of copying it
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
                self.static_cache = cache.k
            try:
                logits = self.compiled_decode(ids.to(device), positions.to(device), cache.k, cache.v)
            except torch.OutOfMemoryError:  # this batch's, not the compiled step's: the caller ends the batch, the next one compiles as before
                raise
            except Exception as e:  # no C++ compiler for inductor, an unsupported GPU, ...: decode eagerly
                print(f"Engine: the compiled decode step failed ({type(e).__name__}: {str(e)[:300]}); "
                      "decoding without torch.compile from now on")
                self.compiled_decode = None
                return self._decode()
            self.logits = logits[:B].clone()  # a CUDA graph's output is overwritten by its next replay
            for slot in range(B):
                cache.lengths[slot] += 1
            return
        ids = torch.tensor([[seq.tokens[-1]] for seq in self.running], dtype=torch.long, device=device)  # (B, 1)
        cache.select(0, B)
        self.logits = self.model(ids, kv_cache=cache, last_only=True)[:, -1, :]  # (B, vocab_size)

    def _decode_fixed(self, ids, positions, k, v):
        """The compiled decode step: ids (B, 1), positions (B,) int64 -> fp32 logits (B, vocab_size)."""
        return self.model(ids, kv_cache=FixedShapeDecode(k, v, positions), last_only=True)[:, -1, :]

    def reset(self):
        """Drop every running and waiting sequence (after the model raised in step()); returns
        them, each with finish_reason "error" unless it had finished. The cache stays allocated."""
        with self.lock:
            dropped = self.running + list(self.waiting)
            self.waiting.clear()
        self.running, self.logits = [], None
        if self.cache is not None:
            self.cache.lengths = [0] * self.cache.num_slots
        for seq in dropped:
            seq.slot = None
            if not seq.finished:
                seq.finish_reason = "error"
        return dropped

    def _ensure_slots(self, num_slots, needed):
        n_layer = self.model.config.n_layer
        if self.cache is None:  # slots as long as the first sequence needs; prepare() grows them for longer ones
            capacity = min(self.model.config.sequence_len, len(needed.tokens) + needed.max_tokens)
            if self.compiled_decode is not None:  # one shape for every step: the whole context
                capacity = self.model.config.sequence_len
            self.cache = KVCache(max(num_slots, self.max_batch or 0), n_layer, capacity)
        elif num_slots > self.cache.num_slots:  # max_batch None: double, keeping what is cached
            self.cache.add_slots(max(num_slots, 2 * self.cache.num_slots))

    def _admit(self):
        """Move waiting sequences into free slots, prefilling each prompt (batch 1) or copying the
        prefill of the sequence it was forked from, when that one was admitted in this call."""
        device = self.model.lm_head.weight.device
        prefilled = set()
        while self.max_batch is None or len(self.running) < self.max_batch:
            with self.lock:
                if not self.waiting:
                    break
                seq = self.waiting.popleft()
            if seq.cancelled:
                seq.finish_reason = "cancelled"
                continue
            slot = len(self.running)
            self._ensure_slots(slot + 1, seq)
            seq.slot = slot
            self.running.append(seq)
            source = seq.fork_of
            if source is not None and id(source) in prefilled and source.slot is not None:
                self.cache.copy_slot(source.slot, slot)
                row = self.logits[source.slot:source.slot + 1]
            else:
                self.cache.clear_slot(slot)
                self.cache.select(slot, 1)
                ids = torch.tensor([seq.tokens], dtype=torch.long, device=device)  # (1, T)
                row = self.model(ids, kv_cache=self.cache, last_only=True)[:, -1, :]  # (1, vocab_size)
                prefilled.add(id(seq))
            self.logits = row if self.logits is None or slot == 0 else torch.cat([self.logits, row])

    def _sample(self):
        """Sample every running sequence's next token (rows grouped by sampling settings, each
        row with its own uniform draw), apply the calculator, and mark finished sequences."""
        device = self.logits.device
        uniforms = torch.cat([torch.rand(1, generator=seq.rng) for seq in self.running]).to(device)  # (B,)
        groups = {}
        for i, seq in enumerate(self.running):
            groups.setdefault(seq.sampling, []).append(i)
        if len(groups) == 1:
            sampled = sample_tokens(self.logits, uniforms, *self.running[0].sampling)
        else:
            sampled = torch.empty(len(self.running), dtype=torch.long, device=device)
            for settings, rows in groups.items():
                index = torch.tensor(rows, device=device)
                sampled[index] = sample_tokens(self.logits[index], uniforms[index], *settings)
        events = []
        for seq, token in zip(self.running, sampled.tolist()):
            forced = bool(seq.tool.forced)
            if forced:
                token = seq.tool.forced.pop(0)
            if self.tool is not None:
                self._advance_tool(seq.tool, token)
            seq.tokens.append(token)
            seq.num_generated += 1
            if token in self.stop_tokens:
                seq.finish_reason = "stop"
            elif seq.num_generated >= seq.max_tokens:
                seq.finish_reason = "length"
            events.append((seq, token, 0 if forced else 1))
        return events

    def _retire(self, seqs, reason):
        """Free the slots of `seqs` (setting finish_reason to `reason` where given), keeping the
        running sequences in slots 0..B-1: the last one moves into each freed slot."""
        for seq in sorted(seqs, key=lambda s: s.slot, reverse=True):
            if reason is not None:
                seq.finish_reason = reason
            last = self.running.pop()
            if last is not seq:
                self.cache.copy_slot(last.slot, seq.slot)
                if self.logits is not None:
                    self.logits[seq.slot] = self.logits[last.slot]
                last.slot = seq.slot
                self.running[seq.slot] = last
            self.cache.clear_slot(len(self.running))
            seq.slot = None
        if seqs and self.logits is not None:
            self.logits = self.logits[:len(self.running)]

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, top_p=None):
        """Prefill `tokens` (a list of ints) once, then decode num_samples rows one token per step.

        Yields (token_column, token_masks) per step: lists of num_samples ints, the token each
        row produced and 1 for a sampled token, 0 for a token forced by the calculator tool
        (<|output_start|>result<|output_end|> after a row's <|python_end|>). Ends after max_tokens
        steps (default: until the model's sequence_len is reached) or once every row has produced
        a stop token; a row that stopped has left the batch and repeats its stop token (mask 0)
        until then, which callers ignore (generate_batch does).

        Raises:
            ValueError: see add(); also num_samples > max_batch.
        """
        if self.max_batch is not None and num_samples > self.max_batch:
            raise ValueError(f"num_samples {num_samples} > this engine's max_batch {self.max_batch}")
        assert not self.has_work(), "generate() drives the engine itself: it is busy with other sequences"
        seqs = self.add(tokens, max_tokens, temperature, top_k, top_p, seed, num_samples)
        row_of = {id(seq): i for i, seq in enumerate(seqs)}
        try:
            while self.has_work():
                events = self.step()
                token_column = [seq.tokens[-1] for seq in seqs]
                token_masks = [0] * num_samples
                for seq, token, mask in events:
                    token_masks[row_of[id(seq)]] = mask
                yield token_column, token_masks
        finally:  # the caller stopped early (or step raised): the engine is free again
            self.reset()

    def _tool_tokens(self):
        """The ids of the tool's special tokens, or None for a tokenizer without them."""
        try:
            return {name: self.tokenizer.encode_special(f"<|{name}|>")
                    for name in ("python_start", "python_end", "output_start", "output_end")}
        except (KeyError, ValueError):
            return None

    def _advance_tool(self, row, token):
        """Feed one emitted token to a row's tool state; on <|python_end|> queue the result."""
        tool = self.tool
        if token == tool["python_start"]:
            row.in_python, row.python_tokens = True, []
        elif token == tool["python_end"] and row.in_python:
            row.in_python = False
            result = use_calculator(self.tokenizer.decode(row.python_tokens))
            if result is not None:
                row.forced += [tool["output_start"], *self.tokenizer.encode(result), tool["output_end"]]
        elif row.in_python:
            row.python_tokens.append(token)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Run generate() to the end and collect the rows.

        Returns (results, masks): num_samples lists each starting with `tokens` followed by the
        row's generated tokens up to (not including) its stop token; masks has 0 for the prompt
        tokens and the generate() mask for the rest. kwargs: those of generate().
        """
        return self.generate_many([tokens], num_samples, max_batch=None, **kwargs)[0]

    def generate_many(self, prompts, num_samples=1, max_batch=32, seeds=None, include_stop=False, **kwargs):
        """Generate num_samples rows for each of `prompts` (lists of ints), continuously batched:
        at most max_batch sequences run at once (None: all), and as one finishes the next joins.

        seeds: one per prompt (default: kwargs' seed, else 42, for every prompt). kwargs:
        max_tokens, temperature, top_k, top_p. Returns one (results, masks) per prompt, as
        generate_batch returns them (with include_stop, a row that stopped ends with its stop
        token, mask 1); each prompt's rows are what generate_batch gives alone.

        Raises:
            ValueError: see add().
        """
        assert not self.has_work(), "generate_many() drives the engine itself: it is busy with other sequences"
        seed = kwargs.pop("seed", 42)
        seeds = [seed] * len(prompts) if seeds is None else list(seeds)
        outputs = [([list(p) for _ in range(num_samples)], [[0] * len(p) for _ in range(num_samples)]) for p in prompts]
        rows_of, pending, in_flight = {}, deque(range(len(prompts))), 0
        try:
            while pending or self.has_work():
                while pending and (max_batch is None or in_flight + num_samples <= max(max_batch, num_samples)):
                    p = pending.popleft()
                    for row, seq in enumerate(self.add(prompts[p], seed=seeds[p], num_samples=num_samples, **kwargs)):
                        rows_of[id(seq)] = (seq, outputs[p][0][row], outputs[p][1][row])  # seq kept alive: ids stay unique
                        in_flight += not seq.finished
                for seq, token, mask in self.step():
                    _, result, masks = rows_of[id(seq)]
                    if seq.finish_reason != "stop" or include_stop:
                        result.append(token)
                        masks.append(mask)
                    in_flight -= seq.finished
        finally:
            self.reset()
        return outputs


class TokenDecoder:
    """Streamed token ids -> pieces of text with their kind, for showing a reply as it comes.

    Kinds: "text", "python" (a tool call), "output" (the tool's result), or "special" (a
    delimiter token, as its string). Tokens are held back while they end in an incomplete UTF-8
    character (up to 16, so junk bytes cannot stall a stream): every piece ends on a character
    boundary, and the pieces join to exactly tokenizer.decode(all tokens).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.kind_after = {special("<|python_start|>"): "python", special("<|python_end|>"): "text",
                           special("<|output_start|>"): "output", special("<|output_end|>"): "text"}
        self.kind, self.pending = "text", []

    def push(self, token):
        """Feed one token id; returns a list of (kind, text) pieces ready to show (maybe empty)."""
        if token in self.kind_after:
            pieces = self.flush() + [("special", self.tokenizer.decode([token]))]
            self.kind = self.kind_after[token]
            return pieces
        self.pending.append(token)
        if len(self.pending) < 16 and self.tokenizer.decode(self.pending).endswith("\ufffd"):
            return []
        return self.flush()

    def flush(self):
        """Everything held back, as (kind, text) pieces (call once the stream ends)."""
        text, self.pending = self.tokenizer.decode(self.pending), []
        return [(self.kind, text)] if text else []
