"""
Midtraining: teach a base model the chat format, tool calls and multiple-choice answers by
training on conversations packed into full rows, with the loss on assistant tokens only.

    python -m scripts.mid_train                                  # last base checkpoint
    python -m scripts.mid_train --model-tag d34 --model-step 169150 --device-batch-size 4
    python -m scripts.mid_train --resume                         # continue a killed run

Reads base_checkpoints/<model_tag>/, writes mid_checkpoints/<model_tag>/ (the same tag). The
identity conversations are $NANOCHAT_BASE_DIR/identity_conversations.jsonl, written with the
defaults when missing (edit it, or see dev/gen_identity_data.py, to make the model yours).
"""

import argparse
import math
import sys

import torch

from nanochat.chat_dataloader import packed_conversation_loader
from nanochat.checkpoint_manager import load_model, load_training_state, save_training_state
from nanochat.common import ArgumentParser, any_rank, compute_cleanup, format_duration, print0
from nanochat.energy import StageClock
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes
from nanochat.run_shape import get_grad_accum_steps
from nanochat.training import (LossLog, PrefetchingLoader, ProgressMeter, check_chat_inputs_agree, get_lr_multiplier,
                               get_muon_momentum, setup_stage, should_save, train_step)
from tasks.common import HubUnavailableError
from tasks.mixtures import mid_mixture, resolve_data_mode

# -----------------------------------------------------------------------------
# Flags
parser = ArgumentParser(description="Midtrain a base model on conversations")
parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
parser.add_argument("--data", default="auto", choices=["auto", "online", "offline"],
                    help="Hub datasets (online) or data built on this machine (offline); auto: online if the Hub answers")
parser.add_argument("--model-tag", default=None, help="base model tag to start from (default: the largest)")
parser.add_argument("--model-step", type=int, default=None, help="base checkpoint step (default: the last)")
parser.add_argument("--max-seq-len", type=int, default=None, help="row length in tokens (default: the model's)")
parser.add_argument("--device-batch-size", type=int, default=None,
                    help="rows per forward pass per process (default: the pretraining run's, else 32)")
parser.add_argument("--total-batch-size", type=int, default=None,
                    help="tokens per optimizer step (default: the pretraining run's, else 524,288)")
parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: one pass over the mixture)")
parser.add_argument("--embedding-lr", type=float, default=0.2)
parser.add_argument("--unembedding-lr", type=float, default=0.004)
parser.add_argument("--matrix-lr", type=float, default=0.02)
parser.add_argument("--init-lr-frac", type=float, default=1.0, help="start at this fraction of the base LRs")
parser.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps with linear LR warmdown")
parser.add_argument("--eval-every", type=int, default=150, help="val bpb every N steps (-1: only at the end)")
parser.add_argument("--eval-tokens", type=int, default=None,
                    help="validation tokens per val bpb (default: the pretraining run's, else 20 x 524,288)")
parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (-1: only at the end)")
parser.add_argument("--resume", action="store_true", help="continue from the last mid checkpoint of this model tag")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the model (default: on for CUDA, off elsewhere)")
args = parser.parse_args()
user_config = vars(args).copy()

# -----------------------------------------------------------------------------
# Setup: compute, the base model, the data
try:
    stage = setup_stage("mid", args.device_type, args.run, user_config, compile_flag=args.compile)
    model, tokenizer, base_meta = load_model("base", stage.device, phase="train", model_tag=args.model_tag,
                                             step=args.model_step)
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"mid_train: {e}")
args.resume = any_rank(args.resume)  # all ranks resume or none: the shell decides per node, from its own files
stage.model_tag = base_meta["model_tag"]  # mid checkpoints go under the tag of the base model they start from
device, rank, world_size, autocast_ctx = stage.device, stage.rank, stage.world_size, stage.autocast_ctx
checkpoint_dir = stage.checkpoint_dir
model_config = model.config
T = args.max_seq_len or model_config.sequence_len
if T > model_config.sequence_len:
    sys.exit(f"mid_train: --max-seq-len {T} exceeds the model's context of {model_config.sequence_len} tokens")

# Batch and evaluation budget: the pretraining run's unless given, so that a run sized for this
# machine (a CPU preset, a GPU's memory) stays so; upstream's for a checkpoint that records none.
base_config = base_meta.get("user_config", {})
B = args.device_batch_size or base_meta.get("device_batch_size") or 32
total_batch_size = args.total_batch_size or base_meta.get("total_batch_size") or 524288
eval_tokens = args.eval_tokens or base_config.get("eval_tokens") or 20 * 524288
user_config.update(device_batch_size=B, total_batch_size=total_batch_size, eval_tokens=eval_tokens)
world_tokens_per_fwdbwd = B * T * world_size
try:
    grad_accum_steps = get_grad_accum_steps("--total-batch-size", total_batch_size,
                                            {"--device-batch-size": B, "--max-seq-len": T, "processes": world_size})
    data = resolve_data_mode(args.data)
    train_set, val_set = mid_mixture(data, "train"), mid_mixture(data, "val")
except (HubUnavailableError, FileNotFoundError, ValueError) as e:
    sys.exit(f"mid_train: {e}")
check_chat_inputs_agree(tokenizer, {"train mixture": train_set, "val mixture": val_set}, base_meta)

# Horizon: one pass over the mixture, estimated from the mean rendered length of a sample
if args.num_iterations > 0:
    num_iterations = args.num_iterations
else:
    sample = range(0, len(train_set), max(1, len(train_set) // 200))
    mean_tokens = sum(len(tokenizer.render_conversation(train_set[i], max_tokens=T + 1)[0]) for i in sample) / len(sample)
    num_iterations = max(1, math.ceil(len(train_set) * mean_tokens / total_batch_size))

# Optimizers, resume
optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                    matrix_lr=args.matrix_lr, lr_scale=args.init_lr_frac)
start_step, loader_state = 0, None
loop_state = {"min_val_bpb": float("inf"), "smooth_train_loss": 0.0, "total_training_time": 0.0}
if args.resume:
    try:
        resume_step, meta, loader_state = load_training_state(checkpoint_dir, None, model, optimizers, device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"mid_train: cannot resume: {e}. Drop --resume to start from the base model.")
    start_step, loop_state, num_iterations = resume_step, meta["loop_state"], meta["num_iterations"]
orig_model = model  # the uncompiled module: its state_dict has clean names
if stage.use_compile:
    model = torch.compile(model, dynamic=False)  # packed rows: every batch has the same (B, T) shape
train_batches = PrefetchingLoader(packed_conversation_loader(
    tokenizer, train_set, B, T, device, rank, world_size, loader_state), loader_state)
token_bytes = get_token_bytes(device=device)

print0(f"data: {data} | train conversations: {len(train_set):,} | val conversations: {len(val_set):,}")
print0(f"batch: {total_batch_size:,} tokens per step = {B} x {T} x {world_size} processes x "
       f"{grad_accum_steps} accumulation steps | steps: {num_iterations:,}")
clock = StageClock(loop_state, device_index=stage.local_rank)
loss_log = LossLog(loop_state, "mid_train", "lower the learning rates (--init-lr-frac) or resume from an earlier "
                   "checkpoint")
meter = ProgressMeter(num_iterations, start_step, unit="tok/s", units_per_step=total_batch_size,
                      flops_per_unit=orig_model.estimate_flops(), peak_flops=stage.peak_flops)

# -----------------------------------------------------------------------------
# Training loop (same shape as base_train: evaluate/save the model after `step` steps, then step)
val_bpb = None
for step in range(start_step, num_iterations + 1):
    last_step = step == num_iterations
    if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
        model.eval()
        val_loader = ((x, y) for x, y, _ in packed_conversation_loader(tokenizer, val_set, B, T, device, rank,
                                                                       world_size))
        try:
            with autocast_ctx:
                val_bpb = evaluate_bpb(model, val_loader, max(1, eval_tokens // world_tokens_per_fwdbwd),
                                       token_bytes)
        except ValueError as e:
            sys.exit(f"mid_train: {e}; raise --eval-tokens so the validation rows hold assistant tokens")
        loop_state["min_val_bpb"] = min(loop_state["min_val_bpb"], val_bpb)
        print0(f"step {step:05d} | val bpb {val_bpb:.4f} (assistant tokens)")
        stage.report.log_metrics("mid", step, val_bpb=val_bpb)
        stage.wandb_run.log({"step": step, "val/bpb": val_bpb})
        model.train()
    if should_save(step, start_step, last_step, args.save_every):
        clock.update()
        save_training_state(checkpoint_dir, step, orig_model, optimizers, {
            "model_config": model_config.__dict__, "user_config": user_config, "num_iterations": num_iterations,
            "val_bpb": val_bpb, "loop_state": loop_state, "tokenizer_hash": tokenizer.content_hash(),
            "data": data, "base_checkpoint": {"model_tag": stage.model_tag, "step": base_meta["step"]},
        }, train_batches.loader_state)
    if last_step:
        break

    lrm = get_lr_multiplier(step, num_iterations, 0.0, args.warmdown_ratio, 0.0)
    stage.synchronize()
    meter.start()
    train_loss = train_step(model, train_batches, optimizers, grad_accum_steps, autocast_ctx, lrm,
                            get_muon_momentum(step))
    stage.synchronize()
    dt = meter.stop(step)
    loop_state["total_training_time"] += dt
    smooth_loss = loss_log.update(step, train_loss)
    print0(meter.line(step, smooth_loss, lrm, dt))
    stage.report.log_metrics("mid", step + 1, train_loss=smooth_loss)
    stage.wandb_run.log({"step": step + 1, "train/loss": smooth_loss, "train/lrm": lrm, "train/dt": dt})

# -----------------------------------------------------------------------------
# Report
sps = meter.seconds_per_step()
mfu = meter.mfu(sps) if sps else None
print0(f"training time: {format_duration(loop_state['total_training_time'])} | min val bpb: {loop_state['min_val_bpb']:.4f}")
stage.report.log("Midtraining", [user_config, {
    "data": data, "base checkpoint": f"{stage.model_tag} step {base_meta['step']}", "steps": num_iterations,
    "train conversations": len(train_set), "minimum val bpb": loop_state["min_val_bpb"], "final val bpb": val_bpb,
    "MFU (steady state)": "n/a" if mfu is None else f"{mfu:.2f}%",
    "training time": format_duration(loop_state["total_training_time"]), **clock.report_items(),
}])
stage.wandb_run.finish()
compute_cleanup()
