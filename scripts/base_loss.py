"""
Measure a base checkpoint: bits per byte on the train and validation splits, plus a few
greedy samples.

    python -m scripts.base_loss                        # largest model tag, last step
    python -m scripts.base_loss --model-tag d20 --step 21400 --split-tokens 10485760
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss
"""

import sys

from nanochat.checkpoint_manager import load_model
from nanochat.common import ArgumentParser, compute_cleanup, print0
from nanochat.dataloader import tokenizing_distributed_data_loader, without_state
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes
from nanochat.training import init_compute

# Flags
parser = ArgumentParser(description="Bits per byte of a base model on the train/val splits, and samples")
parser.add_argument("--model-tag", default=None, help="default: the largest tag in base_checkpoints/")
parser.add_argument("--step", type=int, default=None, help="default: the last step")
parser.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward pass")
parser.add_argument("--split-tokens", type=int, default=20 * 524288, help="tokens evaluated per split")
parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
args = parser.parse_args()

# Setup
try:
    compute = init_compute(args.device_type)
    model, tokenizer, meta = load_model("base", compute.device, phase="eval", model_tag=args.model_tag, step=args.step)
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"base_loss: {e}")
device, autocast_ctx = compute.device, compute.autocast_ctx
seq_len = model.config.sequence_len
token_bytes = get_token_bytes(device=device)
tokens_per_step = args.device_batch_size * seq_len * compute.world_size
steps = max(1, args.split_tokens // tokens_per_step)

# Bits per byte on each split
bpb = {}
for split in ("train", "val"):
    loader = without_state(tokenizing_distributed_data_loader(args.device_batch_size, seq_len, split, device=device))
    with autocast_ctx:
        bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
    print0(f"{split} bpb: {bpb[split]:.4f} ({steps * tokens_per_step:,} tokens)")

# Samples (rank 0)
samples = []
if compute.master_process:
    engine = Engine(model, tokenizer)
    for prompt in ["The capital of France is", "The chemical symbol of gold is", "The opposite of hot is",
                   "If yesterday was Friday, then tomorrow will be", "The planets of the solar system are:",
                   "My favorite color is", "If 5*x + 3 = 13, then x is"]:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        with autocast_ctx:
            results, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
        samples.append(tokenizer.decode(results[0][1:]))
        print0(f"sample: {samples[-1]!r}")

# Report
get_report().log("Base model loss", [
    {"model": f"{meta['model_tag']} step {meta['step']}",
     "train bpb": bpb["train"], "val bpb": bpb["val"], "tokens per split": steps * tokens_per_step},
    "Samples:\n\n" + "\n".join(f"- `{s!r}`" for s in samples),
])
compute_cleanup()
