"""
Import a published checkpoint (a Hugging Face Hub repo or a local folder) into the base dir,
where the pipeline looks for it, so that midtraining, SFT or chat pick it up with no other step:

    python -m scripts.hf_import karpathy/nanochat-d32 --stage sft       # from the Hub
    python -m scripts.hf_import ~/Downloads/nanochat-d34 --stage base   # a local folder
    bash midtrain.sh --depth 34 --device-batch-size 4                   # then go on from it

Three layouts are understood (nanochat/hf.py detect_layout): model_<step>.pt + meta_<step>.json
+ tokenizer.pkl side by side (upstream's published checkpoints), a base dir (tokenizer/,
<stage>_checkpoints/<tag>/...), and a transformers export (config.json, model.safetensors,
tokenizer.json), which is converted back. Everything is validated before anything is written
(every tensor's name and shape against the model config, the architecture, the tokenizer's
vocabulary against the model's), so a failed import leaves the base dir as it was. A different
tokenizer already in the base dir is never replaced silently (--replace-tokenizer).
"""

import json
import os
import sys

import torch

from nanochat.checkpoint_manager import STAGE_DIRS, get_checkpoint_dir, list_steps, save_checkpoint
from nanochat.common import ArgumentParser, get_base_dir
from nanochat.hf import ImportError_, check_state_dict, detect_layout, native_from_transformers
from nanochat.tokenizer import RustBPETokenizer

parser = ArgumentParser(description="Import a published nanochat checkpoint into the base dir")
parser.add_argument("source", help="a Hugging Face repo id (owner/name) or a local folder")
parser.add_argument("--stage", default=None, choices=list(STAGE_DIRS),
                    help="place it as this stage's checkpoint (default: the base dir layout's own; required otherwise)")
parser.add_argument("--model-tag", default=None, help="default: d<n_layer>")
parser.add_argument("--step", type=int, default=None, help="which step when the folder has several (default: the last)")
parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
parser.add_argument("--replace-tokenizer", action="store_true",
                    help="replace a different tokenizer already in the base dir (its other checkpoints stop loading)")
args = parser.parse_args()


def fail(message):
    sys.exit(f"hf_import: {message}")


def list_files(folder):
    return [os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/") for d, _, fs in os.walk(folder) for f in fs]


def fetch(repo_id):
    """Download only the files a checkpoint needs from the Hub (resumable, with progress); return the folder."""
    from huggingface_hub import HfApi, snapshot_download
    try:
        files = HfApi().list_repo_files(repo_id, revision=args.revision)
        layout = detect_layout(files)
        wanted = {"transformers": ["config.json", "model.safetensors", "tokenizer.json"],
                  "root": ["tokenizer.pkl", "model_*.pt", "meta_*.json"],
                  "base_dir": ["tokenizer/*", "*_checkpoints/*/model_*.pt", "*_checkpoints/*/meta_*.json"]}[layout]
        return snapshot_download(repo_id, revision=args.revision, allow_patterns=wanted)
    except ImportError_:
        raise
    except Exception as e:  # the Hub's errors: unreachable, unknown repo, gated, ...
        fail(f"cannot download {repo_id} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0]}); "
             "check the repo id and the network, or download it yourself and pass the folder")


# -----------------------------------------------------------------------------
# Read and validate (nothing is written before this section ends)
folder = os.path.expanduser(args.source)
try:
    if not os.path.isdir(folder):
        if args.source.count("/") != 1 or args.source.startswith((".", "/", "~")):
            fail(f"{args.source} is neither a folder nor a Hub repo id (owner/name)")
        folder = fetch(args.source)
    files = list_files(folder)
    layout = detect_layout(files)
    stage = args.stage
    if layout == "transformers":
        model_config, state, tokenizer = native_from_transformers(folder)
        step, meta = args.step or 0, {}
    else:
        if layout == "base_dir":
            candidates = sorted({os.path.dirname(f) for f in files if "_checkpoints/" in f and f.endswith(".pt")})
            stage_of = {dirname: name for name, (dirname, _) in STAGE_DIRS.items()}
            if stage is None:
                stages = {stage_of.get(c.split("/")[0]) for c in candidates}
                stage = next(s for s in ("rl", "sft", "mid", "base") if s in stages)  # the most advanced one
            candidates = [c for c in candidates if c.split("/")[0] == STAGE_DIRS[stage][0]]
            if not candidates:
                fail(f"{folder} has no {STAGE_DIRS[stage][0]}/ checkpoints")
            checkpoint_dir, tokenizer_dir = os.path.join(folder, candidates[-1]), os.path.join(folder, "tokenizer")
        else:
            checkpoint_dir = tokenizer_dir = folder
        steps = list_steps(checkpoint_dir)
        if not steps:
            fail(f"{checkpoint_dir} has model files but no meta_<step>.json")
        step = args.step if args.step is not None else steps[-1]
        if step not in steps:
            fail(f"no step {step} in {checkpoint_dir}; it has {steps}")
        with open(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"), encoding="utf-8") as f:
            meta = json.load(f)
        model_config = meta.get("model_config")
        if not isinstance(model_config, dict):
            fail(f"meta_{step:06d}.json has no model_config")
        try:
            state = torch.load(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            fail(f"{checkpoint_dir} has meta_{step:06d}.json but no model_{step:06d}.pt")
        except Exception as e:  # a truncated or foreign file
            fail(f"model_{step:06d}.pt cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                 "download it again")
        try:
            tokenizer = RustBPETokenizer.from_directory(tokenizer_dir)
        except FileNotFoundError:
            fail(f"no tokenizer.pkl in {tokenizer_dir}: a checkpoint is useless without the tokenizer it was trained with")
    check_state_dict(state, model_config)
    if tokenizer.get_vocab_size() != model_config["vocab_size"]:
        fail(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model was built for "
             f"{model_config['vocab_size']}: they do not belong together")
    if stage is None:
        fail(f"say which stage this checkpoint is (--stage {'|'.join(STAGE_DIRS)}): "
             "base for a pretrained model, mid or sft for a chat model")
except (ImportError_, ValueError) as e:
    fail(str(e))

# -----------------------------------------------------------------------------
# Place it where the pipeline looks
base_dir = get_base_dir()
tokenizer_dir = os.path.join(base_dir, "tokenizer")
if os.path.exists(os.path.join(tokenizer_dir, "tokenizer.pkl")):
    try:
        present = RustBPETokenizer.from_directory(tokenizer_dir).content_hash()
    except ValueError:
        present = None
    if present != tokenizer.content_hash() and not args.replace_tokenizer:
        fail(f"{tokenizer_dir} holds another tokenizer, which the checkpoints trained here need; import into a "
             "fresh base dir (NANOCHAT_BASE_DIR=...) or pass --replace-tokenizer")
model_tag = args.model_tag or f"d{model_config['n_layer']}"
target = get_checkpoint_dir(stage, model_tag)
if step in list_steps(target):
    fail(f"{target} already has step {step}; pick another --model-tag")
tokenizer.save(tokenizer_dir)
meta = {**meta, "model_config": model_config, "tokenizer_hash": tokenizer.content_hash(),
        "imported_from": {"source": args.source, "layout": layout, "step": step}}
meta.pop("dataloader_state", None)  # its data position means nothing here
save_checkpoint(target, step, {k.removeprefix("_orig_mod."): v for k, v in state.items()}, None, meta)
print(f"imported {args.source} ({layout} layout, step {step}, d{model_config['n_layer']}, vocab "
      f"{model_config['vocab_size']}) as the {stage} checkpoint {target}")
print("next: " + {"base": f"bash midtrain.sh --depth {model_config['n_layer']}",
                  "mid": f"bash sft.sh --depth {model_config['n_layer']}", "sft": "./chat.sh", "rl": "./chat.sh"}[stage])
