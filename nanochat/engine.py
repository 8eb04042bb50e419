"""
Inference: the KV cache, next-token sampling (temperature, top-k) and the Engine that prefills
a prompt once and then decodes num_samples continuations one token per step.

Not for: training, the chat format (tokenizer.py renders conversations), or mixed precision
(callers wrap generation in torch.autocast when they want bf16).
"""

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


def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """Pick one token per row.

    logits: (B, vocab_size) float; rng: a torch.Generator on logits.device (seeded by the
    caller, so sampling is reproducible). temperature 0 means greedy (argmax, rng unused);
    top_k keeps only the k largest logits before sampling. Returns (B, 1) int64.

    Raises:
        ValueError: temperature < 0 or top_k < 1.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None:
        k = min(top_k, logits.size(-1))
        values, indices = torch.topk(logits, k, dim=-1)  # (B, k)
        probs = torch.softmax(values.float() / temperature, dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=rng)  # (B, 1) index into top k
        return indices.gather(-1, choice)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


class Engine:
    """Generation with a KV cache for a GPT and a tokenizer that has encode_special(name) and
    get_bos_token_id(). Rows stop at <|assistant_end|> or <|bos|>."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Prefill `tokens` (a list of ints) once, then decode num_samples rows one token per step.

        Yields (token_column, token_masks) per step: lists of num_samples ints, the token each
        row produced and 1 for a sampled token. Ends after max_tokens steps (default: until
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
        done = [False] * num_samples
        for step in range(max_tokens):
            next_ids = sample_next_token(logits, rng, temperature, top_k)  # (num_samples, 1)
            token_column = next_ids[:, 0].tolist()
            yield token_column, [1] * num_samples
            done = [d or t in stop_tokens for d, t in zip(done, token_column)]
            if all(done) or step == max_tokens - 1:
                break
            logits = self.model(next_ids, kv_cache=kv_cache)[:, -1, :]  # (num_samples, vocab_size)

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
