"""
Pretrain the base model: tokens from the pretraining shards in, a GPT checkpoint out.

    python -m scripts.base_train --depth 20                       # one GPU, or the CPU
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train  # several GPUs (gloo on CPU)
    python -m scripts.base_train --depth 20 --resume               # continue a killed run
    python -m scripts.base_train --preset tiny --depth 8           # the CPU demo's defaults, a d8
    python -m scripts.base_train --recipe jan2026                  # upstream's 2026 recipe and architecture

Every shape flag left out (depth, batch, horizon, evaluation budget) comes from --preset through
nanochat/run_shape.py, the function scripts.plan prints the plan with: the plan is the run. Every
optimizer/schedule flag left out, and the architecture, come from --recipe (training.RECIPES).

Checkpoints go to $NANOCHAT_BASE_DIR/base_checkpoints/<model_tag>/. A resumed run restores the
model, the optimizer state, the LR schedule position, the data loader position and the RNG, so
it continues exactly where the killed run was (bit-identical on CPU).
"""

import argparse
import sys

import torch

from nanochat.checkpoint_manager import (capture_rng_state, find_last_step, list_steps, load_meta, load_training_state,
                                         prune_checkpoints, restore_rng_state, save_training_state)
from nanochat.common import (ArgumentParser, any_rank, check_ranks_agree, compute_cleanup, format_duration, print0,
                             writes_checkpoint_files)
from nanochat.core_eval import EvalBundleError, ensure_eval_bundle, evaluate_core
from nanochat.dataloader import bos_bestfit_data_loader, tokenizing_distributed_data_loader, without_state
from nanochat.dataset import shards_fingerprint
from nanochat.energy import StageClock
from nanochat.engine import Engine
from nanochat.fp8 import convert_blocks_to_fp8, fp8_unsupported_reason
from nanochat.gpt import ARCHS, GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb
from nanochat.muon import ORTHOGONALIZERS
from nanochat.run_shape import (KEEP_CHECKPOINTS, PRESETS, REFERENCE_BATCH_SIZE, RunShapeError, run_shape,
                                shape_flags)
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import (DEFAULT_RECIPE, RECIPES, LossLog, PrefetchingLoader, ProgressMeter,
                               get_lr_multiplier, get_muon_momentum, halve_device_batch, resolve_recipe,
                               scaled_weight_decay, setup_stage, should_compile, should_save, train_step)

# -----------------------------------------------------------------------------
# Flags
parser = ArgumentParser(description="Pretrain the base model")
parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
# The run's shape: every flag left out comes from the preset (nanochat/run_shape.py, the same
# function that prints the plan); "gpu" is upstream's d20 recipe, with CPU-sized evaluation on a CPU.
parser.add_argument("--preset", default="gpu", choices=list(PRESETS), help="defaults for the flags below (default: gpu)")
parser.add_argument("--recipe", default=None, choices=list(RECIPES),
                    help=f"hyperparameters, schedule, packing and architecture (training.RECIPES; default: {DEFAULT_RECIPE}; "
                         "a resumed run keeps the recipe it started with)")
# model
parser.add_argument("--arch", default=None, choices=list(ARCHS), help="classic or modern (default: the recipe's)")
parser.add_argument("--depth", type=int, default=None, help="number of layers; width = 64 x depth (gpu: 20)")
parser.add_argument("--max-seq-len", type=int, default=None, help="context length in tokens (gpu: 2048)")
parser.add_argument("--model-tag", default=None, help="checkpoint directory name (default: d<depth>)")
# horizon: the first of these that is set (> 0) wins
parser.add_argument("--num-iterations", type=int, default=None, help="optimizer steps (gpu: -1, derive)")
parser.add_argument("--target-flops", type=float, default=None, help="training FLOPs budget (gpu: -1, unused)")
parser.add_argument("--target-param-data-ratio", type=float, default=None,
                    help="tokens per parameter (the recipe's: nov2025 20 per parameter, jan2026 12 per matmul parameter)")
# batch
parser.add_argument("--device-batch-size", type=int, default=None,
                    help="sequences per forward pass per process (gpu: what fits the GPU's memory, up to 32; CPU: 4)")
parser.add_argument("--total-batch-size", type=int, default=None,
                    help="tokens per optimizer step; -1: from the horizon by Power Lines (the recipe's: 524,288 or -1)")
# optimizers and schedule: None = the recipe's value
parser.add_argument("--embedding-lr", type=float, default=None, help="AdamW lr of the token embedding")
parser.add_argument("--unembedding-lr", type=float, default=None, help="AdamW lr of lm_head")
parser.add_argument("--matrix-lr", type=float, default=None, help="Muon lr of the block matrices")
parser.add_argument("--scalar-lr", type=float, default=None, help="AdamW lr of the modern arch's per-layer scalars")
parser.add_argument("--orthogonalizer", default=None, choices=list(ORTHOGONALIZERS), help="Muon's orthogonalisation")
parser.add_argument("--normuon-beta2", type=float, default=None, help="NorMuon second-moment beta2 (0: off)")
parser.add_argument("--weight-decay", type=float, default=None,
                    help="Muon cautious weight decay at d12, x (12/depth)^2, ramped linearly to 0 (0: off)")
parser.add_argument("--lr-batch-scaling", action=argparse.BooleanOptionalAction, default=None,
                    help="scale the LRs by sqrt(total batch / 2^19)")
parser.add_argument("--packing", default=None, choices=["stream", "bestfit"],
                    help="training rows: one document stream cut into rows, or BOS-aligned best-fit (val: always stream)")
parser.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
parser.add_argument("--warmup-steps", type=int, default=None, help="steps of linear LR warmup")
parser.add_argument("--warmdown-ratio", type=float, default=None, help="fraction of steps with linear LR warmdown")
parser.add_argument("--final-lr-frac", type=float, default=None, help="LR at the end, as a fraction of the initial")
parser.add_argument("--wte-init-std", type=float, default=None, help="std of the token embedding's normal init")
parser.add_argument("--fc-init-scale", type=float, default=None, help="multiplies the MLP c_fc's uniform init bound")
# evaluation, sampling, checkpoints
parser.add_argument("--eval-every", type=int, default=None, help="val bpb every N steps (-1: only at the end; gpu: 250)")
parser.add_argument("--eval-tokens", type=int, default=None,
                    help="validation tokens per val bpb (gpu: 20 x 524,288 on CUDA, 8 device batches elsewhere)")
parser.add_argument("--core-metric-every", type=int, default=None, help="CORE every N steps (-1: off; gpu: 2000)")
parser.add_argument("--core-metric-max-per-task", type=int, default=500, help="examples per CORE task (-1: all)")
parser.add_argument("--sample-every", type=int, default=None, help="print samples every N steps (-1: off; gpu: 2000)")
parser.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (-1: only at the end; gpu: 1000)")
parser.add_argument("--keep-checkpoints", type=int, default=KEEP_CHECKPOINTS,
                    help=f"keep the last N checkpoints, delete older ones (0: keep all; default {KEEP_CHECKPOINTS})")
parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this model tag")
parser.add_argument("--resume-from-step", type=int, default=-1, help="continue from this checkpoint step")
parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the model (default: on for CUDA, and on a CPU for runs of 100+ steps)")
parser.add_argument("--seed", type=int, default=42, help="seed of the weight initialisation")
parser.add_argument("--fp8", action="store_true",
                    help="train the block matrices in fp8 (torchao, tensorwise; GPUs of sm_89 and newer)")
args = parser.parse_args()
user_config = vars(args).copy()

# -----------------------------------------------------------------------------
# Stage setup: device, precision, compile, wandb, report, checkpoint dir
try:
    stage = setup_stage("base", args.device_type, args.run, user_config, compile_flag=args.compile)
except ValueError as e:
    sys.exit(f"base_train: {e}")
args.resume = any_rank(args.resume)  # all ranks resume or none: the shell decides per node, from its own files
device, world_size, autocast_ctx = stage.device, stage.world_size, stage.autocast_ctx
if args.fp8 and (reason := fp8_unsupported_reason(device)):
    sys.exit(f"base_train: --fp8: {reason}")

# Tokenizer
try:
    tokenizer = get_tokenizer()
except FileNotFoundError as e:
    sys.exit(f"base_train: {e}")
token_bytes = get_token_bytes(device=device)
vocab_size = tokenizer.get_vocab_size()
# every node must train on the same tokens (a no-op in one process)
check_ranks_agree({"tokenizer": tokenizer.content_hash(), "shards": shards_fingerprint()},
                  "Give every node the same $NANOCHAT_BASE_DIR/tokenizer and base_data/ (copy them from the first "
                  "node, e.g. rsync -a), then start every node again")

# The run's shape: model size, batch, horizon, evaluation budget (exactly what scripts.plan printed)
def plan_run(**recipe):
    try:
        return run_shape(args.preset, device.type, world_size, compile=stage.use_compile, vocab_size=vocab_size,
                         **{**shape_flags(args), **recipe})
    except RunShapeError as e:
        sys.exit(f"base_train: {e}")


shape = plan_run()
stage.model_tag = args.model_tag or shape.model_tag
checkpoint_dir = stage.checkpoint_dir
# A resumed run keeps the recipe it started with: a new default must not change a run half-way
if (args.resume or args.resume_from_step >= 0) and list_steps(checkpoint_dir):
    try:
        meta = load_meta(checkpoint_dir, args.resume_from_step if args.resume_from_step >= 0 else find_last_step(checkpoint_dir))
    except FileNotFoundError as e:
        sys.exit(f"base_train: cannot resume: {e}")
    started_recipe = meta["user_config"].get("recipe") or "nov2025"  # the only recipe before Dec 2026
    if args.recipe is not None and args.recipe != started_recipe:
        sys.exit(f"base_train: cannot resume with --recipe {args.recipe}: this run started with recipe {started_recipe}. "
                 f"Resume it with --recipe {started_recipe} (or without --recipe), or start a new run under another "
                 "--model-tag")
    if started_recipe != shape.recipe:
        print0(f"resume: keeping recipe {started_recipe}, the one this run started with (the default is {shape.recipe})")
        shape = plan_run(recipe=started_recipe)
user_config.update({name: getattr(shape, name) for name in shape_flags(args) if hasattr(shape, name)})  # as run
if device.type == "cpu" and args.compile is None:  # a CPU compiles long runs only (training.should_compile)
    stage.use_compile = should_compile(None, "cpu", shape.num_iterations)
    if stage.use_compile:
        print0(f"compile: on ({shape.num_iterations} steps on a CPU pay back the one-off compile; --no-compile to skip)")
# The recipe: every optimizer and schedule setting the user left out
recipe_flags = {name: getattr(args, name) for name in RECIPES[shape.recipe] if hasattr(args, name)}
recipe = resolve_recipe(shape.recipe, **{**recipe_flags, "arch": shape.arch, "total_batch_size": shape.total_batch_size})
user_config.update({name: value for name, value in recipe.items() if user_config.get(name) is None})

# -----------------------------------------------------------------------------
# Model
model_config = GPTConfig.from_depth(shape.depth, vocab_size=vocab_size, sequence_len=shape.max_seq_len,
                                    arch=shape.arch)
with torch.device("meta"):
    model = GPT(model_config)
model.to_empty(device=device)
torch.manual_seed(args.seed)
init_rng_state = capture_rng_state()  # to re-initialise identically if memory runs out before the first checkpoint
init_scales = {name: recipe[name] for name in ("wte_init_std", "fc_init_scale")}  # used again for an OOM restart
model.init_weights(**init_scales)
if args.fp8:
    print0(f"fp8: {convert_blocks_to_fp8(model)} block matrices train in fp8 (torchao, tensorwise)"
           + ("" if stage.use_compile else "; without torch.compile fp8 is slower than bf16"))
orig_model = model  # the uncompiled module: its state_dict has clean names, and it handles variable shapes
num_params = model.num_scaling_params()
flops_per_token = model.estimate_flops()

# Batch: gradient accumulation makes up total_batch_size from device batches on every process
# (both halve/double on a CUDA out-of-memory error, see the training loop)
device_batch_size, grad_accum_steps = shape.device_batch_size, shape.grad_accum_steps
num_iterations, horizon = shape.num_iterations, shape.horizon
total_tokens = shape.tokens

# Optimizers. With lr_batch_scaling every LR goes as sqrt(batch / 2^19) (AdamW's square-root rule,
# which upstream also applies to Muon), and the weight decay as 1/width² from its d12 value.
lr_scale = (shape.total_batch_size / REFERENCE_BATCH_SIZE) ** 0.5 if recipe["lr_batch_scaling"] else 1.0
weight_decay = scaled_weight_decay(recipe["weight_decay"], shape.depth)


def build_optimizers():
    return model.setup_optimizers(
        unembedding_lr=recipe["unembedding_lr"], embedding_lr=recipe["embedding_lr"], matrix_lr=recipe["matrix_lr"],
        scalar_lr=recipe["scalar_lr"], adam_betas=recipe["adam_betas"], embedding_betas=recipe["embedding_betas"],
        x0_beta1=recipe["x0_beta1"], lr_scale=lr_scale, weight_decay=weight_decay,
        orthogonalizer=recipe["orthogonalizer"], normuon_beta2=recipe["normuon_beta2"])


optimizers = build_optimizers()

# -----------------------------------------------------------------------------
# Resume: model, optimizer, schedule position, data position, RNG
start_step = 0
loader_state = None  # where the next batch starts; None = the beginning of the data
loop_state = {"min_val_bpb": float("inf"), "smooth_train_loss": 0.0, "total_training_time": 0.0}
if args.resume or args.resume_from_step >= 0:
    try:
        resume_step, meta, loader_state = load_training_state(
            checkpoint_dir, args.resume_from_step if args.resume_from_step >= 0 else None, orig_model, optimizers, device)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"base_train: cannot resume: {e}. Drop --resume to start a new run.")
    if meta.get("tokenizer_hash") != tokenizer.content_hash():
        sys.exit("base_train: cannot resume: the tokenizer changed since the checkpoint was written")
    if meta["num_iterations"] != num_iterations or meta["total_batch_size"] != shape.total_batch_size:
        print0(f"warning: resuming a run planned for {meta['num_iterations']} steps of {meta['total_batch_size']} tokens "
               f"with {num_iterations} steps of {shape.total_batch_size} tokens: the LR schedule changes")
    start_step = resume_step
    loop_state = meta["loop_state"]
last_saved_step = start_step if start_step > 0 else None  # where an out-of-memory error goes back to

if stage.use_compile:
    model = torch.compile(model, dynamic=False)  # every batch has the same (B, T) shape

# Data. The validation rows are always the plain stream, so val bpb compares across packings.
def build_train_loader(loader_state):
    make_loader = bos_bestfit_data_loader if recipe["packing"] == "bestfit" else tokenizing_distributed_data_loader
    return PrefetchingLoader(make_loader(device_batch_size, shape.max_seq_len, "train", device=device,
                                         loader_state=loader_state), loader_state)


def build_val_loader():
    return without_state(tokenizing_distributed_data_loader(device_batch_size, shape.max_seq_len, "val", device=device))


try:
    train_batches = build_train_loader(loader_state)
except ValueError as e:  # a resume state of the other packing, or shards that changed
    sys.exit(f"base_train: cannot resume the data loader: {e}")


# -----------------------------------------------------------------------------
# The plan
print0(f"model: {stage.model_tag} | {shape.arch} | depth {shape.depth} | n_embd {model_config.n_embd} | "
       f"heads {model_config.n_head} | vocab {vocab_size} | seq {shape.max_seq_len}")
print0(f"recipe {shape.recipe}: Muon {recipe['orthogonalizer']}, NorMuon beta2 {recipe['normuon_beta2']}, cautious weight "
       f"decay {weight_decay:.4g} | LR x {lr_scale:.3g}, warmup {recipe['warmup_steps']} steps, warmdown "
       f"{recipe['warmdown_ratio']:.0%} to {recipe['final_lr_frac']} | init: wte std {recipe['wte_init_std']}, "
       f"c_fc x {recipe['fc_init_scale']}")
print0(f"parameters: {num_params:,} | FLOPs per token: {flops_per_token:e}")
print0(f"batch: {shape.total_batch_size:,} tokens per step = {shape.device_batch_size} x {shape.max_seq_len} x "
       f"{world_size} processes x {grad_accum_steps} accumulation steps")
print0(f"horizon ({horizon}): {num_iterations:,} steps, {total_tokens:,} tokens "
       f"({total_tokens / shape.ratio_params:.1f} tokens per {'matmul ' if shape.ratio_params != num_params else ''}"
       f"parameter), {flops_per_token * total_tokens:e} FLOPs")
core_metric_every = shape.core_metric_every
if core_metric_every > 0:
    try:
        ensure_eval_bundle(device)  # download (or fail) now rather than thousands of steps in
    except EvalBundleError as e:
        print0(f"warning: {e}; training goes on without the CORE metric")
        core_metric_every = -1

clock = StageClock(loop_state, device_index=stage.local_rank)
loss_log = LossLog(loop_state, "base_train", "lower the learning rates or resume from an earlier checkpoint with "
                   "--resume-from-step")
meter = ProgressMeter(num_iterations, start_step, unit="tok/s", units_per_step=shape.total_batch_size,
                      flops_per_unit=flops_per_token, peak_flops=stage.peak_flops)


def save(step):
    """Checkpoint after `step` optimizer steps (every rank calls this)."""
    meta = {
        "model_config": model_config.__dict__, "user_config": user_config, "num_iterations": num_iterations,
        "total_batch_size": shape.total_batch_size, "val_bpb": val_bpb, "loop_state": loop_state,
        "tokenizer_hash": tokenizer.content_hash(), "device_batch_size": device_batch_size,
        "max_seq_len": shape.max_seq_len,
    }
    clock.update()
    save_training_state(checkpoint_dir, step, orig_model, optimizers, meta, train_batches.loader_state)
    if writes_checkpoint_files() and args.keep_checkpoints > 0:
        prune_checkpoints(checkpoint_dir, args.keep_checkpoints)


def go_back_after_out_of_memory():
    """Restore the state of the last checkpoint this run wrote or resumed from (or of the fresh
    model when there is none yet): model, optimizers, loop state, RNG. The wall time and energy
    spent since then still count. Returns (step, loader_state)."""
    global optimizers
    clock.update()
    spent = {k: loop_state[k] for k in ("wall_time_s", "energy_wh")}
    loop_state.clear()
    if last_saved_step is None:
        restore_rng_state(init_rng_state)
        orig_model.init_weights(**init_scales)
        optimizers = build_optimizers()
        step, loader_state = 0, None
        loop_state.update(min_val_bpb=float("inf"), smooth_train_loss=0.0, total_training_time=0.0)
    else:
        step, meta, loader_state = load_training_state(checkpoint_dir, last_saved_step, orig_model, optimizers, device)
        loop_state.update(meta["loop_state"])
    loop_state.update(spent)
    return step, loader_state


# -----------------------------------------------------------------------------
# Training loop. Iteration `step` first evaluates/samples/saves the model as it is after
# `step` optimizer steps, then (unless it is the last) takes optimizer step number step+1.
val_bpb = None
step = start_step
while True:
    last_step = step == num_iterations

    # val bpb
    if last_step or (shape.eval_every > 0 and step % shape.eval_every == 0):
        model.eval()
        eval_steps = shape.eval_steps * shape.device_batch_size // device_batch_size  # the same tokens after a halving
        with autocast_ctx:
            val_bpb = evaluate_bpb(model, build_val_loader(), eval_steps, token_bytes)
        loop_state["min_val_bpb"] = min(loop_state["min_val_bpb"], val_bpb)
        print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
        stage.report.log_metrics("base", step, val_bpb=val_bpb)
        stage.wandb_run.log({"step": step, "val/bpb": val_bpb})
        model.train()

    # CORE metric, on the uncompiled model: every example has its own shape
    if core_metric_every > 0 and (last_step or (step > 0 and step % core_metric_every == 0)):
        orig_model.eval()
        with autocast_ctx:
            core_out = evaluate_core(orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task)
        loop_state["core_metric"] = core_out["core_metric"]
        print0(f"step {step:05d} | CORE metric: {core_out['core_metric']:.4f}")
        stage.wandb_run.log({"step": step, "core_metric": core_out["core_metric"],
                       **{f"core/{k}": v for k, v in core_out["centered_results"].items()}})
        orig_model.train()

    # samples
    if stage.master_process and (last_step or (shape.sample_every > 0 and step % shape.sample_every == 0 and step > 0)):
        orig_model.eval()
        engine = Engine(orig_model, tokenizer)
        for prompt in ["The capital of France is", "The chemical symbol of gold is", "The opposite of hot is",
                       "If yesterday was Friday, then tomorrow will be", "The planets of the solar system are:"]:
            tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
            with autocast_ctx:
                results, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=16, temperature=0)
            print0(f"sample: {tokenizer.decode(results[0][1:])!r}")
        orig_model.train()

    # checkpoint
    if should_save(step, start_step, last_step, shape.save_every):
        save(step)
        last_saved_step = step

    if last_step:
        break

    # one optimizer step
    lrm = get_lr_multiplier(step, num_iterations, warmdown_ratio=recipe["warmdown_ratio"],
                            final_lr_frac=recipe["final_lr_frac"], warmup_steps=recipe["warmup_steps"])
    momentum_start, momentum_end, momentum_ramp_steps = recipe["momentum_ramp"]
    momentum = get_muon_momentum(step, momentum_ramp_steps, momentum_start, momentum_end, num_iterations,
                                 recipe["warmdown_ratio"], recipe["momentum_warmdown_end"])
    stage.synchronize()
    meter.start()
    try:
        train_loss = train_step(model, train_batches, optimizers, grad_accum_steps, autocast_ctx, lrm, momentum,
                                args.grad_clip, weight_decay * (1 - step / num_iterations))
        out_of_memory = False
    except torch.OutOfMemoryError:
        out_of_memory = True  # handled below, once the exception's traceback no longer holds the activations
    if out_of_memory:
        # Not a crash: half the device batch, twice the accumulation, from the last checkpoint
        # (this step's gradients are partial). torch.compile recompiles once for the new shape.
        orig_model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        device_batch_size, grad_accum_steps = halve_device_batch("base_train", step, device_batch_size,
                                                                 grad_accum_steps, world_size)
        user_config["device_batch_size"] = device_batch_size
        step, loader_state = go_back_after_out_of_memory()
        start_step = meter.start_step = step  # nothing new to save there; the recompile is not steady state
        train_batches = build_train_loader(loader_state)
        continue
    stage.synchronize()
    dt = meter.stop(step)
    loop_state["total_training_time"] += dt

    # log the smoothed loss
    smooth_loss = loss_log.update(step, train_loss)
    print0(meter.line(step, smooth_loss, lrm, dt))
    stage.report.log_metrics("base", step + 1, train_loss=smooth_loss)
    mfu = meter.mfu(dt)
    stage.wandb_run.log({"step": step + 1, "train/loss": smooth_loss, "train/lrm": lrm, "train/dt": dt,
                         "train/tok_per_sec": meter.rate(dt), **({"train/mfu": mfu} if mfu else {})})
    step += 1

# -----------------------------------------------------------------------------
# Summary and report
sps = meter.seconds_per_step()
mfu = meter.mfu(sps) if sps else None
peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
print0(f"training time: {format_duration(loop_state['total_training_time'])} | min val bpb: "
       f"{loop_state['min_val_bpb']:.4f} | peak memory: {f'{peak_mem:.1f} GiB' if peak_mem else 'n/a'}")
stage.report.log("Base model training", [
    user_config,
    {"parameters": f"{num_params:,}", "FLOPs per token": f"{flops_per_token:e}", "steps": num_iterations,
     "tokens": f"{total_tokens:,}", "tokens per parameter": total_tokens / num_params,
     "processes": world_size, "grad accumulation steps": grad_accum_steps, "device": str(device),
     "training FLOPs": f"{flops_per_token * total_tokens:e}",
     "minimum val bpb": loop_state["min_val_bpb"], "final val bpb": val_bpb,
     "CORE metric": loop_state.get("core_metric", "n/a"),
     "MFU (steady state)": "n/a" if mfu is None else f"{mfu:.2f}%",
     "tok/s (steady state)": f"{shape.total_batch_size / sps:,.0f}" if sps else "n/a",
     "training time": format_duration(loop_state["total_training_time"]),
     "peak memory": f"{peak_mem:.2f} GiB" if peak_mem else "n/a", **clock.report_items()},
])
stage.wandb_run.finish()
compute_cleanup()
