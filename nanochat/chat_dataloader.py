"""
Batches of conversations for the chat stages, with assistant-only loss and exact resume:

- packed_conversation_loader (midtraining): conversations rendered one after another into one
  token stream (each starts with <|bos|>), cut into (B, T) rows like pretraining text.
- sft_batches (SFT): one conversation per row, padded to the longest row of the batch.

In both, targets are -1 wherever the mask of render_conversation() is 0 (user turns, tool
outputs, padding), so only assistant-produced tokens are trained on. As in dataloader.py, there
is one global order of rows: a batch is the next B * world_size rows and rank r keeps rows
r*B ... r*B + B - 1, so any number of processes and accumulation steps trains on the same rows
per optimizer step, and the resume state is the same on every rank.

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

    Conversations 0, 1, 2, ... of `dataset` (any indexable of conversation dicts, e.g. a
    TaskMixture) are rendered one after another into one stream, looping over epochs; global row
    i is stream tokens i*T ... i*T + T, and this rank gets rows rank*B ... rank*B + B - 1 of each
    batch of B * world_size. inputs, targets: (B, T) int64; targets[b, t] is the token after
    inputs[b, t], or -1 where that token is not produced by the assistant. Consecutive rows
    overlap by one token (as in dataloader.py).

    loader_state = {"epoch", "index", "token_offset"}: the conversation holding the first token
    of the next batch and that token's index in its rendering. Rendering is deterministic, so a
    loader started from a loader_state (None = the beginning) yields exactly what the original
    would have yielded next, on any world size.

    Raises:
        ValueError: `dataset` is empty.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the conversation mixture is empty")
    state = {"epoch": 0, "index": 0, "token_offset": 0}
    if loader_state is not None:
        state = {k: int(loader_state[k]) for k in state}
    epoch, index = state["epoch"], state["index"]
    pending = deque()  # [(epoch, index, ids, mask)] rendered conversations with unconsumed tokens
    head_offset = state["token_offset"]
    buffered = -head_offset
    rows = B * world_size  # global rows per batch
    window = rows * T + 1
    while True:
        while buffered < window:  # render more conversations until a window fits
            ids, mask = tokenizer.render_conversation(dataset[index], max_tokens=T + 1)
            pending.append((epoch, index, ids, mask))
            buffered += len(ids)
            index += 1
            if index >= n:
                epoch, index = epoch + 1, 0
        tokens, masks = [], []
        head_offset = read_window(pending, head_offset, window, rows * T, (tokens, masks), lambda conv: conv[2:])
        buffered -= rows * T
        mine = slice(rank * B * T, (rank + 1) * B * T + 1)  # this rank's rows, and the next row's first token
        tokens, masks = tokens[mine], masks[mine]
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

    A batch takes the next B * world_size conversations of `dataset` (looping), and this rank
    collates rows rank*B ... rank*B + B - 1 of them (collate_conversations). The loader_state
    is the number of conversations all ranks have used: pass 0 for a new run, or a yielded
    loader_state to resume right after that batch (on any world size).

    Raises:
        ValueError: `dataset` is empty.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the SFT mixture is empty")
    used = loader_state
    while True:
        conversations = [dataset[(used + rank * B + i) % n] for i in range(B)]
        used += B * world_size
        inputs, targets = collate_conversations(tokenizer, conversations, max_tokens, device)
        yield inputs, targets, used
