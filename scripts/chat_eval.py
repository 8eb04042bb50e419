"""
Evaluate a chat model on the chat tasks and summarise them as ChatCORE: the mean over tasks of
the accuracy's distance from random guessing, (acc - baseline) / (1 - baseline).

    python -m scripts.chat_eval -i sft                              # every task of the data mode
    python -m scripts.chat_eval -i mid -a ARC-Easy MMLU             # some tasks ("ARC-Easy|MMLU" works too)
    python -m scripts.chat_eval -i sft -a Arithmetic DefinitionMC --max-problems 50 --data offline
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -i rl

Categorical tasks (multiple choice) are scored without sampling: the answer is the letter whose
token gets the highest logit right after <|assistant_start|>. Generative tasks sample replies
with the Engine (calculator tool included) and let the task grade them; with --num-samples k a
problem counts as solved when any of the k replies is right (pass@k).

Reads {base,mid,chatsft,chatrl}_checkpoints/<model_tag>/, writes the report section
"Chat evaluation <source>". Importable: chat_sft calls run_chat_eval during training.
"""

import sys
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import load_model
from nanochat.common import ArgumentParser, compute_cleanup, get_dist_info, print0
from nanochat.engine import Engine
from nanochat.execution import sandbox_kind
from nanochat.report import get_report
from nanochat.training import init_compute
from tasks.common import HubUnavailableError
from tasks.mixtures import EVAL_TASKS, eval_task_names, resolve_data_mode

# -----------------------------------------------------------------------------
# Flags
parser = ArgumentParser(description="Evaluate a chat model on the chat tasks (ChatCORE)")
parser.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"], help="which stage's model")
parser.add_argument("-a", "--task-name", nargs="+", default=None,
                    help=f"tasks to run (default: all of the data mode); any of {list(EVAL_TASKS)}")
parser.add_argument("--data", default="auto", choices=["auto", "online", "offline"],
                    help="default task list: nanochat's (online, needs the Hub) or the offline one; "
                         "auto: online if the Hub answers")
parser.add_argument("-x", "--max-problems", type=int, default=None, help="evaluate at most N problems per task")
parser.add_argument("-b", "--batch-size", type=int, default=8, help="prompts per forward pass (categorical tasks); sequences decoded together (generative tasks)")
parser.add_argument("-n", "--num-samples", type=int, default=1, help="replies per problem (generative tasks; pass@k)")
parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
parser.add_argument("-k", "--top-k", type=int, default=50, help="sample from the k most likely tokens")
parser.add_argument("-m", "--max-new-tokens", type=int, default=512, help="reply length limit (generative tasks)")
parser.add_argument("-g", "--model-tag", default=None, help="model tag to load (default: the largest)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")


# -----------------------------------------------------------------------------
# Scoring

def _all_reduce_counts(passed, total, device):
    """Sum (passed, total) over the processes of a torchrun job; unchanged in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return passed, total
    counts = torch.tensor([passed, total], dtype=torch.long, device=device)
    dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def _problem_indices(task, max_problems):
    """This process's share of the first max_problems problems (rank-strided)."""
    _, rank, _, world_size = get_dist_info()
    num_problems = len(task) if max_problems is None else min(len(task), max_problems)
    return range(rank, num_problems, world_size)


def _letter_token_ids(tokenizer, letters, task_name):
    ids = [tokenizer.encode(letter) for letter in letters]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"{task_name}: the answer letters {letters} must each be one token of this tokenizer")
    return [i[0] for i in ids]


@torch.no_grad()
def run_categorical_eval(task, model, tokenizer, batch_size, max_problems=None, task_name="task"):
    """(passed, total) on a multiple-choice task, by comparing the logits of the answer letters.

    Each prompt is render_for_completion(conversation), which ends in <|assistant_start|>; the
    prediction is the letter among conversation["letters"] whose token has the highest logit at
    that last position, graded by task.evaluate. Prompts are right-padded into batches of
    `batch_size`, and each row's logits are read at its own last real position.
    """
    device = model.lm_head.weight.device
    pad_id = tokenizer.encode_special("<|assistant_end|>")  # any id: padded positions are never read
    indices = list(_problem_indices(task, max_problems))
    passed = 0
    for b in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[b:b + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
        logits = model(ids)  # (B, T, vocab_size)
        last = torch.tensor([len(p) - 1 for p in prompts], device=device)
        logits = logits[torch.arange(len(prompts), device=device), last]  # (B, vocab_size)
        for row, conversation in enumerate(conversations):
            letters = conversation["letters"]
            letter_ids = _letter_token_ids(tokenizer, letters, task_name)
            choice = logits[row, letter_ids].argmax().item()
            passed += int(task.evaluate(conversation, letters[choice]))
    return _all_reduce_counts(passed, len(indices), device)


def run_generative_eval(task, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k,
                        max_problems=None, task_name="task", batch_size=8):
    """(passed, total) on a task graded on sampled replies, passed counting pass@num_samples.

    Each problem's prompt is prefilled once and its num_samples replies are decoded by the
    engine (tool calls and their outputs included), up to batch_size sequences at a time from
    several problems (continuous batching: as one reply ends, the next problem's joins); the
    problem passes if task.evaluate accepts any decoded reply. What a problem gets does not
    depend on batch_size.
    """
    device = engine.model.lm_head.weight.device
    indices = _problem_indices(task, max_problems)
    passed, t0 = 0, time.time()
    for start in range(0, len(indices), 50):  # 50 problems between progress lines
        conversations = [task[i] for i in indices[start:start + 50]]
        prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
        outputs = engine.generate_many(prompts, num_samples=num_samples, max_batch=batch_size, max_tokens=max_new_tokens,
                                       temperature=temperature, top_k=top_k)
        for conversation, prompt, (results, _) in zip(conversations, prompts, outputs):
            completions = [tokenizer.decode(r[len(prompt):]) for r in results]
            passed += int(any(task.evaluate(conversation, c) for c in completions))
        done = start + len(conversations)
        print0(f"  {task_name}: {done}/{len(indices)} problems on this process, {passed / done:.2%} "
               f"passed, {time.time() - t0:.0f}s")
    return _all_reduce_counts(passed, len(indices), device)


def evaluate_task(task_name, model, tokenizer, engine, batch_size, num_samples, max_new_tokens, temperature, top_k,
                  max_problems=None):
    """(passed, total) of the model on the EVAL_TASKS task `task_name`, summed over processes.

    Under torchrun every process takes every world_size-th problem and the counts are summed,
    so the result is the same as in one process. Callers choose the precision (wrap the call
    in torch.autocast for bf16).

    Raises:
        KeyError: an unknown task name.
        HubUnavailableError: the task needs the Hugging Face Hub and it cannot be reached.
    """
    task = EVAL_TASKS[task_name].build()
    was_training = model.training
    model.eval()
    if task.eval_type == "categorical":
        counts = run_categorical_eval(task, model, tokenizer, batch_size, max_problems, task_name)
    else:
        counts = run_generative_eval(task, tokenizer, engine, num_samples, max_new_tokens, temperature, top_k,
                                     max_problems, task_name, batch_size)
    model.train(was_training)
    return counts


def run_chat_eval(task_name, model, tokenizer, engine, batch_size, num_samples, max_new_tokens, temperature, top_k,
                  max_problems=None):
    """Accuracy in [0, 1] of the model on the EVAL_TASKS task `task_name` (see evaluate_task)."""
    passed, total = evaluate_task(task_name, model, tokenizer, engine, batch_size, num_samples, max_new_tokens,
                                  temperature, top_k, max_problems)
    return passed / total if total else 0.0


def chat_core(accuracies):
    """ChatCORE: the mean over tasks of (acc - baseline) / (1 - baseline), baselines from EVAL_TASKS.

    0 is random guessing, 1 is every task solved. accuracies: {task name: accuracy}.
    """
    centered = [(acc - EVAL_TASKS[name].baseline) / (1.0 - EVAL_TASKS[name].baseline)
                for name, acc in accuracies.items()]
    return sum(centered) / len(centered)


def results_table(accuracies):
    """The markdown table of the report section: task, accuracy, baseline, centered score, and ChatCORE."""
    lines = ["| task | accuracy | baseline | centered |", "|---|---|---|---|"]
    for name, acc in accuracies.items():
        baseline = EVAL_TASKS[name].baseline
        lines.append(f"| {name} | {acc:.4f} | {baseline:.2f} | {(acc - baseline) / (1 - baseline):.4f} |")
    lines.append(f"| **ChatCORE** | | | **{chat_core(accuracies):.4f}** |")
    return "\n".join(lines)


def _task_names(requested, data):
    """The tasks to run: -a names (also "A|B" as upstream writes them), else the data mode's defaults."""
    if not requested:
        return eval_task_names(data)
    names = [name for item in requested for name in item.split("|") if name]
    unknown = [name for name in names if name not in EVAL_TASKS]
    if unknown:
        sys.exit(f"chat_eval: unknown task(s) {unknown} in -a/--task-name; pick from {list(EVAL_TASKS)}")
    if data == "offline":
        hub = [name for name in names if EVAL_TASKS[name].needs_hub]
        if hub:
            sys.exit(f"chat_eval: {hub} need the Hugging Face Hub, but the data mode is offline; drop them from -a, "
                     f"or pass --data online where the Hub is reachable. Offline tasks: {eval_task_names('offline')}")
    return names


def main():
    args = parser.parse_args()
    for flag in ("batch_size", "num_samples", "max_new_tokens", "max_problems"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            sys.exit(f"chat_eval: --{flag.replace('_', '-')} must be at least 1, got {value}")

    # -------------------------------------------------------------------------
    # Setup: compute, the model, the task list
    try:
        compute = init_compute(args.device_type)
        data = resolve_data_mode(args.data)
        task_names = _task_names(args.task_name, data)
        model, tokenizer, meta = load_model(args.source, compute.device, phase="eval", model_tag=args.model_tag,
                                            step=args.step)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"chat_eval: {e}")
    if "HumanEval" in task_names:  # say now, not an hour in, when model-written code runs unisolated
        try:
            print0(f"HumanEval runs model-written code in the {sandbox_kind()} sandbox (nanochat/execution.py)")
        except RuntimeError as e:  # NANOCHAT_SANDBOX asks for what this machine cannot do
            sys.exit(f"chat_eval: {e}")
    engine = Engine(model, tokenizer)

    # -------------------------------------------------------------------------
    # Evaluate each task
    accuracies = {}
    for name in task_names:
        t0 = time.time()
        try:
            with compute.autocast_ctx:
                passed, total = evaluate_task(name, model, tokenizer, engine, args.batch_size, args.num_samples,
                                              args.max_new_tokens, args.temperature, args.top_k, args.max_problems)
        except (HubUnavailableError, ImportError, FileNotFoundError, ValueError) as e:
            sys.exit(f"chat_eval: task {name}: {e}")
        accuracies[name] = passed / total if total else 0.0
        print0(f"{name}: {accuracies[name]:.4f} ({passed}/{total} passed, {time.time() - t0:.1f}s)")

    # -------------------------------------------------------------------------
    # Summary and report
    table = results_table(accuracies)
    print0(table)
    print0(f"ChatCORE: {chat_core(accuracies):.4f}")
    get_report().log(f"Chat evaluation {args.source}", [{
        "source": args.source, "checkpoint": f"{meta['model_tag']} step {meta['step']}", "data": data,
        "max problems per task": args.max_problems or "all", "num samples": args.num_samples,
        "temperature": args.temperature, "top k": args.top_k, "max new tokens": args.max_new_tokens,
    }, table, {**accuracies, "ChatCORE": chat_core(accuracies)}])
    compute_cleanup()


if __name__ == "__main__":
    main()
