"""
Muon: momentum, then orthogonalise the update of every 2-D weight matrix. Keller Jordan, "Muon:
An optimizer for hidden layers in neural networks" (2024), https://kellerjordan.github.io/posts/muon/ .
`Muon` runs in one process; `DistMuon` shards the work across torch.distributed ranks (it also
averages the gradients, so no DDP wrapper). Both apply the same per-group update, `muon_update`.

Each piece upstream nanochat added in January 2026 (dev/LOG.md, 2026-01-10) is a param-group
option, so bench/recipe.py can measure it alone:
- orthogonalizer: "newton_schulz" (Jordan's fixed quintic) or "polar_express" (Amsel et al. 2025,
  https://arxiv.org/abs/2505.16932: a different optimal quintic per iteration);
- normuon_beta2: NorMuon's per-neuron second-moment normalisation of the orthogonalised update
  (Li et al. 2025, https://arxiv.org/abs/2510.05491); 0 turns it off;
- weight_decay: cautious weight decay (Chen et al. 2024, https://arxiv.org/abs/2411.16085): decay
  only the entries whose update points the same way as the weight; the trainer schedules it.

Not for: embeddings, lm_head, per-layer scalars, or any non-2-D parameter (AdamW, see adamw.py).
"""

import torch
import torch.distributed as dist

# Quintic Newton–Schulz coefficients from Keller Jordan's Muon post: chosen to push every
# singular value in (0, 1] towards ~1 as fast as possible in 5 steps, trading exact
# convergence (they end in a band around 1, not at 1) for speed.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express: one (a, b, c) per iteration, the paper's optimal polynomials for 5 iterations
# with safety factor 2e-2 and cushion 2 (Amsel et al. 2025, arXiv 2505.16932, Algorithm 1; the
# values as upstream nanochat publishes them). The input is divided by 1.01 x its Frobenius
# norm, the safety margin these coefficients were computed for.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ORTHOGONALIZERS = ("newton_schulz", "polar_express")


def orthogonalization_dtype(device):
    """The dtype the orthogonalisation's matmuls run in on `device`: bf16 where bf16 matmuls are
    fast (CUDA with bf16 support; CPUs with AMX), fp32 elsewhere.

    A CPU without AMX has no fast bf16 GEMM: measured on a 2-core Xeon with oneDNN limited to
    AVX2, one d4 Muon step took 6,074 ms in bf16 and 115 ms in fp32 (53x), which alone made
    training ~4.8x slower than upstream; with AVX-512 but no AMX bf16 is still 1.3-3.3x slower;
    with AMX bf16 is 2.7x faster (bench/RESULTS.md).
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and torch.cpu._is_amx_tile_supported() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def orthogonalize(G, steps=5, method="newton_schulz", dtype=torch.bfloat16):
    """Approximate U V^T of G = U S V^T with `steps` quintic iterations X <- aX + (bA + cA²)X,
    A = X X^T, run in `dtype`.

    G: (..., rows, cols) float tensor (a batch of matrices is processed at once). Returns a
    tensor of `dtype` and G's shape whose singular values lie in a band around 1 (5 steps,
    measured in tests/test_optim.py: Newton–Schulz about 0.7-1.2, Polar Express closer to 1).
    method: "newton_schulz" (NS_COEFFS every step) or "polar_express" (POLAR_EXPRESS_COEFFS).

    Raises:
        ValueError: an unknown method, or more Polar Express steps than coefficients.
    """
    if method == "newton_schulz":
        coeffs, safety = [NS_COEFFS] * steps, 1.0
    elif method == "polar_express":
        if steps > len(POLAR_EXPRESS_COEFFS):
            raise ValueError(f"polar_express has coefficients for {len(POLAR_EXPRESS_COEFFS)} steps, got {steps}")
        coeffs, safety = POLAR_EXPRESS_COEFFS[:steps], 1.01
    else:
        raise ValueError(f"unknown orthogonalizer {method!r}; pick one of {', '.join(ORTHOGONALIZERS)}")
    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation so X @ X^T is the smaller Gram matrix
        X = X.mT
    # Scale so the spectral norm is <= 1 (Frobenius norm bounds it), where the iteration converges
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * safety + 1e-7)
    for a, b, c in coeffs:
        A = X @ X.mT  # (..., rows, rows)
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


def aspect_scale(shape):
    """max(1, rows/cols) ** 0.5: keeps the RMS size of an orthogonalised update comparable
    across tall and wide matrices (upstream nanochat's scaling)."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


def group_by_shape(params):
    """Split a list of 2-D params into param groups of equal shape (first-seen order, so every
    rank builds the same groups). Raises ValueError for a param that is not 2-D."""
    params = list(params)
    for p in params:
        if p.dim() != 2:
            raise ValueError(f"Muon only takes 2-D matrices, got a parameter of shape {tuple(p.shape)}; "
                             "give it to AdamW")
    shapes = dict.fromkeys(p.shape for p in params)
    return [dict(params=[p for p in params if p.shape == shape]) for shape in shapes]


def normalize_neurons(U, second_moment, beta2):
    """NorMuon's step: divide each neuron's update by the root of an EMA of its mean square,
    then rescale to U's Frobenius norm (so only the distribution across neurons changes).

    U: (n, rows, cols) orthogonalised updates, float. second_moment: (n, rows, 1) when
    rows >= cols, else (n, 1, cols), fp32, updated in place (the neurons are the longer side,
    as upstream nanochat measured best). Returns the normalised (n, rows, cols) fp32 update.
    Li et al. 2025, https://arxiv.org/abs/2510.05491 .
    """
    U = U.float()
    reduce_dim = -1 if U.size(-2) >= U.size(-1) else -2
    second_moment.lerp_(U.square().mean(dim=reduce_dim, keepdim=True), 1 - beta2)
    V = U * second_moment.clamp_min(1e-10).rsqrt()
    return V * (U.norm(dim=(-2, -1), keepdim=True) / V.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


@torch.no_grad()
def muon_update(params, grads, states, group):
    """New values of a stack of same-shape matrices after one Muon step.

    params, grads: lists of n (rows, cols) tensors; states: their optimizer-state dicts (the
    momentum and NorMuon buffers are created here). group: lr, momentum, nesterov, ns_steps,
    orthogonalizer, normuon_beta2 (0: off), weight_decay (cautious; 0: off). Per matrix W:
        buf = lerp(buf, G, 1 - momentum); U = lerp(G, buf, momentum) if nesterov else buf
        O = orthogonalize(U); O = normalize_neurons(O) when normuon_beta2 > 0
        W -= lr * aspect_scale(W) * (O + weight_decay * W * [O * W >= 0])
    Returns a (n, rows, cols) tensor in the params' dtype.
    """
    for g, state in zip(grads, states):
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        state["momentum_buffer"].lerp_(g, 1 - group["momentum"])
    buffers = [state["momentum_buffer"] for state in states]
    if group["nesterov"]:
        directions = torch.stack([g.lerp(buf, group["momentum"]) for g, buf in zip(grads, buffers)])
    else:
        directions = torch.stack(buffers)  # (n, rows, cols)
    update = orthogonalize(directions, group["ns_steps"], group["orthogonalizer"],
                           orthogonalization_dtype(directions.device))
    if group["normuon_beta2"] > 0:
        rows, cols = directions.shape[-2:]
        moment_shape = (rows, 1) if rows >= cols else (1, cols)
        for state in states:
            if "second_moment" not in state:
                state["second_moment"] = torch.zeros(moment_shape, dtype=torch.float32, device=directions.device)
        second_moment = torch.stack([state["second_moment"] for state in states])
        update = normalize_neurons(update, second_moment, group["normuon_beta2"])
        for state, moment in zip(states, second_moment):
            state["second_moment"].copy_(moment)
    W = torch.stack(params)
    update = update.to(W.dtype)
    lr = group["lr"] * aspect_scale(W.shape)
    if group["weight_decay"] > 0:
        update = update + group["weight_decay"] * W * ((update * W) >= 0)
    return W.sub_(lr * update)


MUON_DEFAULTS = dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, orthogonalizer="newton_schulz",
                     normuon_beta2=0.0, weight_decay=0.0)


class Muon(torch.optim.Optimizer):
    """Single-process Muon: params (2-D tensors) are grouped by shape, and each group takes one
    batched muon_update per step. Keyword arguments: MUON_DEFAULTS. group["lr"],
    group["momentum"] and group["weight_decay"] may be changed between steps (schedules).
    """

    def __init__(self, params, **options):
        super().__init__(group_by_shape(params), {**MUON_DEFAULTS, **options})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            new_values = muon_update(params, [p.grad for p in params], [self.state[p] for p in params], group)
            for p, value in zip(params, new_values):
                p.copy_(value)


class DistMuon(torch.optim.Optimizer):
    """Muon over torch.distributed ranks; gives the same update as `Muon` on the full batch.

    Per shape group of n matrices (padded with zeros to k * world_size, k = ceil(n / world)):
    the stacked gradients are reduce-scattered with an average, so rank r receives the
    averaged gradients of matrices [r*k, (r+1)*k) and owns them (their momentum buffers live
    only there). It computes their new values and all-gathers them so every rank ends with
    identical parameters. Communication of later groups overlaps the maths of earlier ones.
    Every parameter must have a gradient on every rank (all ranks run the same graph).
    Works with nccl and gloo (gloo has reduce_scatter_tensor with AVG; checked on torch 2.15).
    """

    def __init__(self, params, **options):
        super().__init__(group_by_shape(params), {**MUON_DEFAULTS, **options})

    @torch.no_grad()
    def step(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        reductions = []
        for group in self.param_groups:
            params = group["params"]
            assert all(p.grad is not None for p in params), "DistMuon needs a gradient for every matrix"
            k = -(-len(params) // world)
            pad = [torch.zeros_like(params[0])] * (k * world - len(params))
            grads = torch.stack([p.grad for p in params] + pad)  # (k * world, rows, cols)
            local = torch.empty_like(grads[:k])  # (k, rows, cols): this rank's averaged grads
            work = dist.reduce_scatter_tensor(local, grads, op=dist.ReduceOp.AVG, async_op=True)
            reductions.append((group, k, grads, local, work))
        gathers = []
        for group, k, grads, local, work in reductions:
            work.wait()
            params = group["params"]
            owned = params[rank * k:(rank + 1) * k]  # may be short (or empty) on the last ranks
            new_values = torch.zeros_like(local)
            if owned:
                new_values[:len(owned)] = muon_update(owned, list(local[:len(owned)]),
                                                      [self.state[p] for p in owned], group)
            gathered = torch.empty_like(grads)  # (k * world, rows, cols)
            work = dist.all_gather_into_tensor(gathered, new_values, async_op=True)
            gathers.append((params, gathered, new_values, work))
        for params, gathered, new_values, work in gathers:
            work.wait()
            for p, value in zip(params, gathered):
                p.copy_(value)
