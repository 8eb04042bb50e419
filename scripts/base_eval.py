"""
Evaluate a base checkpoint on the CORE metric (DCLM's 22 in-context tasks, nanochat/core_eval.py).

    python -m scripts.base_eval                                   # largest model tag, last step, all examples
    python -m scripts.base_eval --model-tag d20 --step 21400 --max-per-task 500
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval

The eval bundle is downloaded to $NANOCHAT_BASE_DIR/eval_bundle/ on first use. Offline, copy
eval_bundle.zip to $NANOCHAT_BASE_DIR/ first. Prints a per-task table, writes it to
$NANOCHAT_BASE_DIR/base_eval/<model_tag>_<step>.csv and to the report.
"""

import csv
import os
import sys

from nanochat.checkpoint_manager import load_model
from nanochat.common import ArgumentParser, compute_cleanup, get_base_dir, print0
from nanochat.core_eval import EvalBundleError, ensure_eval_bundle, evaluate_core, format_core_table
from nanochat.report import get_report
from nanochat.training import init_compute

# Flags
parser = ArgumentParser(description="CORE metric of a base model")
parser.add_argument("--model-tag", default=None, help="default: the largest tag in base_checkpoints/")
parser.add_argument("--step", type=int, default=None, help="default: the last step")
parser.add_argument("--max-per-task", type=int, default=-1, help="examples per task (-1: all, the real CORE)")
parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
args = parser.parse_args()

# Setup: the bundle first, so an offline machine fails before spending time on the model
try:
    compute = init_compute(args.device_type)
    ensure_eval_bundle(compute.device)
    model, tokenizer, meta = load_model("base", compute.device, phase="eval", model_tag=args.model_tag, step=args.step)
except (ValueError, FileNotFoundError, EvalBundleError) as e:
    sys.exit(f"base_eval: {e}")
device, model_tag = compute.device, meta["model_tag"]
print0(f"CORE of base model {model_tag} step {meta['step']} | device {device} x {compute.world_size} | "
       f"dtype {compute.dtype} | max per task: {'all' if args.max_per_task <= 0 else args.max_per_task}")

# CORE
try:
    with compute.autocast_ctx:
        out = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task)
except EvalBundleError as e:
    sys.exit(f"base_eval: {e}")
table = format_core_table(out)
print0(table)
print0(f"CORE metric: {out['core_metric']:.4f}")

# Results: CSV and report (rank 0)
if compute.master_process:
    out_dir = os.path.join(get_base_dir(), "base_eval")
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, f"{model_tag}_{meta['step']:06d}.csv")
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "accuracy", "centered"])
        for label, accuracy in out["results"].items():
            writer.writerow([label, f"{accuracy:.6f}", f"{out['centered_results'][label]:.6f}"])
        writer.writerow(["CORE", "", f"{out['core_metric']:.6f}"])
    print0(f"results written to {csv_path}")
get_report().log("Base model evaluation", [
    {"model": f"{model_tag} step {meta['step']}", "max per task": args.max_per_task,
     "CORE metric": out["core_metric"]},
    table,
])
compute_cleanup()
