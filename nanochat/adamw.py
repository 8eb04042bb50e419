"""
DistAdamW: AdamW over torch.distributed ranks with sharded optimizer state (ZeRO-2 style),
for the embedding and lm_head. In one process nanochat uses torch.optim.AdamW (fused on CUDA);
DistAdamW applies the same update (Loshchilov & Hutter 2019, https://arxiv.org/abs/1711.05101,
in torch.optim.AdamW's exact form) and also averages the gradients, so no DDP wrapper.

Not for: the 2-D block matrices (Muon, see muon.py).
"""

import math

import torch
import torch.distributed as dist


class DistAdamW(torch.optim.Optimizer):
    """AdamW whose gradients, state and update are split along dim 0 across ranks.

    Per parameter of shape (d0, ...): rows = ceil(d0 / world_size); the gradient (zero-padded
    to rows * world_size along dim 0) is reduce-scattered with an average, so rank r gets the
    averaged gradient of rows [r*rows, (r+1)*rows) and keeps exp_avg/exp_avg_sq for those rows
    only. It updates its slice in place, then the slices are all-gathered so every rank holds
    the full updated parameter. Parameters must have dim >= 1 and a gradient on every rank.
    Works with nccl and gloo (gloo has reduce_scatter_tensor with AVG; checked on torch 2.15).

    Update (per slice, as torch.optim.AdamW with amsgrad=False, maximize=False):
        p *= 1 - lr * weight_decay
        m = lerp(m, g, 1 - beta1); v = beta2 * v + (1 - beta2) * g^2
        p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        reductions = []
        for group in self.param_groups:
            for p in group["params"]:
                assert p.dim() >= 1 and p.grad is not None, "DistAdamW needs a gradient for every tensor with dim >= 1"
                rows = -(-p.size(0) // world)
                grad = p.grad
                if rows * world != p.size(0):
                    grad = torch.cat([grad, grad.new_zeros(rows * world - p.size(0), *grad.shape[1:])])
                local = torch.empty_like(grad[:rows])  # (rows, ...)
                work = dist.reduce_scatter_tensor(local, grad, op=dist.ReduceOp.AVG, async_op=True)
                reductions.append((group, p, rows, grad, local, work))
        gathers = []
        for group, p, rows, grad, local, work in reductions:
            work.wait()
            start = min(rank * rows, p.size(0))
            end = min(start + rows, p.size(0))
            self._update_slice(group, self.state[p], p[start:end], local[:end - start])
            send = torch.zeros_like(local, dtype=p.dtype)
            send[:end - start] = p[start:end]
            gathered = p.new_empty(rows * world, *p.shape[1:])
            work = dist.all_gather_into_tensor(gathered, send, async_op=True)
            gathers.append((p, gathered, send, work))
        for p, gathered, send, work in gathers:
            work.wait()
            p.copy_(gathered[:p.size(0)])

    @staticmethod
    def _update_slice(group, state, param, grad):
        """AdamW on one rank's rows: param (view into the full parameter) and grad (same shape)."""
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        state["step"] += 1
        t = state["step"]
        param.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1 ** t)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        param.addcdiv_(state["exp_avg"], denom, value=-step_size)
