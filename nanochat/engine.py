"""
Inference: the KV cache, next-token sampling (temperature, top-k), the calculator tool, and
the Engine that prefills a prompt once and then decodes num_samples continuations one token
per step, running the tool for any row that writes <|python_start|>expr<|python_end|>.

Not for: training, the chat format (tokenizer.py renders conversations), or mixed precision
(callers wrap generation in torch.autocast when they want bf16).
"""

import ast
import math
import operator

import torch


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so decoding step t costs
    O(t) instead of re-running the whole prefix.

    GPT.forward(idx, kv_cache=cache) calls insert_kv(layer_idx, k, v) once per layer; after
    the last layer the position advances by T. Storage is allocated on the first insert (so
    it takes the dtype/device of the keys and values, e.g. bf16 under autocast) and grows if a
    sequence runs past max_seq_len. Tensors are (num_layers, B, H_kv, capacity, head_dim).
    """

    def __init__(self, batch_size, num_layers, max_seq_len):
        self.batch_size = batch_size
        self.num_layers = num_layers
        self.capacity = max_seq_len
        self.pos = 0  # number of tokens already cached (the position of the next token)
        self.k = None
        self.v = None

    def get_pos(self):
        return self.pos

    def insert_kv(self, layer_idx, k, v):
        """Append k, v of shape (B, H_kv, T, head_dim) for `layer_idx`; return the layer's keys
        and values for positions [0, pos + T), each (B, H_kv, pos + T, head_dim)."""
        B, H, T, D = k.shape
        assert B == self.batch_size, f"cache holds batch {self.batch_size}, got {B}"
        end = self.pos + T
        if self.k is None:
            self.k = k.new_empty(self.num_layers, B, H, max(self.capacity, end), D)
            self.v = v.new_empty(self.num_layers, B, H, max(self.capacity, end), v.size(-1))
        elif end > self.k.size(3):
            self._grow(end)
        self.k[layer_idx, :, :, self.pos:end] = k
        self.v[layer_idx, :, :, self.pos:end] = v
        if layer_idx == self.num_layers - 1:
            self.pos = end
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def _grow(self, needed):
        """Reallocate to at least `needed` positions, doubling, keeping the cached tokens."""
        new_capacity = max(needed, 2 * self.k.size(3))
        pad = new_capacity - self.k.size(3)
        self.k = torch.cat([self.k, self.k.new_empty(*self.k.shape[:3], pad, self.k.size(4))], dim=3)
        self.v = torch.cat([self.v, self.v.new_empty(*self.v.shape[:3], pad, self.v.size(4))], dim=3)
        self.capacity = new_capacity

    def expand(self, num_samples):
        """A new cache of batch num_samples, each row a copy of this batch-1 cache (prefill once,
        then sample num_samples continuations). Only the filled positions are copied."""
        assert self.batch_size == 1, "expand() copies a batch-1 cache"
        other = KVCache(num_samples, self.num_layers, self.capacity)
        other.pos = self.pos
        if self.k is not None:
            other.k = self.k.new_empty(self.num_layers, num_samples, *self.k.shape[2:])
            other.v = self.v.new_empty(self.num_layers, num_samples, *self.v.shape[2:])
            other.k[:, :, :, :self.pos] = self.k[:, :, :, :self.pos]  # broadcast over the batch
            other.v[:, :, :, :self.pos] = self.v[:, :, :, :self.pos]
        return other


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Pick one token per row.

    logits: (B, vocab_size) float; rng: a torch.Generator on logits.device (seeded by the
    caller, so sampling is reproducible). temperature 0 means greedy (argmax, rng unused);
    top_k keeps only the k largest logits; top_p (nucleus sampling, Holtzman et al. 2019,
    https://arxiv.org/abs/1904.09751) then keeps the smallest set of most likely tokens whose
    probability adds up to top_p (always at least the most likely one). Returns (B, 1) int64.

    Raises:
        ValueError: temperature < 0, top_k < 1, or top_p outside [0, 1].
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1] or None, got {top_p}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    indices = None
    if top_k is not None:
        logits, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)  # (B, k)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        beyond = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # the mass before them already exceeds top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(beyond, 0.0))
    choice = torch.multinomial(probs, num_samples=1, generator=rng)  # (B, 1)
    return choice if indices is None else indices.gather(-1, choice)


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


class Engine:
    """Generation with a KV cache for a GPT and a tokenizer that has encode_special(name) and
    get_bos_token_id(). Rows stop at <|assistant_end|> or <|bos|>."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42, top_p=None):
        """Prefill `tokens` (a list of ints) once, then decode num_samples rows one token per step.

        Yields (token_column, token_masks) per step: lists of num_samples ints, the token each
        row produced and 1 for a sampled token, 0 for a token forced by the calculator tool
        (<|output_start|>result<|output_end|> after a row's <|python_end|>). Ends after max_tokens steps (default: until
        the model's sequence_len is reached) or once every row has produced a stop token; a row
        that already stopped keeps producing tokens until then, which callers ignore
        (generate_batch does).

        Raises:
            ValueError: empty `tokens`, or num_samples < 1.
        """
        if not tokens:
            raise ValueError("generate() needs at least one prompt token (e.g. <|bos|>)")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        device = self.model.lm_head.weight.device
        rng = torch.Generator(device=device).manual_seed(seed)
        stop_tokens = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}
        if max_tokens is None:
            max_tokens = max(0, self.model.config.sequence_len - len(tokens))
        n_layer = self.model.config.n_layer
        prefill_cache = KVCache(1, n_layer, len(tokens) + max_tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        logits = self.model(ids, kv_cache=prefill_cache)[:, -1, :]  # (1, vocab_size)
        logits = logits.expand(num_samples, -1)  # (num_samples, vocab_size)
        kv_cache = prefill_cache.expand(num_samples)
        del prefill_cache
        tool = self._tool_tokens()
        rows = [RowState() for _ in range(num_samples)]
        done = [False] * num_samples
        for step in range(max_tokens):
            sampled = sample_next_token(logits, rng, temperature, top_k, top_p)[:, 0].tolist()  # num_samples ints
            token_column, token_masks = [], []
            for row, token in zip(rows, sampled):
                forced = bool(row.forced)
                token = row.forced.pop(0) if forced else token
                token_column.append(token)
                token_masks.append(0 if forced else 1)
                if tool is not None:
                    self._advance_tool(row, token, tool)
            yield token_column, token_masks
            done = [d or t in stop_tokens for d, t in zip(done, token_column)]
            if all(done) or step == max_tokens - 1:
                break
            next_ids = torch.tensor(token_column, dtype=torch.long, device=device)[:, None]  # (num_samples, 1)
            logits = self.model(next_ids, kv_cache=kv_cache)[:, -1, :]  # (num_samples, vocab_size)

    def _tool_tokens(self):
        """The ids of the tool's special tokens, or None for a tokenizer without them."""
        try:
            return {name: self.tokenizer.encode_special(f"<|{name}|>")
                    for name in ("python_start", "python_end", "output_start", "output_end")}
        except (KeyError, ValueError):
            return None

    def _advance_tool(self, row, token, tool):
        """Feed one emitted token to a row's tool state; on <|python_end|> queue the result."""
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
        stop_tokens = {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for token_column, token_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(token_column, token_masks)):
                if done[i]:
                    continue
                if token in stop_tokens:
                    done[i] = True
                else:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks


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
