"""
Look at, extend and check the identity conversations (identity_conversations.jsonl, which
dev/gen_identity_data.py generates and mid_train/chat_sft mix in):

    python -m dev.identity_data show -n 3                 # the first 3, readable, with line numbers
    python -m dev.identity_data add --user "Who made you?" --assistant "Ada, on a DGX Spark."
    python -m dev.identity_data validate                  # every line, as the training stages read it

`validate` renders every line with the tokenizer's render_conversation (the structure alone
when there is no trained tokenizer yet) and names the line number of each malformed one; `add`
checks the new conversation the same way before appending it (the file is rewritten atomically).

Not for: generating the default set (dev/gen_identity_data.py).
"""

import argparse
import json
import os
import sys

from nanochat.tokenizer import _parse_messages, get_tokenizer
from tasks.identity import identity_path, write_conversations


def check(conversation, tokenizer):
    """Raise ValueError (with what is wrong) when training could not use `conversation`."""
    if tokenizer is not None:
        tokenizer.render_conversation(conversation)
    else:
        _parse_messages(conversation)


def read_lines(path):
    """[(line number, conversation or None, error or None)] for every non-empty line of the JSONL."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append((number, json.loads(line), None))
                except json.JSONDecodeError as e:
                    out.append((number, None, f"not JSON ({e.msg} at column {e.colno})"))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="show, add to or validate the identity conversations")
    parser.add_argument("--file", default=identity_path(), help="default: $NANOCHAT_BASE_DIR/identity_conversations.jsonl")
    verbs = parser.add_subparsers(dest="verb", required=True)
    show = verbs.add_parser("show", help="print conversations readably")
    show.add_argument("-n", type=int, default=5, help="how many (default 5; 0: all)")
    add = verbs.add_parser("add", help="append one conversation (user/assistant turns in order)")
    add.add_argument("--system", default=None, help="an optional system message")
    add.add_argument("--user", action="append", required=True, help="a user turn (repeat for more)")
    add.add_argument("--assistant", action="append", required=True, help="the reply to the user turn before it")
    verbs.add_parser("validate", help="check every line as the training stages will read it")
    args = parser.parse_args(argv)

    if not os.path.exists(args.file):
        sys.exit(f"identity_data: no {args.file}; create it with `python -m dev.gen_identity_data`")
    try:
        tokenizer = get_tokenizer()
    except FileNotFoundError:
        tokenizer = None
    lines = read_lines(args.file)

    if args.verb == "show":
        for number, conversation, error in lines[:args.n or None]:
            print(f"--- line {number}" + (f": {error}" if error else ""))
            for message in (conversation or {}).get("messages", []):
                print(f"{message.get('role')}: {message.get('content')}")
        print(f"({len(lines)} conversations in {args.file})")
    elif args.verb == "add":
        if len(args.user) != len(args.assistant):
            sys.exit("identity_data: give one --assistant reply per --user turn")
        messages = [{"role": "system", "content": args.system}] if args.system else []
        for user, assistant in zip(args.user, args.assistant):
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        try:
            check({"messages": messages}, tokenizer)
        except ValueError as e:
            sys.exit(f"identity_data: not added: {e}")
        bad = [number for number, _, error in lines if error]
        if bad:
            sys.exit(f"identity_data: {args.file} has lines that are not JSON ({bad}); fix them first (validate)")
        write_conversations(args.file, [c for _, c, _ in lines] + [{"messages": messages}])
        print(f"added conversation {len(lines) + 1} to {args.file}")
    else:
        problems = []
        for number, conversation, error in lines:
            if error is None:
                try:
                    check(conversation, tokenizer)
                except ValueError as e:
                    error = str(e)
            if error:
                problems.append(f"line {number}: {error}")
        how = "rendered with the tokenizer" if tokenizer else "structure checked (no trained tokenizer yet)"
        if problems:
            print("\n".join(problems))
            sys.exit(f"identity_data: {len(problems)} of {len(lines)} conversations in {args.file} are malformed")
        print(f"all {len(lines)} conversations in {args.file} are valid ({how})")


if __name__ == "__main__":
    main()
