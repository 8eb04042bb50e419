"""
Share a trained model on the Hugging Face Hub: one repo that transformers users load directly
(the hf_export files) and nanochat users import and resume from (the native checkpoint and
tokenizer, in the base dir layout that scripts.hf_import reads), with a model card (README.md:
YAML metadata, the report card's metrics, time and energy, how to load and chat with it).

    python -m scripts.hf_upload --repo-id you/nanochat-d20 --dry-run     # the files and the card, nothing sent
    python -m scripts.hf_upload --repo-id you/nanochat-d20 --private     # needs `huggingface-cli login` or HF_TOKEN

The repo folder is staged under $NANOCHAT_BASE_DIR/hf_upload/<model_tag>-<source>-<step>/ first.
"""

import os
import shutil
import sys

import torch

from nanochat.checkpoint_manager import STAGE_DIRS, find_default_source, get_checkpoint_dir, load_model
from nanochat.common import ArgumentParser, get_base_dir
from nanochat.hf import ExportError, export_model

parser = ArgumentParser(description="Upload a trained model to the Hugging Face Hub, with a model card")
parser.add_argument("--source", default=None, choices=list(STAGE_DIRS),
                    help="which stage's checkpoint (default: the most advanced: rl > sft > mid > base)")
parser.add_argument("--model-tag", default=None, help="default: the largest tag of the source")
parser.add_argument("--step", type=int, default=None, help="default: the last step")
parser.add_argument("--repo-id", required=True, help="the Hub repo to create or update, e.g. you/nanochat-d20")
parser.add_argument("--private", action="store_true", help="create the repo private")
parser.add_argument("--license", default="mit", help="the model card's license (default mit, as nanochat's code)")
parser.add_argument("--dry-run", action="store_true", help="stage the folder and print its files and card; send nothing")
args = parser.parse_args()

# -----------------------------------------------------------------------------
# Stage the repo folder: the transformers export, the native files, the card
try:
    source = args.source or find_default_source()
    model, tokenizer, meta = load_model(source, torch.device("cpu"), "eval", model_tag=args.model_tag, step=args.step)
except (FileNotFoundError, ValueError) as e:
    sys.exit(f"hf_upload: {e}")
tag, step = meta["model_tag"], meta["step"]
base_dir = get_base_dir()
folder = os.path.join(base_dir, "hf_upload", f"{tag}-{source}-{step}")
shutil.rmtree(folder, ignore_errors=True)
try:
    export_model(model.config, model.state_dict(), tokenizer, folder)
except ExportError as e:
    sys.exit(f"hf_upload: cannot export {source} {tag} step {step}: {e}")
native_dir = os.path.join(folder, STAGE_DIRS[source][0], tag)
os.makedirs(native_dir)
for name in (f"model_{step:06d}.pt", f"meta_{step:06d}.json"):
    shutil.copy2(os.path.join(get_checkpoint_dir(source, tag), name), native_dir)
tokenizer.save(os.path.join(folder, "tokenizer"))


def report_tables():
    """The report card's Summary and Time and energy sections, or a line saying there is none."""
    path = os.path.join(base_dir, "report", "report.md")
    if not os.path.exists(path):
        return "No report card was generated for this run (`python -m nanochat.report generate`)."
    lines, keep = open(path, encoding="utf-8").read().splitlines(), False
    out = []
    for line in lines:
        if line.startswith("## "):
            keep = line in ("## Summary", "## Time and energy")
        if keep:
            out.append(line.replace("## ", "### ", 1) if line.startswith("## ") else line)
    return "\n".join(out) or "The report card has no Summary section."


c = model.config
tokens = meta.get("user_config", {}).get("total_batch_size")
card = f"""---
license: {args.license}
library_name: transformers
pipeline_tag: text-generation
tags:
- nanochat
- nanochat-spark
---

# {args.repo_id.split('/')[-1]}

A d{c.n_layer} nanochat model ({sum(p.numel() for p in model.parameters()):,} parameters, {c.n_embd} wide,
{c.n_head} heads, context {c.sequence_len}, vocabulary {c.vocab_size}) trained from scratch with
nanochat-spark, a single-GPU fork of [karpathy/nanochat](https://github.com/karpathy/nanochat):
tokenizer, pretraining, midtraining, SFT{', RL' if source == 'rl' else ''}. This is the {source} checkpoint, step {step}{f' ({tokens:,} tokens per step)' if tokens else ''}.

## Use it with transformers (>= 5.0)

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{args.repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{args.repo_id}")
inputs = tokenizer.apply_chat_template([{{"role": "user", "content": "Why is the sky blue?"}}],
                                       add_generation_prompt=True, return_dict=True, return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=200)[0], skip_special_tokens=True))
```

## Chat with it, or keep training it, with nanochat-spark

```bash
.venv/bin/python -m scripts.hf_import {args.repo_id}
./chat.sh
```

## Report card

{report_tables()}
"""
with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
    f.write(card)

files = sorted(os.path.relpath(os.path.join(d, n), folder) for d, _, names in os.walk(folder) for n in names)
print(f"staged {args.repo_id} in {folder}:")
for name in files:
    print(f"  {name}  {os.path.getsize(os.path.join(folder, name)) / 2**20:.2f} MiB")
if args.dry_run:
    print("\n" + card)
    print("dry run: nothing was uploaded")
    sys.exit(0)

# -----------------------------------------------------------------------------
# Upload
from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub import get_token  # noqa: E402

if not get_token():
    sys.exit("hf_upload: no Hugging Face token: run `huggingface-cli login` (or set HF_TOKEN to a token with write "
             "access), then run this again; the folder above is ready")
try:
    api = HfApi()
    api.create_repo(args.repo_id, private=args.private, exist_ok=True)
    api.upload_folder(repo_id=args.repo_id, folder_path=folder, commit_message=f"nanochat {tag} {source} step {step}")
except Exception as e:  # the Hub's errors: unreachable, no write access, ...
    sys.exit(f"hf_upload: the upload to {args.repo_id} failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
             f"the staged folder {folder} can be uploaded with `huggingface-cli upload {args.repo_id} {folder}`")
print(f"uploaded: https://huggingface.co/{args.repo_id}")
