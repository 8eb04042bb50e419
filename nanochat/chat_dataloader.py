"""
Batches of conversations for the chat stages, with assistant-only loss and exact resume:

- packed_conversation_loader (midtraining): conversations rendered one after another into one
  token stream (each starts with <|bos|>), cut into (B, T) rows like pretraining text.
- sft_batches (SFT): one conversation per row, padded to the longest row of the batch.

In both, targets are -1 wherever the mask of render_conversation() is 0 (user turns, tool
outputs, padding), so only assistant-produced tokens are trained on.

Not for: pretraining text (dataloader.py) or sampling prompts for RL (scripts/chat_rl.py).
"""

from collections import deque

import torch

from nanochat.dataloader import read_window


def _to_device(rows, device):
    """list of equal-length int lists -> (len(rows), len(row)) int64 tensor on `device`."""
    use_cuda = torch.device(device).type == "cuda"
    t = torch.tensor(rows, dtype=torch.long, pin_memory=use_cuda)
    return t.to(device, non_blocking=use_cuda)


def packed_conversation_loader(tokenizer, dataset, B, T, device, rank=0, world_size=1, loader_state=None):
    """Yield (inputs, targets, loader_state) forever from `dataset` packed into rows of T tokens.

    Rank r renders conversations r, r + world_size, ... of `dataset` (any indexable of
    conversation dicts, e.g. a TaskMixture), looping over epochs. inputs, targets: (B, T) int64;
    targets[b, t] is the token after inputs[b, t], or -1 where that token is not produced by
    the assistant. Consecutive windows overlap by one token (as in dataloader.py).

    loader_state = {"epoch", "index", "token_offset"}: the conversation holding the first token
    of the next window and that token's index in its rendering. Rendering is deterministic, so a
    loader started from a loader_state (None = the beginning) yields exactly what the original
    would have yielded next.

    Raises:
        ValueError: `dataset` has fewer conversations than ranks.
    """
    n = len(dataset)
    if n <= rank:
        raise ValueError(f"the conversation mixture has {n} conversations, too few for {world_size} processes")
    state = {"epoch": 0, "index": rank, "token_offset": 0}
    if loader_state is not None:
        state = {k: int(loader_state[k]) for k in state}
    epoch, index = state["epoch"], state["index"]
    pending = deque()  # [(epoch, index, ids, mask)] rendered conversations with unconsumed tokens
    head_offset = state["token_offset"]
    buffered = -head_offset
    window = B * T + 1
    while True:
        while buffered < window:  # render more conversations until a window fits
            ids, mask = tokenizer.render_conversation(dataset[index], max_tokens=T + 1)
            pending.append((epoch, index, ids, mask))
            buffered += len(ids)
            index += world_size
            if index >= n:
                epoch, index = epoch + 1, rank
        tokens, masks = [], []
        head_offset = read_window(pending, head_offset, window, B * T, (tokens, masks), lambda conv: conv[2:])
        buffered -= B * T
        targets = [t if m else -1 for t, m in zip(tokens[1:], masks[1:])]
        inputs = _to_device([tokens[:-1]], device).view(B, T)  # (B, T)
        targets = _to_device([targets], device).view(B, T)  # (B, T)
        next_epoch, next_index = pending[0][0], pending[0][1]
        yield inputs, targets, {"epoch": next_epoch, "index": next_index, "token_offset": head_offset}


def collate_conversations(tokenizer, conversations, max_tokens, device):
    """Render conversations into one padded batch: (inputs, targets), both (N, L) int64.

    L = the longest rendering (capped at max_tokens + 1) minus one. Padding uses <|assistant_end|>
    as input and -1 as target, so padded positions never contribute to the loss.
    """
    pad = tokenizer.encode_special("<|assistant_end|>")
    rendered = [tokenizer.render_conversation(c, max_tokens=max_tokens + 1) for c in conversations]
    length = max(len(ids) for ids, _ in rendered) - 1
    inputs, targets = [], []
    for ids, mask in rendered:
        row_targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        n_pad = length - (len(ids) - 1)
        inputs.append(ids[:-1] + [pad] * n_pad)
        targets.append(row_targets + [-1] * n_pad)
    return _to_device(inputs, device), _to_device(targets, device)


def sft_batches(tokenizer, dataset, B, max_tokens, device, rank=0, world_size=1, loader_state=0):
    """Yield (inputs, targets, loader_state) forever: B conversations per batch, one per row.

    The rank takes conversations rank, rank + world_size, ... of `dataset` (looping). The
    loader_state is the number of conversations this rank has used: pass 0 for a new run, or
    a yielded loader_state to resume right after that batch.
    """
    n = len(dataset)
    if n <= rank:
        raise ValueError(f"the SFT mixture has {n} conversations, too few for {world_size} processes")
    per_rank = len(range(rank, n, world_size))
    used = loader_state
    while True:
        conversations = [dataset[rank + ((used + i) % per_rank) * world_size] for i in range(B)]
        used += B
        inputs, targets = collate_conversations(tokenizer, conversations, max_tokens, device)
        yield inputs, targets, used
