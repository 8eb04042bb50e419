"""
Export a checkpoint to a folder that Hugging Face transformers loads with no custom code
(NanoChatForCausalLM, transformers >= 5.0): weights as safetensors, config, tokenizer with the
chat template, generation defaults. See nanochat/hf.py for what goes in each file.

    python -m scripts.hf_export                              # the most advanced stage (rl > sft > mid > base)
    python -m scripts.hf_export --source sft --model-tag d20 --out ~/nanochat-d20-sft
    python -m scripts.hf_export --dtype float32              # full precision (default bfloat16)

Then, anywhere transformers is installed:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder); tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    reply = model.generate(**inputs, max_new_tokens=100)
"""

import os
import sys
import time

import torch

from nanochat.checkpoint_manager import STAGE_DIRS, find_default_source, load_model
from nanochat.common import ArgumentParser, get_base_dir
from nanochat.hf import ExportError, export_model

parser = ArgumentParser(description="Export a checkpoint to the Hugging Face transformers format")
parser.add_argument("--source", default=None, choices=list(STAGE_DIRS),
                    help="which stage's checkpoint (default: the most advanced with a checkpoint: rl > sft > mid > base)")
parser.add_argument("--model-tag", default=None, help="default: the largest tag of the source")
parser.add_argument("--step", type=int, default=None, help="default: the last step")
parser.add_argument("--out", default=None,
                    help="output folder (default: $NANOCHAT_BASE_DIR/hf_export/<model_tag>-<source>-<step>)")
parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="weights' dtype (default bfloat16)")
args = parser.parse_args()

try:
    source = args.source or find_default_source()
    model, tokenizer, meta = load_model(source, torch.device("cpu"), "eval", model_tag=args.model_tag, step=args.step)
except (FileNotFoundError, ValueError) as e:
    sys.exit(f"hf_export: {e}")
out_dir = args.out or os.path.join(get_base_dir(), "hf_export", f"{meta['model_tag']}-{source}-{meta['step']}")

t0 = time.time()
try:
    files = export_model(model.config, model.state_dict(), tokenizer, out_dir, args.dtype)
except ExportError as e:
    sys.exit(f"hf_export: cannot export {source} {meta['model_tag']} step {meta['step']}: {e}")
except ImportError as e:
    sys.exit(f"hf_export: {e}; run ./setup.sh (it installs safetensors and tokenizers)")
size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
print(f"exported {source} {meta['model_tag']} step {meta['step']} ({args.dtype}) to {out_dir} in {time.time() - t0:.1f} s: "
      f"{', '.join(files)} ({size / 2**20:.1f} MiB)")
print("load it with: AutoModelForCausalLM.from_pretrained(folder) and AutoTokenizer.from_pretrained(folder)")
