"""
Generate identity_conversations.jsonl: multi-turn chats in which the model says who it is,
who trained it, how, and what it can and cannot do (the generator is tasks/identity.py).
Mid-training and SFT mix them in, and write the default set themselves when the file is
missing; run this to make the model yours:

    python -m dev.gen_identity_data --force --trainer-name "Ada Lovelace" --hardware "a single NVIDIA H100"

or edit the file afterwards. Output: one {"messages": [...]} per line, by default at
$NANOCHAT_BASE_DIR/identity_conversations.jsonl.

Not for: general chat data (SmolTalk or the offline tasks), or anything at training time.
"""

import argparse
import os

from tasks.identity import (DEFAULT_HARDWARE, DEFAULT_MODEL_NAME, DEFAULT_NUM_CONVERSATIONS, DEFAULT_TRAINER_NAME,
                            generate_conversations, identity_path, write_conversations)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=identity_path(),
                        help="where to write the JSONL (default: $NANOCHAT_BASE_DIR/identity_conversations.jsonl)")
    parser.add_argument("--model-name", "--model_name", default=DEFAULT_MODEL_NAME, help="what the model calls itself")
    parser.add_argument("--trainer-name", "--trainer_name", default=DEFAULT_TRAINER_NAME,
                        help="who the model says trained it")
    parser.add_argument("--hardware", default=DEFAULT_HARDWARE,
                        help='what the model says it was trained on, e.g. "a single NVIDIA H100"')
    parser.add_argument("--num-conversations", "--num_conversations", type=int, default=DEFAULT_NUM_CONVERSATIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file (and any edits in it)")
    args = parser.parse_args()

    if os.path.exists(args.output) and not args.force:
        parser.error(f"{args.output} already exists (perhaps with your edits); pass --force to overwrite it "
                     "or --output to write elsewhere")
    conversations = generate_conversations(args.num_conversations, args.seed, args.model_name, args.trainer_name,
                                           args.hardware)
    write_conversations(args.output, conversations)
    print(f"wrote {len(conversations)} identity conversations to {args.output}")


if __name__ == "__main__":
    main()
