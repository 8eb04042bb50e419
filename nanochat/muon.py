"""
Muon: momentum, then orthogonalise the update of every 2-D weight matrix with a Newton–Schulz
iteration. Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024),
https://kellerjordan.github.io/posts/muon/ . `Muon` runs in one process; `DistMuon` shards the
work across torch.distributed ranks (it also averages the gradients, so no DDP wrapper).

Not for: embeddings, lm_head, or any non-2-D parameter (those go to AdamW, see adamw.py).
"""

import torch
import torch.distributed as dist

# Quintic Newton–Schulz coefficients from Keller Jordan's Muon post: chosen to push every
# singular value in (0, 1] towards ~1 as fast as possible in 5 steps, trading exact
# convergence (they end in a band around 1, not at 1) for speed.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G, steps=5):
    """Approximate U V^T of G = U S V^T with a quintic Newton–Schulz iteration, in bf16.

    G: (..., rows, cols) float tensor (a batch of matrices is processed at once). Returns a
    bf16 tensor of the same shape whose singular values lie in a band around 1 (measured for
    5 steps: roughly 0.7 to 1.2, see tests/test_optim.py). Coefficients: NS_COEFFS.
    """
    a, b, c = NS_COEFFS
    X = G.bfloat16()
    transposed = G.size(-2) > G.size(-1)
    if transposed:  # iterate on the wide orientation so X @ X^T is the smaller Gram matrix
        X = X.mT
    # Scale so the spectral norm is <= 1 (Frobenius norm bounds it), where the iteration converges
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
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


def momentum_update(state, grad, momentum, nesterov):
    """Update the momentum buffer in `state` (an EMA of gradients) and return the direction to
    orthogonalise: the Nesterov look-ahead grad.lerp(buf, momentum), or the buffer itself."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(grad)
    buf = state["momentum_buffer"]
    buf.lerp_(grad, 1 - momentum)
    return grad.lerp(buf, momentum) if nesterov else buf


class Muon(torch.optim.Optimizer):
    """Single-process Muon.

    params: 2-D tensors; they are grouped by shape and each group is orthogonalised as one
    batched Newton–Schulz call. Per step, for every matrix W with gradient G:
        buf = lerp(buf, G, 1 - momentum); U = lerp(G, buf, momentum) if nesterov else buf
        W -= lr * aspect_scale(W) * orthogonalize(U, ns_steps)
    group["lr"] and group["momentum"] may be changed between steps (LR schedule, momentum warmup).
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(group_by_shape(params), defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            directions = torch.stack([momentum_update(self.state[p], p.grad, group["momentum"], group["nesterov"])
                                      for p in params])  # (n, rows, cols)
            updates = orthogonalize(directions, group["ns_steps"])
            alpha = -group["lr"] * aspect_scale(params[0].shape)
            for p, u in zip(params, updates):
                p.add_(u.to(p.dtype), alpha=alpha)


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

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(group_by_shape(params), defaults)

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
                directions = torch.stack([momentum_update(self.state[p], g, group["momentum"], group["nesterov"])
                                          for p, g in zip(owned, local)])
                updates = orthogonalize(directions, group["ns_steps"])
                alpha = -group["lr"] * aspect_scale(params[0].shape)
                for i, (p, u) in enumerate(zip(owned, updates)):
                    new_values[i] = p.add(u.to(p.dtype), alpha=alpha)
            gathered = torch.empty_like(grads)  # (k * world, rows, cols)
            work = dist.all_gather_into_tensor(gathered, new_values, async_op=True)
            gathers.append((params, gathered, new_values, work))
        for params, gathered, new_values, work in gathers:
            work.wait()
            for p, value in zip(params, gathered):
                p.copy_(value)
