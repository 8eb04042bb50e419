"""
The memory model (nanochat/run_shape.py predict_peak_memory) against measurements, in the same run.

On a CPU it measures what the model's constants describe: the bytes autograd keeps for the
backward pass (torch.autograd.graph.saved_tensors_hooks sees every saved tensor, those of
torch.compile'd graphs included), for eager and compiled, bf16 autocast and fp32, and fits
ACTIVATION_BYTES / EMBEDDING_BYTES / LOGITS_BYTES by least squares (--fit). On CUDA it measures
the real peak of a training step (torch.cuda.max_memory_allocated and memory_reserved) and
prints predicted / measured, the ratio that says whether the constants need correcting.

    python -m bench.memory_model --fit                                  # CPU: the constants
    python -m bench.memory_model --depths 12,20 --batch-sizes 4,8,16     # CUDA: the real peak
"""

import argparse
from contextlib import nullcontext

import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.run_shape import predict_peak_memory


def build_model(depth, vocab_size, max_seq_len, device):
    """A freshly initialised d`depth` GPT on `device`, fp32 weights (as training keeps them)."""
    config = GPTConfig.from_depth(depth, vocab_size=vocab_size, sequence_len=max_seq_len)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def saved_tensor_bytes(model, batch_size, bf16, compile):
    """Bytes of the tensors autograd keeps for backward in one forward pass with a loss (weights
    and buffers excluded, each storage counted once), on the model's device."""
    device = model.lm_head.weight.device
    T, V = model.config.sequence_len, model.config.vocab_size
    x = torch.randint(0, V, (batch_size, T), device=device)
    ctx = torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    step_model = torch.compile(model, dynamic=False) if compile else model
    if compile:
        with ctx:
            step_model(x, x)  # compile outside the measurement
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        step_model(x, x)
    return sum(saved.values())


def cuda_peak_bytes(model, batch_size, compile, steps=2):
    """(max_memory_allocated, max_memory_reserved) in bytes over `steps` full training steps
    (bf16 autocast forward, backward, AdamW + Muon step) on CUDA, from a reset of the stats."""
    T, V = model.config.sequence_len, model.config.vocab_size
    optimizers = model.setup_optimizers()
    step_model = torch.compile(model, dynamic=False) if compile else model
    x = torch.randint(0, V, (batch_size, T), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        with torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = step_model(x, x)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def fit_constants(compile):
    """Least-squares fit of (ACTIVATION_BYTES, LOGITS_BYTES, EMBEDDING_BYTES) per (bf16, compile)
    from saved_tensor_bytes on this machine; prints the fit and its worst relative error."""
    import numpy as np
    for bf16 in (True, False):
        rows, measured = [], []
        for depth in (2, 3, 4, 6, 8):
            for vocab_size in (512, 2048):
                for batch_size, T in ((2, 128), (1, 256)):
                    model = build_model(depth, vocab_size, T, "cpu")
                    nbytes = saved_tensor_bytes(model, batch_size, bf16, compile)
                    copies = predict_peak_memory(depth, T, batch_size, vocab_size, bf16, compile).weight_copies
                    tokens = batch_size * T
                    rows.append([tokens * depth * 64 * depth, tokens * vocab_size, tokens * 64 * depth])
                    measured.append(nbytes - copies)
        coef, *_ = np.linalg.lstsq(np.array(rows, float), np.array(measured, float), rcond=None)
        worst = np.max(np.abs(np.array(rows) @ coef - measured) / np.array(measured))
        print(f"bf16={bf16} compile={compile}: ACTIVATION_BYTES {coef[0]:.1f}, LOGITS_BYTES {coef[1]:.1f}, "
              f"EMBEDDING_BYTES {coef[2]:.1f} (worst relative error {worst:.2%})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The memory model against measurements")
    parser.add_argument("--fit", action="store_true", help="CPU: fit the saved-tensor constants")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--depths", default="12,20")
    parser.add_argument("--batch-sizes", default="4,8,16")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=65536)
    args = parser.parse_args()
    if args.fit:
        fit_constants(args.compile)
    elif not torch.cuda.is_available():
        raise SystemExit("bench.memory_model: measuring the peak needs a CUDA GPU; on a CPU run it with --fit")
    else:
        print("| depth | batch x seq | compile | predicted GiB | max allocated GiB | max reserved GiB | predicted / allocated |")
        print("|---|---|---|---|---|---|---|")
        for depth in map(int, args.depths.split(",")):
            for batch_size in map(int, args.batch_sizes.split(",")):
                model = build_model(depth, args.vocab_size, args.max_seq_len, "cuda")
                predicted = predict_peak_memory(depth, args.max_seq_len, batch_size, args.vocab_size,
                                                compile=args.compile).total
                try:
                    allocated, reserved = cuda_peak_bytes(model, batch_size, args.compile)
                except torch.OutOfMemoryError:
                    allocated = reserved = None
                del model
                torch.cuda.empty_cache()
                cells = ["OOM", "OOM", "-"] if allocated is None else [
                    f"{allocated / 2**30:.1f}", f"{reserved / 2**30:.1f}", f"{predicted / allocated:.2f}"]
                print(f"| {depth} | {batch_size} x {args.max_seq_len} | {args.compile} | {predicted / 2**30:.1f} | "
                      + " | ".join(cells) + " |")
