"""
The GPT Transformer nanochat trains: config, modules in data-flow order, FLOPs estimate and
the optimizer split (AdamW for embeddings/lm_head, Muon for the block matrices).

Features: rotary position embedding (no learned positions), QK-norm, parameter-free RMSNorm,
ReLU² MLP, no biases, untied embedding/lm_head, fp32 logit softcap, grouped-query attention,
and an optional KV cache (nanochat.engine.KVCache) for inference.

Two architectures (GPTConfig.arch, recorded in every checkpoint's model_config):
- "classic": upstream nanochat as of Nov 2025; transformers' NanoChat implements exactly this.
- "modern": upstream's Jan 2026 additions (dev/LOG.md 2026-01-11 and 2026-01-17): learnable
  per-layer scalars on the residual stream, x = resid_lambdas[i] * x + x0_lambdas[i] * x0 before
  block i (x0: the normed embedding; modded-nanogpt), and gated value embeddings on alternating
  layers (the last included): v += 3 * sigmoid(W_gate x[:12]) * ve[token] per kv head (ResFormer,
  Zhou et al. 2024, https://arxiv.org/abs/2410.17897). Both are per-token and elementwise, so
  KV-cache decoding needs nothing new.

Not for: sampling loops and the KV cache itself (engine.py), the optimizers' maths (muon.py,
adamw.py), mixed-precision policy (the caller wraps forward in torch.autocast).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

from nanochat.adamw import DistAdamW
from nanochat.muon import DistMuon, Muon


@dataclass
class GPTConfig:
    sequence_len: int = 2048  # training context length, tokens
    vocab_size: int = 65536  # the tokenizer's vocabulary (lm_head/wte are padded beyond it)
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head); must divide n_head
    n_embd: int = 768
    arch: str = "classic"  # "classic" or "modern" (see the module docstring)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown --arch {self.arch!r}; pick one of {', '.join(ARCHS)}")

    @classmethod
    def from_depth(cls, depth, vocab_size=65536, sequence_len=2048, arch="classic"):
        """The single "depth dial": width and heads derived from the number of layers.

        n_embd = 64 * depth and n_head = ceil(n_embd / 128), i.e. head_dim 128 for every even
        depth (d20: 1280 wide, 10 heads). For odd depths 64*depth is not a multiple of
        ceil(n_embd/128); n_head is then raised to the next count that divides n_embd
        (d5: 320 wide, 4 heads of 80), so head_dim stays <= 128. n_kv_head = n_head.

        Raises:
            ValueError: depth < 1.
        """
        if depth < 1:
            raise ValueError(f"--depth must be >= 1, got {depth}")
        n_embd = 64 * depth
        n_head = math.ceil(n_embd / 128)
        while n_embd % n_head != 0:
            n_head += 1
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                   n_head=n_head, n_kv_head=n_head, n_embd=n_embd, arch=arch)


ARCHS = ("classic", "modern")
VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels of x (upstream nanochat)


def has_value_embedding(layer_idx, n_layer):
    """Whether layer layer_idx of a "modern" model has a value embedding: alternating layers,
    the last one always included (upstream measured alternating best, dev/LOG.md 2026-01-17)."""
    return layer_idx % 2 == (n_layer - 1) % 2


def padded_vocab_size(vocab_size, multiple=64):
    """Round the vocabulary up to a multiple of 64 so the lm_head matmul tiles cleanly on GPUs."""
    return ((vocab_size + multiple - 1) // multiple) * multiple


def norm(x):
    """Parameter-free RMSNorm over the last dim (eps: torch's default, finfo(dtype).eps), in x's dtype.

    CUDA autocast runs rms_norm in fp32 and returns fp32 (CPU autocast does not); casting back
    keeps the normed bf16 q and k in bf16, so the KV cache stores keys in bf16 like the values
    instead of in fp32 (twice the key memory, and a cast of every cached key at each decode
    step). SDPA casts them to bf16 anyway: the result is unchanged.
    """
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


def apply_rotary_emb(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + D/2]) by position-dependent angles (RoPE).

    Su et al. 2021, "RoFormer", https://arxiv.org/abs/2104.09864 (the half-split pairing used by
    GPT-NeoX/Llama rather than interleaved pairs). x: (B, T, H, D); cos, sin: (1, T, 1, D/2).
    """
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with RoPE, QK-norm and grouped-query heads.

    forward(x (B, T, n_embd), (cos, sin) for positions t0..t0+T-1, kv_cache or None)
    -> (B, T, n_embd). With a cache, queries attend to every cached key plus the new ones up
    to their own position.
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        assert config.n_head % config.n_kv_head == 0
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert self.head_dim % 2 == 0, "RoPE rotates pairs of channels"
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.ve_gate = None
        if config.arch == "modern" and has_value_embedding(layer_idx, config.n_layer):
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)

    def forward(self, x, ve, cos_sin, kv_cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value embedding, gated per kv head with a gate in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, n_kv_head)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        # QK-norm bounds the attention logits so no layer can blow up its softmax
        # (Henry et al. 2020, https://arxiv.org/abs/2010.04245; Dehghani et al. 2023, ViT-22B)
        q, k = norm(q), norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        # enable_gqa shares each k/v head among n_head/n_kv_head query heads without copying; on
        # CUDA only the flash backend takes it, so it is passed only when the heads differ
        gqa = self.n_kv_head != self.n_head
        if kv_cache is None:  # training: plain causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # the cache says which keys each query sees (causal with an offset, per row when ragged)
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)  # (B, H_kv, t_key, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_cache.attn_mask, is_causal=kv_cache.is_causal,
                                               enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, n_head * head_dim)
        return self.c_proj(y)


class MLP(nn.Module):
    """4x-wide feed-forward with ReLU²: (B, T, n_embd) -> (B, T, n_embd)."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        x = self.c_fc(x)  # (B, T, 4 * n_embd)
        x = F.relu(x).square()  # ReLU², So et al. 2021 "Primer", https://arxiv.org/abs/2109.08668
        return self.c_proj(x)  # (B, T, n_embd)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    """The Transformer. Build, then call init_weights() (the trainer builds under
    torch.device("meta"), calls to_empty(device=...), then init_weights(); a checkpoint loader
    does the same and then load_state_dict). Until init_weights() runs the weights and the
    rotary tables are not meaningful.
    """

    softcap = 15.0  # logit soft cap, Gemma 2 (https://arxiv.org/abs/2408.00118)
    rotary_base = 10000.0

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.padded_vocab_size = padded_vocab_size(config.vocab_size)
        self.transformer = nn.ModuleDict(dict(
            # _weight skips nn.Embedding's normal_() init: init_weights does it, and normal_ on the
            # meta device costs ~15 s of one-off imports on a 2-core CPU
            wte=nn.Embedding(self.padded_vocab_size, config.n_embd,
                             _weight=torch.empty(self.padded_vocab_size, config.n_embd)),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = nn.Linear(config.n_embd, self.padded_vocab_size, bias=False)
        if config.arch == "modern":
            self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
            kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
            self.value_embeds = nn.ModuleDict({
                str(i): nn.Embedding(self.padded_vocab_size, kv_dim, _weight=torch.empty(self.padded_vocab_size, kv_dim))
                for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
        # 10x the training context so chat/inference can run past it without a resize
        self.rotary_seq_len = config.sequence_len * 10
        # Filled by init_weights (arithmetic on the meta device also costs those imports).
        # Non-persistent: derived data, never in checkpoints.
        table_shape = (1, self.rotary_seq_len, 1, config.n_embd // config.n_head // 2)
        self.register_buffer("cos", torch.empty(table_shape), persistent=False)
        self.register_buffer("sin", torch.empty(table_shape), persistent=False)

    def _precompute_rotary(self, seq_len, device=None):
        """fp32 cos, sin tables of shape (1, seq_len, 1, head_dim/2), on every device: forward
        rounds them to the autocast dtype when autocast is on, and an fp32 run stays fp32."""
        head_dim = self.config.n_embd // self.config.n_head
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (self.rotary_base ** (channel / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)  # (seq_len, head_dim/2)
        cos, sin = freqs.cos(), freqs.sin()
        return cos[None, :, None, :], sin[None, :, None, :]

    @torch.no_grad()
    def init_weights(self, wte_init_std=1.0, fc_init_scale=1.0):
        """Initialise every parameter in place and (re)compute the rotary tables.

        - wte: normal, std wte_init_std (the RMSNorm right after it removes the scale from the
          forward pass; the scale still sets how far an Adam step moves a row, relatively).
        - lm_head: normal, std 0.001, so the first logits are ~0 and the loss starts at ln(V).
        - attention q/k/v and mlp c_fc: uniform(-a, a) with a = sqrt(3/fan_in), i.e. std
          1/sqrt(fan_in): unit-variance outputs for unit-RMS inputs (which RMSNorm guarantees).
          Uniform rather than normal because it has no tails, at the same variance. c_fc's bound
          is then multiplied by fc_init_scale.
          Upstream nanochat's 2026 values are wte_init_std 0.8 and fc_init_scale 0.4 (its commits
          6ed7d1d, "Embedding init std 1.0 -> 0.8, MLP c_fc init 0.5x smaller", and a825e63, 0.4x;
          tuned at d12); the defaults are the Nov-2025 ones.
        - attention c_proj and mlp c_proj: zero, so every block starts as the identity and the
          residual stream is just the embedding at step 0.
        - "modern" only (upstream nanochat's values): resid_lambdas from 1.15 at the first layer
          down to 1.05 at the last, x0_lambdas from 0.20 down to 0.05; value embeddings like c_v
          (uniform, std 1/sqrt(n_embd)); the value-embedding gates uniform(0, 0.02), so they start
          near 3 * sigmoid(0) = 1.5.
        """
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=wte_init_std)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0 / linear.in_features) * (fc_init_scale if linear is block.mlp.c_fc else 1.0)
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        if self.config.arch == "modern":
            depth_frac = torch.linspace(0, 1, self.config.n_layer) if self.config.n_layer > 1 else torch.zeros(1)
            self.resid_lambdas.copy_(1.15 - 0.10 * depth_frac)
            self.x0_lambdas.copy_(0.20 - 0.15 * depth_frac)
            bound = math.sqrt(3.0 / self.config.n_embd)
            for ve in self.value_embeds.values():
                nn.init.uniform_(ve.weight, -bound, bound)
        self.cos, self.sin = self._precompute_rotary(self.rotary_seq_len, device=self.lm_head.weight.device)

    def num_scaling_params(self):
        """Number of parameters N, counting all of them: wte, lm_head (padded rows included), the
        block matrices and, in a "modern" model, the value embeddings and scalars. This is upstream
        nanochat's Nov-2025 N for "tokens = 20 x N" (Chinchilla).
        """
        return sum(p.numel() for p in self.parameters())

    def num_matmul_params(self):
        """Parameters that multiply the token stream (every nn.Linear weight: the block matrices,
        the value-embedding gates and lm_head), 2 forward FLOPs each per token. Embedding tables
        (wte, value embeddings) are lookups and the per-layer scalars are elementwise, so neither
        counts. This is also upstream's Jan-2026 N for its tokens-per-parameter ratio: "Kaplan
        style", the count whose compute-optimal ratio stayed constant across 1e18-1e19 FLOPs
        (dev/LOG.md 2026-01-27).
        """
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward) at sequence_len.

        6 * num_matmul_params() for the matmuls (2 forward + 4 backward per weight per token),
        plus attention's 12 * n_layer * n_head * head_dim * sequence_len (QK^T and AV, 2 FLOPs per
        MAC, x3 for backward). Kaplan et al. 2020 (https://arxiv.org/abs/2001.08361) section 2.1;
        PaLM (https://arxiv.org/abs/2204.02311) appendix B. Causal masking is not discounted.
        """
        cfg = self.config
        head_dim = cfg.n_embd // cfg.n_head
        return 6 * self.num_matmul_params() + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.sequence_len

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, scalar_lr=0.5,
                         weight_decay=0.0, adam_betas=(0.8, 0.95), embedding_betas=None, x0_beta1=None,
                         lr_scale=1.0, **muon_options):
        """Return [adamw, muon]: AdamW on wte, lm_head (and a "modern" model's value embeddings and
        per-layer scalars), Muon on every 2-D block matrix.

        The embedding/lm_head learning rates are scaled by (n_embd / 768) ** -0.5 (tuned at width
        768). Value embeddings take half the embedding lr; resid_lambdas take scalar_lr / 100 (a
        multiplier compounds through the layers) and x0_lambdas scalar_lr (upstream nanochat,
        dev/LOG.md 2026-01-11). adam_betas are lm_head's, embedding_betas the embeddings' (default:
        adam_betas) and x0_beta1 the x0 scalars' beta1 (default: adam_betas'). weight_decay is
        Muon's cautious weight decay; muon_options go to Muon (orthogonalizer, normuon_beta2, ...).
        lr_scale multiplies every learning rate (the chat stages start from a fraction of the
        pretraining LRs). Every param group gets "initial_lr" = its lr, so an LR schedule sets
        group["lr"] = group["initial_lr"] * multiplier. With torch.distributed initialised and
        world_size > 1 the ZeRO-style DistAdamW/DistMuon are returned: they average gradients
        across ranks inside step(), so the model must not be wrapped in DDP.
        """
        matrix_params = [p for p in self.transformer.h.parameters()]
        embedding_params = list(self.transformer.wte.parameters())
        lm_head_params = list(self.lm_head.parameters())
        scale = (self.config.n_embd / 768) ** -0.5
        embedding_betas = embedding_betas or adam_betas
        adam_groups = [
            dict(params=lm_head_params, lr=unembedding_lr * scale, betas=adam_betas),
            dict(params=embedding_params, lr=embedding_lr * scale, betas=embedding_betas),
        ]
        if self.config.arch == "modern":
            gates = [b.attn.ve_gate.weight for b in self.transformer.h if b.attn.ve_gate is not None]
            matrix_params = [p for p in matrix_params if all(p is not g for g in gates)]
            x0_betas = (x0_beta1 or adam_betas[0], adam_betas[1])
            adam_groups += [
                dict(params=list(self.value_embeds.parameters()), lr=embedding_lr * scale / 2, betas=embedding_betas),
                dict(params=gates, lr=scalar_lr, betas=adam_betas),
                dict(params=[self.resid_lambdas], lr=scalar_lr / 100, betas=adam_betas),
                dict(params=[self.x0_lambdas], lr=scalar_lr, betas=x0_betas),
            ]
        assert sum(len(g["params"]) for g in adam_groups) + len(matrix_params) == len(list(self.parameters()))
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        adamw_kwargs = dict(eps=1e-10, weight_decay=0.0)
        if distributed:
            adamw = DistAdamW(adam_groups, **adamw_kwargs)
            muon = DistMuon(matrix_params, lr=matrix_lr, weight_decay=weight_decay, **muon_options)
        else:
            fused = self.lm_head.weight.device.type == "cuda"
            adamw = torch.optim.AdamW(adam_groups, fused=fused, **adamw_kwargs)
            muon = Muon(matrix_params, lr=matrix_lr, weight_decay=weight_decay, **muon_options)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] *= lr_scale
                group["initial_lr"] = group["lr"]
        return optimizers

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        """idx: (B, T) int64 token ids.

        Returns fp32 logits (B, T, vocab_size) when targets is None; otherwise the
        cross-entropy loss against targets (B, T) int64, where -1 marks positions to ignore:
        a scalar for loss_reduction "mean" (over non-ignored positions) or "sum", and (B, T)
        per-position losses (0 where ignored) for "none". With kv_cache (engine.KVCache), row b of idx
        continues the sequence cached in the b-th slot the cache selected, at that slot's length onwards.
        last_only (inference): logits of the last position only, (B, 1, vocab_size), which spares
        a prefill the lm_head matmul of every other position (most of a small model's FLOPs).

        Raises:
            ValueError: the sequence runs past the rotary tables (10 x sequence_len).
        """
        B, T = idx.size()
        positions = 0 if kv_cache is None else kv_cache.prepare(B, T, idx.device)  # int, or (B, T) when rows differ
        end = T if kv_cache is None else kv_cache.t_key
        if end > self.cos.size(1):
            raise ValueError(f"position {end} is past the rotary tables ({self.cos.size(1)} = 10 x sequence_len)")
        if isinstance(positions, int):
            cos, sin = self.cos[:, positions:positions + T], self.sin[:, positions:positions + T]  # fp32 (1, T, 1, head_dim/2)
        else:
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # fp32 (B, T, 1, head_dim/2)
        if torch.is_autocast_enabled(idx.device.type):  # bf16 q/k are rotated in bf16 (as upstream); fp32 runs in fp32
            dtype = torch.get_autocast_dtype(idx.device.type)
            cos, sin = cos.to(dtype), sin.to(dtype)
        cos_sin = cos, sin
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        x = norm(x)
        x0 = x  # the normed embedding, which a "modern" model mixes back in before every block
        modern = self.config.arch == "modern"
        for i, block in enumerate(self.transformer.h):
            ve = None
            if modern:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
                if str(i) in self.value_embeds:
                    ve = self.value_embeds[str(i)](idx)  # (B, T, n_kv_head * head_dim)
            x = block(x, ve, cos_sin, kv_cache)
        x = norm(x)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, n_embd)
        logits = self.lm_head(x)[..., :self.config.vocab_size]  # drop the padding rows
        logits = logits.float()  # (B, T, vocab_size), softcap and loss in fp32
        logits = self.softcap * torch.tanh(logits / self.softcap)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
        if loss_reduction == "none":
            loss = loss.view(B, T)
        return loss
