"""
Reinforcement learning on math word problems, GRPO-lite: sample several replies per problem,
reward the ones whose final answer is right, and push up the log-probability of every token of
a reply in proportion to its reward minus the group's mean reward. On-policy, so there is no
PPO ratio, no trust region, no KL penalty, and no division by the group's std (REINFORCE with
a per-problem baseline). GSM8K with --data online, the generated Arithmetic task offline.

    python -m scripts.chat_rl                                     # from the last SFT checkpoint
    python -m scripts.chat_rl --source mid --data offline --num-iterations 100
    python -m scripts.chat_rl --resume                            # continue a killed run
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl --run rl1

Reads chatsft_checkpoints/<model_tag>/ (or mid_checkpoints), writes chatrl_checkpoints/<model_tag>/
(the same tag).
"""

import argparse
import sys

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import load_model, load_training_state, save_training_state
from nanochat.common import (ArgumentParser, ProgressPrinter, any_rank, compute_cleanup, format_duration, get_dist_info,
                             print0)
from nanochat.energy import StageClock
from nanochat.engine import Engine
from nanochat.training import (ProgressMeter, check_chat_inputs_agree, get_lr_multiplier, set_lr_and_momentum,
                               setup_stage, should_save)
from tasks.common import HubUnavailableError
from tasks.mixtures import resolve_data_mode, rl_task

# -----------------------------------------------------------------------------
# Flags
parser = ArgumentParser(description="Reinforcement learning (GRPO-lite) on math word problems")
parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
parser.add_argument("--data", default="auto", choices=["auto", "online", "offline"],
                    help="GSM8K from the Hub (online) or the generated Arithmetic task (offline); "
                         "auto: online if the Hub answers")
parser.add_argument("--source", default="sft", choices=["sft", "mid"], help="which stage's model to start from")
parser.add_argument("--model-tag", default=None, help="model tag to start from (default: the largest)")
parser.add_argument("--model-step", type=int, default=None, help="checkpoint step to start from (default: the last)")
parser.add_argument("--num-iterations", type=int, default=-1,
                    help="optimizer steps (-1: one pass over the training problems)")
parser.add_argument("--examples-per-step", type=int, default=16, help="problems per step, over all processes")
parser.add_argument("--num-samples", type=int, default=16, help="replies sampled per problem (the group)")
parser.add_argument("--device-batch-size", type=int, default=8, help="replies per forward/backward pass")
parser.add_argument("--sample-batch-size", type=int, default=64,
                    help="replies decoded together when sampling rollouts and val pass@k (several problems' groups at once)")
parser.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit")
parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
parser.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens")
parser.add_argument("--embedding-lr", type=float, default=0.2)
parser.add_argument("--unembedding-lr", type=float, default=0.004)
parser.add_argument("--matrix-lr", type=float, default=0.02)
parser.add_argument("--weight-decay", type=float, default=0.0, help="Muon cautious weight decay")
parser.add_argument("--init-lr-frac", type=float, default=0.05,
                    help="start at this fraction of the base LRs (then linear to 0)")
parser.add_argument("--eval-every", type=int, default=60, help="val pass@k every N steps (-1: only at the end)")
parser.add_argument("--eval-examples", type=int, default=400, help="val problems per evaluation")
parser.add_argument("--eval-samples", type=int, default=8, help="replies per val problem (the k of pass@k)")
parser.add_argument("--save-every", type=int, default=60, help="checkpoint every N steps (-1: only at the end)")
parser.add_argument("--resume", action="store_true", help="continue from the last RL checkpoint of this model tag")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the model for the policy-gradient passes (default: on for CUDA, off elsewhere)")


# -----------------------------------------------------------------------------
# Rollouts and the policy-gradient loss

def sample_rollouts(engine, tokenizer, prompts, seeds, num_samples, max_new_tokens, temperature, top_k, sample_batch_size):
    """Sample num_samples replies to each of `prompts` (one prefill per prompt; up to
    sample_batch_size replies of several prompts decoded together, each prompt's replies as they
    would be alone with its seed).

    Returns one (sequences, masks, replies) per prompt: sequences are prompt + reply tokens,
    including the stop token when the reply ended (stopping after the answer is part of what gets
    rewarded, so it is trained on too); masks are 1 on sampled tokens, 0 on the prompt and on
    tokens the calculator tool forced in; replies are the decoded replies without the stop token.
    """
    stop_tokens = engine.stop_tokens
    outputs = engine.generate_many(prompts, num_samples, max_batch=sample_batch_size, seeds=seeds, include_stop=True,
                                   max_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    groups = []
    for prompt, (sequences, masks) in zip(prompts, outputs):
        replies = [tokenizer.decode(seq[len(prompt):len(seq) - int(seq[-1] in stop_tokens and len(seq) > len(prompt))])
                   for seq in sequences]
        groups.append((sequences, masks, replies))
    return groups


def group_advantages(rewards):
    """Advantage of each reply in a group: its reward minus the group's mean (no std division).

    rewards: (num_samples,) float tensor -> (num_samples,), summing to zero.
    """
    return rewards - rewards.mean()


def collate_rollouts(sequences, masks, pad_id, device):
    """Right-pad rollouts into (inputs, targets), each (B, T_max - 1) int64; targets are -1 where
    the next token was not sampled (prompt, tool output, padding), so only sampled tokens count."""
    width = max(len(s) for s in sequences)
    inputs = torch.full((len(sequences), width - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), width - 1), -1, dtype=torch.long)
    for row, (seq, mask) in enumerate(zip(sequences, masks)):
        seq_t, mask_t = torch.tensor(seq, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)
        inputs[row, :len(seq) - 1] = seq_t[:-1]
        targets[row, :len(seq) - 1] = torch.where(mask_t[1:], seq_t[1:], -1)
    return inputs.to(device), targets.to(device)


def policy_gradient_loss(model, inputs, targets, advantages, num_tokens):
    """-sum(advantage x log p(token)) over the sampled tokens of these rows, divided by num_tokens.

    inputs, targets: (B, T) from collate_rollouts; advantages: (B,). num_tokens is the number of
    sampled tokens in the whole step, so summing this over the step's chunks gives the mean.
    """
    logp = -model(inputs, targets, loss_reduction="none")  # (B, T), 0 where targets == -1
    return -(logp * advantages[:, None]).sum() / num_tokens


def _sum_over_processes(values, device):
    """Sum a list of floats over the processes of a torchrun job (identity in one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate_pass_at_k(engine, tokenizer, task, num_examples, num_samples, max_new_tokens, temperature, top_k,
                       sample_batch_size):
    """(pass@1, pass@num_samples) over the first num_examples problems of `task`, rank-strided.

    pass@1 is the fraction of correct replies (the unbiased estimate from num_samples tries),
    pass@k the fraction of problems with at least one correct reply. Problem i is sampled with
    seed i, up to sample_batch_size replies of several problems decoded together.
    """
    _, rank, _, world_size = get_dist_info()
    device = engine.model.lm_head.weight.device
    correct, solved, problems = 0.0, 0.0, 0.0
    indices = list(range(rank, min(num_examples, len(task)), world_size))
    progress = ProgressPrinter("val pass@k", len(indices), "problems on this process")
    chunk = max(1, sample_batch_size // num_samples) * 4  # problems per call: a few batches' worth, then a progress line
    for start in range(0, len(indices), chunk):
        conversations = [task[i] for i in indices[start:start + chunk]]
        prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
        outputs = engine.generate_many(prompts, num_samples, max_batch=sample_batch_size, seeds=indices[start:start + chunk],
                                       max_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
        for conversation, prompt, (results, _) in zip(conversations, prompts, outputs):
            rewards = [task.reward(conversation, tokenizer.decode(r[len(prompt):])) for r in results]
            correct += sum(rewards) / num_samples
            solved += float(max(rewards) > 0)
            problems += 1
        progress.update(int(problems))
    correct, solved, problems = _sum_over_processes([correct, solved, problems], device)
    return correct / max(problems, 1), solved / max(problems, 1)


def main(argv=None):
    args = parser.parse_args(argv)
    user_config = vars(args).copy()
    for flag in ("examples_per_step", "device_batch_size", "sample_batch_size", "max_new_tokens", "eval_examples", "eval_samples"):
        if getattr(args, flag) < 1:
            sys.exit(f"chat_rl: --{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.num_samples < 2:
        sys.exit(f"chat_rl: --num-samples must be at least 2 (got {args.num_samples}): each reply's advantage is its "
                 "reward minus the mean reward of the replies to the same problem")

    # -------------------------------------------------------------------------
    # Setup: compute, the model, the task
    try:
        stage = setup_stage("rl", args.device_type, args.run, user_config, compile_flag=args.compile)
        data = resolve_data_mode(args.data)
        train_task, val_task = rl_task(data, "train"), rl_task(data, "val")
        model, tokenizer, source_meta = load_model(args.source, stage.device, phase="train", model_tag=args.model_tag,
                                                   step=args.model_step)
    except (ValueError, FileNotFoundError, HubUnavailableError) as e:
        sys.exit(f"chat_rl: {e}")
    check_chat_inputs_agree(tokenizer, {"train problems": train_task, "val problems": val_task}, source_meta)
    args.resume = any_rank(args.resume)  # all ranks resume or none: the shell decides per node, from its own files
    stage.model_tag = source_meta["model_tag"]  # RL checkpoints go under the tag of the model they start from
    device, rank, world_size, autocast_ctx = stage.device, stage.rank, stage.world_size, stage.autocast_ctx
    checkpoint_dir = stage.checkpoint_dir
    if args.examples_per_step % world_size != 0:
        sys.exit(f"chat_rl: --examples-per-step {args.examples_per_step} must be a multiple of the number of "
                 f"processes ({world_size})")
    model_config = model.config
    engine = Engine(model, tokenizer)  # on the uncompiled model: the KV cache changes shape with every token
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    num_iterations = (args.num_iterations if args.num_iterations > 0
                      else max(1, len(train_task) // args.examples_per_step))

    # Optimizers, resume. The loader state's "cursor" is the global index of the next training
    # problem (steps take consecutive problems, wrapping around the task).
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay,
                                        lr_scale=args.init_lr_frac)
    start_step, loader_state = 0, {"cursor": 0}
    loop_state = {"first_reward": None, "last_reward": None, "pass_at_1": None, "pass_at_k": None,
                  "total_training_time": 0.0}
    if args.resume:
        try:
            resume_step, meta, loader_state = load_training_state(checkpoint_dir, None, model, optimizers, device)
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"chat_rl: cannot resume: {e}. Drop --resume to start from the {args.source} model.")
        start_step, loop_state, num_iterations = resume_step, meta["loop_state"], meta["num_iterations"]
    orig_model = model  # the uncompiled module: clean state_dict names, and the engine samples with it
    if stage.use_compile:
        # the policy-gradient passes only: rollouts differ in length from step to step, so dynamic=True
        # compiles one graph for all lengths instead of one per length
        model = torch.compile(model, dynamic=True)

    print0(f"data: {data} | train problems: {len(train_task):,} | val problems: {len(val_task):,}")
    print0(f"step: {args.examples_per_step} problems x {args.num_samples} samples | steps: {num_iterations:,}")
    # throughput counts the tokens sampled plus the tokens the policy-gradient passes trained on
    # (prompt + reply, no padding), which differ from step to step; MFU their FLOPs (see the loop)
    meter = ProgressMeter(num_iterations, start_step, unit="tok/s (sampled + trained)", peak_flops=stage.peak_flops)
    flops_per_token = orig_model.estimate_flops()  # forward + backward, per trained token
    clock = StageClock(loop_state, device_index=stage.local_rank)

    # -------------------------------------------------------------------------
    # Training loop (evaluate/save the model after `step` steps, then step)
    for step in range(start_step, num_iterations + 1):
        last_step = step == num_iterations
        if last_step or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            with autocast_ctx:
                pass_at_1, pass_at_k = evaluate_pass_at_k(engine, tokenizer, val_task, args.eval_examples,
                                                          args.eval_samples, args.max_new_tokens, args.temperature,
                                                          args.top_k, args.sample_batch_size)
            loop_state["pass_at_1"], loop_state["pass_at_k"] = pass_at_1, pass_at_k
            print0(f"step {step:05d} | val pass@1 {pass_at_1:.4f} | pass@{args.eval_samples} {pass_at_k:.4f}")
            stage.report.log_metrics("rl", step, pass_at_1=pass_at_1)
            stage.wandb_run.log({"step": step, "val/pass@1": pass_at_1, f"val/pass@{args.eval_samples}": pass_at_k})
            model.train()
        if should_save(step, start_step, last_step, args.save_every):
            clock.update()
            save_training_state(checkpoint_dir, step, orig_model, optimizers, {
                "model_config": model_config.__dict__, "user_config": user_config, "num_iterations": num_iterations,
                "loop_state": loop_state, "tokenizer_hash": tokenizer.content_hash(), "data": data,
                "source_checkpoint": {"source": args.source, "model_tag": stage.model_tag, "step": source_meta["step"]},
            }, loader_state)
        if last_step:
            break

        stage.synchronize()
        meter.start()
        # Rollouts: this process's share of the step's problems, each a group of num_samples replies
        model.eval()
        sequences, masks, advantages, rewards = [], [], [], []
        sampled = 0  # reply tokens the engine sampled (or the calculator forced in) on this process
        cursor = loader_state["cursor"]
        indices = list(range(cursor + rank, cursor + args.examples_per_step, world_size))
        conversations = [train_task[index % len(train_task)] for index in indices]
        prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
        with autocast_ctx:  # seeded by the problems' indices: a resumed run samples what the original would have
            groups = sample_rollouts(engine, tokenizer, prompts, indices, args.num_samples, args.max_new_tokens,
                                     args.temperature, args.top_k, args.sample_batch_size)
        for conversation, prompt, (group_seqs, group_masks, replies) in zip(conversations, prompts, groups):
            group_rewards = torch.tensor([train_task.reward(conversation, r) for r in replies], dtype=torch.float32)
            sequences += group_seqs
            sampled += sum(len(s) - len(prompt) for s in group_seqs)
            masks += group_masks
            advantages.append(group_advantages(group_rewards))
            rewards.append(group_rewards)
        loader_state = {"cursor": cursor + args.examples_per_step}
        advantages, rewards = torch.cat(advantages).to(device), torch.cat(rewards)

        # Policy gradient: the mean over the step's sampled tokens, in chunks of device_batch_size replies
        model.train()
        num_tokens = max(1, sum(sum(m[1:]) for m in masks))
        for b in range(0, len(sequences), args.device_batch_size):
            inputs, targets = collate_rollouts(sequences[b:b + args.device_batch_size],
                                               masks[b:b + args.device_batch_size], pad_id, device)
            with autocast_ctx:
                loss = policy_gradient_loss(model, inputs, targets, advantages[b:b + args.device_batch_size],
                                            num_tokens)
            loss.backward()
        lrm = get_lr_multiplier(step, num_iterations, warmdown_ratio=1.0)  # linear from 1 to 0 over the run
        set_lr_and_momentum(optimizers, lrm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        stage.synchronize()
        dt = meter.stop(step)
        loop_state["total_training_time"] += dt

        reward_sum, reply_count, token_sum, sampled = _sum_over_processes(
            [rewards.sum().item(), len(rewards), sum(len(s) for s in sequences), sampled], device)
        mean_reward = reward_sum / reply_count
        trained = token_sum - reply_count  # each sequence's inputs: all its tokens but the last
        # sampling runs forward passes only, a third of a trained token's FLOPs (2 of 6 per
        # parameter); the prompts' prefill is left out
        step_flops = flops_per_token * (trained + sampled / 3)
        if loop_state["first_reward"] is None:
            loop_state["first_reward"] = mean_reward
        loop_state["last_reward"] = mean_reward
        print0(f"step {step + 1:05d}/{num_iterations:05d} | mean reward {mean_reward:.4f} | "
               f"mean sequence length {token_sum / reply_count:.0f} | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | "
               f"{meter.speed(dt, units=sampled + trained, flops=step_flops)} | "
               f"eta {format_duration(meter.eta_seconds(step))}")
        stage.wandb_run.log({"step": step + 1, "train/reward": mean_reward, "train/lrm": lrm, "train/dt": dt})
        stage.report.log_metrics("rl", step + 1, mean_reward=mean_reward)

    # -------------------------------------------------------------------------
    # Report
    print0(f"training time: {format_duration(loop_state['total_training_time'])} | "
           f"val pass@1: {loop_state['pass_at_1']:.4f}")
    stage.report.log("Chat RL", [user_config, {
        "data": data, "source checkpoint": f"{args.source} {stage.model_tag} step {source_meta['step']}",
        "steps": num_iterations, "problems per step": args.examples_per_step, "samples per problem": args.num_samples,
        "mean reward (first step)": loop_state["first_reward"], "mean reward (last step)": loop_state["last_reward"],
        "val pass@1": loop_state["pass_at_1"], f"val pass@{args.eval_samples}": loop_state["pass_at_k"],
        "training time": format_duration(loop_state["total_training_time"]), **clock.report_items(),
    }])
    stage.wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    main()
