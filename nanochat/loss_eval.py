"""
Bits per byte (bpb): the language-modelling loss in a unit that does not depend on the
tokenizer, so models with different vocabularies can be compared.

    bpb = (sum of the per-token losses, in nats) / (ln 2 * sum of the targets' UTF-8 byte lengths)

Both sums run over the targets that stand for text: special tokens (byte length 0, e.g.
<|bos|>) and ignored targets (-1) count in neither. Under torch.distributed both sums are
all-reduced before the division, so every rank returns the bpb of all ranks' tokens. A long
evaluation prints a progress line (batches done/total, ETA) every 30 s.

Not for: the CORE metric (core_eval.py) or chat task accuracy (scripts/chat_eval.py).
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import ProgressPrinter


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, progress_every_s=30.0):
    """Bits per byte of `model` over the next `steps` batches of `batches`.

    Args:
        model: called as model(inputs, targets, loss_reduction="none") -> per-token cross
            entropy in nats, (B*T,) or (B, T), 0 where the target is -1. Run it under the
            caller's autocast; the sums are kept in float64 (float32 on MPS).
        batches: iterator of (inputs, targets), both (B, T) int64; targets -1 are ignored.
            Under DDP each rank passes its own shard of the data (e.g. the val loader).
        steps: how many batches to take (the same on every rank).
        token_bytes: (vocab_size,) int tensor, each token's UTF-8 byte length, 0 for special
            tokens (nanochat.tokenizer.get_token_bytes).
        progress_every_s: print (rank 0) "evaluate_bpb: 120/1000 batches (12%) | 31s | eta 3m47s"
            each time this many seconds have passed since the start or the last such line, so
            an evaluation that ends sooner prints nothing.

    Returns:
        float, bits per byte.

    Raises:
        ValueError: `batches` ran out before `steps`, or no target had any bytes.
    """
    if steps <= 0:
        raise ValueError(f"evaluate_bpb: steps must be positive, got {steps}")
    progress = ProgressPrinter("evaluate_bpb", steps, "batches", progress_every_s)
    for step in range(steps):
        batch = next(batches, None)
        if batch is None:
            raise ValueError(f"evaluate_bpb: the batches ran out after {step} of {steps} steps; ask for fewer steps")
        inputs, targets = batch
        if step == 0:
            device = targets.device
            acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
            total_nats = torch.zeros((), dtype=acc_dtype, device=device)
            total_bytes = torch.zeros((), dtype=torch.int64, device=device)
            token_bytes = token_bytes.to(device)
        loss = model(inputs, targets, loss_reduction="none").reshape(-1)  # (B*T,)
        targets = targets.reshape(-1)  # (B*T,)
        valid = targets >= 0
        num_bytes = torch.where(valid, token_bytes[targets.clamp(min=0)], 0)  # (B*T,)
        counted = num_bytes > 0
        total_nats += torch.where(counted, loss.to(acc_dtype), 0).sum()
        total_bytes += num_bytes.sum()
        progress.update(step + 1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    if total_bytes.item() == 0:
        raise ValueError("evaluate_bpb: no target had any bytes (all were special tokens or ignored)")
    return total_nats.item() / (math.log(2) * total_bytes.item())
