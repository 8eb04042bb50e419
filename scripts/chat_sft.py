"""
Supervised finetuning (SFT): train on whole conversations, one per row, with the loss on
assistant tokens only. Starts from the midtrained model (or the base model).

    python -m scripts.chat_sft                       # from the last mid checkpoint
    python -m scripts.chat_sft --source base --model-tag d20
    python -m scripts.chat_sft --resume              # continue a killed run

Writes chatsft_checkpoints/<model_tag>/ (the tag of the model it starts from).
"""

import argparse
import sys
from collections import deque

import torch

from nanochat.chat_dataloader import sft_batches
from nanochat.checkpoint_manager import load_model, load_training_state, save_training_state
from nanochat.common import ArgumentParser, any_rank, compute_cleanup, format_duration, print0
from nanochat.energy import StageClock
from nanochat.engine import Engine
from nanochat.run_shape import get_grad_accum_steps
from nanochat.training import (LossLog, PrefetchingLoader, ProgressMeter, check_chat_inputs_agree, setup_stage,
                               should_save, train_step)
from tasks.common import HubUnavailableError
from tasks.mixtures import resolve_data_mode, sft_mixture

# -----------------------------------------------------------------------------
# Flags
parser = ArgumentParser(description="Supervised finetuning on conversations")
parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
parser.add_argument("--data", default="auto", choices=["auto", "online", "offline"],
                    help="Hub datasets (online) or data built on this machine (offline); auto: online if the Hub answers")
parser.add_argument("--source", default="mid", choices=["base", "mid"], help="which checkpoint to start from")
parser.add_argument("--model-tag", default=None, help="model tag to start from (default: the largest)")
parser.add_argument("--model-step", type=int, default=None, help="checkpoint step to start from (default: the last)")
parser.add_argument("--device-batch-size", type=int, default=4, help="conversations per forward pass per process")
parser.add_argument("--target-examples-per-step", type=int, default=32, help="conversations per optimizer step")
parser.add_argument("--num-epochs", type=int, default=1)
parser.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: --num-epochs passes)")
parser.add_argument("--max-seq-len", type=int, default=None, help="crop conversations to this many tokens (default: the model's)")
parser.add_argument("--embedding-lr", type=float, default=0.2)
parser.add_argument("--unembedding-lr", type=float, default=0.004)
parser.add_argument("--matrix-lr", type=float, default=0.02)
parser.add_argument("--init-lr-frac", type=float, default=0.02, help="start at this fraction of the LRs, decay to 0")
parser.add_argument("--eval-every", type=int, default=100, help="val loss every N steps (-1: only at the end)")
parser.add_argument("--eval-steps", type=int, default=100, help="val batches per val loss")
parser.add_argument("--eval-metrics-every", type=int, default=200, help="task accuracies every N steps (-1: off)")
parser.add_argument("--eval-metrics-max-problems", type=int, default=1024, help="problems per task for those")
parser.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (-1: only at the end)")
parser.add_argument("--resume", action="store_true", help="continue from the last SFT checkpoint of this model tag")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the model (default: on for CUDA, off elsewhere)")
args = parser.parse_args()
user_config = vars(args).copy()

# -----------------------------------------------------------------------------
# Setup: compute, the model, the data
try:
    stage = setup_stage("sft", args.device_type, args.run, user_config, compile_flag=args.compile)
    model, tokenizer, source_meta = load_model(args.source, stage.device, phase="train", model_tag=args.model_tag,
                                               step=args.model_step)
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"chat_sft: {e}")
args.resume = any_rank(args.resume)  # all ranks resume or none: the shell decides per node, from its own files
stage.model_tag = source_meta["model_tag"]  # SFT checkpoints go under the tag of the model they start from
device, rank, world_size, autocast_ctx = stage.device, stage.rank, stage.world_size, stage.autocast_ctx
checkpoint_dir = stage.checkpoint_dir
model_config = model.config
max_tokens = args.max_seq_len or model_config.sequence_len
B = args.device_batch_size
try:
    grad_accum_steps = get_grad_accum_steps("--target-examples-per-step", args.target_examples_per_step,
                                            {"--device-batch-size": B, "processes": world_size})
    data = resolve_data_mode(args.data)
    train_set, val_set = sft_mixture(data, "train"), sft_mixture(data, "val")
except (HubUnavailableError, FileNotFoundError, ValueError) as e:
    sys.exit(f"chat_sft: {e}")
check_chat_inputs_agree(tokenizer, {"train mixture": train_set, "val mixture": val_set}, source_meta)
if args.num_iterations > 0:
    num_iterations = args.num_iterations
else:
    num_iterations = max(1, args.num_epochs * len(train_set) // args.target_examples_per_step)
metric_tasks = ["MMLU", "ARC-Easy"] if data == "online" else ["DefinitionMC", "Arithmetic"]

# Optimizers, resume
optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                    matrix_lr=args.matrix_lr, lr_scale=args.init_lr_frac)
start_step, loader_state = 0, 0  # loader_state: conversations all ranks have used
loop_state = {"min_val_loss": float("inf"), "smooth_train_loss": 0.0, "total_training_time": 0.0}
if args.resume:
    try:
        resume_step, meta, loader_state = load_training_state(checkpoint_dir, None, model, optimizers, device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"chat_sft: cannot resume: {e}. Drop --resume to start from the {args.source} model.")
    start_step, loop_state, num_iterations = resume_step, meta["loop_state"], meta["num_iterations"]
orig_model = model  # the uncompiled module: clean state_dict names, and the Engine's KV cache needs it
if stage.use_compile:
    # each batch is padded to its longest conversation, so the sequence length changes from
    # batch to batch: dynamic=True compiles one graph for all lengths instead of one per length
    model = torch.compile(model, dynamic=True)


def count_real_tokens(inputs, targets, pad_id):
    """The input tokens of an SFT batch that are not padding: () int64 tensor on the batch's device.

    inputs, targets: (B, L) from sft_batches, which pads each row at its end with pad_id inputs
    and -1 targets. A conversation's own last input predicts its closing <|assistant_end|>, a
    trained token, so a row's padding is exactly its trailing run of such positions (one token
    off in a row cropped by --max-seq-len just after an <|assistant_end|>: it counts as padding).
    """
    padding = (inputs == pad_id) & (targets < 0)  # (B, L)
    return inputs.numel() - padding.flip(1).cumprod(1).sum()  # cumprod keeps each row's trailing run


pad_id = tokenizer.encode_special("<|assistant_end|>")  # what collate_conversations pads inputs with
batch_tokens = deque()  # real input tokens of each batch fetched and not yet counted into a step, oldest first


def counting_tokens(batches):
    """`batches` unchanged, noting each batch's real input tokens in batch_tokens."""
    for inputs, targets, state in batches:
        batch_tokens.append(count_real_tokens(inputs, targets, pad_id))
        yield inputs, targets, state


train_batches = PrefetchingLoader(counting_tokens(sft_batches(tokenizer, train_set, B, max_tokens, device, rank,
                                                              world_size, loader_state)), loader_state)

print0(f"data: {data} | train conversations: {len(train_set):,} | val conversations: {len(val_set):,}")
print0(f"batch: {args.target_examples_per_step} conversations per step = {B} x {world_size} processes x "
       f"{grad_accum_steps} accumulation steps | steps: {num_iterations:,}")
clock = StageClock(loop_state, device_index=stage.local_rank)
loss_log = LossLog(loop_state, "chat_sft", "lower --init-lr-frac")
# steps differ in tokens (conversations differ in length): each step's count goes to meter.line
meter = ProgressMeter(num_iterations, start_step, unit="tok/s", flops_per_unit=orig_model.estimate_flops(),
                      peak_flops=stage.peak_flops)


def evaluate_val_loss():
    """Mean loss (nats per assistant token) over eval_steps batches of the val mixture, all ranks."""
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    for i, (inputs, targets, _) in enumerate(sft_batches(tokenizer, val_set, B, max_tokens, device, rank,
                                                          world_size)):
        if i == args.eval_steps:
            break
        with autocast_ctx:
            total += model(inputs, targets, loss_reduction="sum").float()
        count += (targets >= 0).sum()
    if stage.ddp:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(count)
    return (total / count.clamp(min=1)).item()


# -----------------------------------------------------------------------------
# Training loop: evaluate/save the model after `step` steps, then take step number step+1
val_loss, metrics = None, {}
for step in range(start_step, num_iterations + 1):
    last_step = step == num_iterations
    if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
        model.eval()
        val_loss = evaluate_val_loss()
        loop_state["min_val_loss"] = min(loop_state["min_val_loss"], val_loss)
        print0(f"step {step:05d} | val loss {val_loss:.4f}")
        stage.report.log_metrics("sft", step, val_loss=val_loss)
        stage.wandb_run.log({"step": step, "val/loss": val_loss})
        model.train()
    if args.eval_metrics_every > 0 and (last_step or (step > 0 and step % args.eval_metrics_every == 0)):
        from scripts.chat_eval import run_chat_eval  # the chat evaluator lives with its script, as upstream
        model.eval()
        engine = Engine(orig_model, tokenizer)
        with autocast_ctx:
            metrics = {name: run_chat_eval(name, orig_model, tokenizer, engine, batch_size=B, num_samples=1,
                                           max_new_tokens=256, temperature=0.0, top_k=50,
                                           max_problems=args.eval_metrics_max_problems) for name in metric_tasks}
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        stage.wandb_run.log({"step": step, **{f"metrics/{k}": v for k, v in metrics.items()}})
        model.train()
    if should_save(step, start_step, last_step, args.save_every):
        clock.update()
        save_training_state(checkpoint_dir, step, orig_model, optimizers, {
            "model_config": model_config.__dict__, "user_config": user_config, "num_iterations": num_iterations,
            "val_loss": val_loss, "loop_state": loop_state, "tokenizer_hash": tokenizer.content_hash(), "data": data,
            "source_checkpoint": {"source": args.source, "model_tag": stage.model_tag, "step": source_meta["step"]},
        }, train_batches.loader_state)
    if last_step:
        break

    lrm = 1.0 - step / num_iterations  # linear decay to 0
    stage.synchronize()
    meter.start()
    train_loss = train_step(model, train_batches, optimizers, grad_accum_steps, autocast_ctx, lrm)
    stage.synchronize()
    dt = meter.stop(step)
    loop_state["total_training_time"] += dt
    # the step's real tokens, all processes: train_step took the oldest grad_accum_steps batches
    # (the loader has fetched one more, which stays queued for the next step)
    step_tokens = sum(batch_tokens.popleft() for _ in range(grad_accum_steps))
    if stage.ddp:
        torch.distributed.all_reduce(step_tokens)
    smooth_loss = loss_log.update(step, train_loss)
    print0(meter.line(step, smooth_loss, lrm, dt, units=step_tokens.item()))
    stage.report.log_metrics("sft", step + 1, train_loss=smooth_loss)
    stage.wandb_run.log({"step": step + 1, "train/loss": smooth_loss, "train/lrm": lrm})

# -----------------------------------------------------------------------------
# Report
print0(f"training time: {format_duration(loop_state['total_training_time'])} | min val loss: {loop_state['min_val_loss']:.4f}")
stage.report.log("Chat SFT", [user_config, {
    "data": data, "source checkpoint": f"{args.source} {stage.model_tag} step {source_meta['step']}", "steps": num_iterations,
    "train conversations": len(train_set), "minimum val loss": loop_state["min_val_loss"], "final val loss": val_loss,
    **{f"{k} accuracy": v for k, v in metrics.items()},
    "training time": format_duration(loop_state["total_training_time"]), **clock.report_items(),
}])
stage.wandb_run.finish()
compute_cleanup()
