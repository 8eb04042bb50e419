"""
Chat with a trained model in the terminal: multi-turn, tokens printed as they are sampled,
tool calls (python) and their outputs shown in their own colours.

    python -m scripts.chat_cli                           # most advanced stage: rl > sft > mid > base
    python -m scripts.chat_cli --source sft --model-tag d20 --step 700
    python -m scripts.chat_cli -p "Why is the sky blue?" # one answer, then exit

At the prompt: `clear` starts a new conversation, `quit` / `exit` / Ctrl-D / Ctrl-C leave.
Ctrl-C while the model is answering stops that answer.

Not for: serving other programs (scripts/chat_web.py has the HTTP and OpenAI-compatible API).
"""

import os
import random
import readline  # noqa: F401  (importing it gives input() line editing and history)
import sys
from contextlib import nullcontext

import torch

from nanochat.checkpoint_manager import STAGE_DIRS, find_default_source, load_model
from nanochat.common import ArgumentParser, autodetect_device_type, autodetect_dtype, compute_init
from nanochat.engine import Engine, TokenDecoder

# Flags
parser = ArgumentParser(description="Chat with a trained model in the terminal")
parser.add_argument("--source", default=None, choices=list(STAGE_DIRS), help="default: the most advanced stage with a checkpoint (rl > sft > mid > base)")
parser.add_argument("--model-tag", default=None, help="default: the largest tag of the source")
parser.add_argument("--step", type=int, default=None, help="default: the last step")
parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA sm80+, else float32")
parser.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
parser.add_argument("--temperature", type=float, default=0.6, help="sampling temperature; 0 is greedy")
parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens")
parser.add_argument("--max-tokens", type=int, default=512, help="tokens per answer at most, cut to what fits the context")
parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: a new one per answer)")
args = parser.parse_args()
if args.temperature < 0 or args.top_k < 1 or args.max_tokens < 1:
    sys.exit("chat_cli: --temperature must be >= 0, --top-k >= 1, --max-tokens >= 1")

# Model
try:
    device_type = args.device_type or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    source = args.source or find_default_source()
    model, tokenizer, meta = load_model(source, device, "eval", model_tag=args.model_tag, step=args.step)
    model_tag, step = meta["model_tag"], meta["step"]
except (ValueError, FileNotFoundError) as e:
    sys.exit(f"chat_cli: {e}")
dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype] if args.dtype else autodetect_dtype(device_type)
num_params = sum(p.numel() for p in model.parameters())
print(f"Model nanochat-{source}-{model_tag}-step{step}: {num_params / 1e6:.1f}M params, context {model.config.sequence_len} tokens, "
      f"{str(dtype).removeprefix('torch.')} on {device}", flush=True)
engine = Engine(model, tokenizer)
SPECIAL = {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
STOP_TOKENS = {SPECIAL["<|assistant_end|>"], SPECIAL["<|bos|>"]}
PART_TYPE = {"text": "text", "python": "python", "output": "python_output"}  # decoder kind -> conversation part type
color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
STYLE = {"text": ("", ""), "python": ("\033[36m[python] ", "\033[0m"), "python_output": ("\033[33m[output] ", "\033[0m")} if color \
    else {"text": ("", ""), "python": ("[python] ", ""), "python_output": (" [output] ", " ")}


def answer(messages):
    """Sample the assistant's reply to `messages`, printing it as it comes.

    Returns the reply as a list of parts [{"type": "text"|"python"|"python_output", "text"}]
    (what render_conversation takes back next turn). Ctrl-C stops the reply early.
    """
    tokens = tokenizer.render_for_completion({"messages": messages})
    room = model.config.sequence_len - len(tokens)
    if room < 1:
        print(f"(the conversation is {len(tokens)} tokens, the model's whole context of {model.config.sequence_len}; type `clear`)")
        return []
    parts, decoder = [], TokenDecoder(tokenizer)

    def show(pieces):  # print and record decoded pieces, styling tool calls and outputs
        for kind, text in pieces:
            if kind == "special":
                continue
            part_type = PART_TYPE[kind]
            if not parts or parts[-1]["type"] != part_type:
                if parts and parts[-1]["type"] != "text":
                    print(STYLE[parts[-1]["type"]][1], end="")
                parts.append({"type": part_type, "text": ""})
                print(STYLE[part_type][0], end="")
            parts[-1]["text"] += text
            print(text, end="", flush=True)

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    autocast = torch.amp.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    try:
        with autocast:
            # --max-tokens cut to the room the prompt leaves: the tiny run's 512-token context holds no 512-token answer
            for token_column, _ in engine.generate(tokens, max_tokens=min(args.max_tokens, room), temperature=args.temperature,
                                                   top_k=args.top_k, seed=seed):
                token = token_column[0]
                if token in STOP_TOKENS:
                    break
                show(decoder.push(token))
    except KeyboardInterrupt:
        print(" (stopped)", end="")
    show(decoder.flush())
    if parts and parts[-1]["type"] != "text":
        print(STYLE[parts[-1]["type"]][1], end="")
    print(flush=True)
    return parts


# One prompt and exit
if args.prompt is not None:
    try:
        answer([{"role": "user", "content": args.prompt}])
    except ValueError as e:
        sys.exit(f"chat_cli: {e}")
    sys.exit(0)

# The conversation loop
print("Type a message and press Enter. `clear` starts over, `quit` (or Ctrl-D, Ctrl-C) leaves; Ctrl-C during an answer stops it.")
messages = []
while True:
    try:
        line = input("\nUser: ").strip()
    except (EOFError, KeyboardInterrupt):
        print()
        break
    if line in ("quit", "exit"):
        break
    if line == "clear":
        messages = []
        print("(conversation cleared)")
        continue
    if not line:
        continue
    messages.append({"role": "user", "content": line})
    print("\nAssistant: ", end="", flush=True)
    reply = answer(messages)
    if reply:
        messages.append({"role": "assistant", "content": reply})
    else:  # nothing came back: drop the question so the roles still alternate
        messages.pop()
