"""
The shape of a run: the one function that turns a preset, the depth and the user's flags into
the model size, the batch (device batch size, total batch size, gradient accumulation), the
pretraining horizon, the evaluation budget, the other stages' arguments, and the memory and
time estimates.

Everything that needs a run's shape asks `run_shape()`: scripts/base_train.py (its defaults),
scripts/plan.py (the plan speedrun_dgx.sh prints, and the variables of the shell layer, which
computes nothing itself), and validate_env.py. So the plan printed before a run is the run.

Presets fill defaults and never override what the user said: `--tiny --depth 8` trains a d8.
A combination that cannot work raises RunShapeError naming the flags in conflict.

Not for: running anything (no data, no tokenizer, no GPU work beyond reading its properties).
"""

import functools
import math
from dataclasses import dataclass, field

# Upstream nanochat's d20 speedrun (https://github.com/karpathy/nanochat, speedrun.sh and
# scripts/base_train.py): seq 2048; the recipe (training.RECIPES, None: training.DEFAULT_RECIPE) decides
# the architecture, the tokens per step and the tokens per parameter when the user does not (None).
GPU_DEFAULTS = dict(recipe=None, arch=None, depth=20, vocab_size=65536, max_seq_len=2048, total_batch_size=None,
                    device_batch_size=None, num_iterations=-1, target_flops=-1.0, target_param_data_ratio=None,
                    eval_every=250, eval_tokens=20 * 524288, sample_every=2000, save_every=1000,
                    core_metric_every=2000)
SHAPE_FLAG_TYPES = {name: int for name in GPU_DEFAULTS} | dict(recipe=str, arch=str, target_flops=float,
                                                                target_param_data_ratio=float)

# The CPU presets: every stage's real code path, in minutes. `data` offline: they build their
# corpus and chat tasks on this machine. The per-stage dicts are flags of those stages' scripts.
PRESETS = {
    "gpu": dict(base=GPU_DEFAULTS, data=None, tok={}, loss={}, mid={}, sft={}, rl={}, eval={}),
    "tiny": dict(
        data="offline",
        # 48 steps: the minutes 24 steps took before Muon's orthogonalisation left bf16 on CPUs without AMX
        base=dict(GPU_DEFAULTS, depth=4, vocab_size=8192, max_seq_len=512, total_batch_size=8192, device_batch_size=8,
                  num_iterations=48, eval_every=16, eval_tokens=16384, sample_every=48, save_every=16,
                  core_metric_every=-1),
        tok={},
        loss={"split-tokens": 16384},
        mid={"num-iterations": 12, "eval-every": 6, "eval-tokens": 16384, "save-every": 6},
        sft={"device-batch-size": 4, "target-examples-per-step": 16, "num-iterations": 10, "eval-every": 5,
             "eval-steps": 8, "eval-metrics-every": -1, "save-every": 5, "init-lr-frac": 0.5},
        rl={"num-iterations": 6, "examples-per-step": 4, "num-samples": 4, "device-batch-size": 8,
            "max-new-tokens": 64, "eval-every": 6, "eval-examples": 16, "eval-samples": 2, "save-every": 3},
        eval={"max-problems": 20, "max-new-tokens": 64},
    ),
    "smoke": dict(
        data="offline",
        base=dict(GPU_DEFAULTS, depth=2, vocab_size=2048, max_seq_len=256, total_batch_size=2048, device_batch_size=4,
                  num_iterations=8, eval_every=4, eval_tokens=4096, sample_every=8, save_every=4,
                  core_metric_every=-1),
        tok={"max-chars": 20000000},
        loss={"split-tokens": 4096},
        mid={"num-iterations": 4, "eval-every": 4, "eval-tokens": 4096, "save-every": 2},
        sft={"device-batch-size": 4, "target-examples-per-step": 8, "num-iterations": 4, "eval-every": 4,
             "eval-steps": 4, "eval-metrics-every": -1, "save-every": 2},
        rl={"num-iterations": 2, "examples-per-step": 2, "num-samples": 2, "device-batch-size": 4,
            "max-new-tokens": 32, "eval-every": 2, "eval-examples": 4, "eval-samples": 2, "save-every": 1},
        eval={"max-problems": 4, "max-new-tokens": 32},
    ),
}

# upstream tuned its d12 at 2^19 tokens per step: the reference of power_lines_batch_size and of the
# LR batch scaling (training.RECIPES' lr_batch_scaling)
POWER_LINES_REFERENCE_DEPTH = 12
REFERENCE_BATCH_SIZE = 2**19

# Without a GPU the GPU preset's evaluation budget (20 steps of 524,288 tokens, 10.5M tokens)
# takes hours; there a val bpb pass reads this many forward passes of the device batch.
CPU_EVAL_FORWARD_PASSES = 8
# The memory model (predict_peak_memory). Bytes that autograd saves for the backward pass, per
# token: ACTIVATION_BYTES x n_layer x n_embd for the blocks, EMBEDDING_BYTES x n_embd for the
# embedding and final norm, LOGITS_BYTES x vocab_size for lm_head/softcap/cross-entropy; keyed by
# (bf16 autocast, torch.compile). Measured on a CPU by bench/memory_model.py with
# torch.autograd.graph.saved_tensors_hooks, which sees every tensor kept for backward, compiled
# graphs included (`python -m bench.memory_model --fit`: least squares over d2-d8, vocab 512-2048,
# 256 tokens, worst error 0.7%; compiled bf16 from d2 and d4 at vocab 512 and 2048; the compiled
# fp32 entries are the eager ones, unmeasured). The compiled graph recomputes norms,
# rotary and ReLU² in the backward pass and keeps only the bf16 logits.
# LOGITS_BACKWARD_BYTES: the gradient buffers of the logits' backward pass, alive on top of the
# saved tensors (eager: two fp32 (B, T, vocab) gradients of the softcap/cross-entropy chain;
# compiled: one fused kernel writing the bf16 gradient plus its fp32 input): an assumption.
# Cross-check against published GPU figures (with a different architecture, so only a bound):
# upstream's d12 (vocab 32,768, plus value embeddings) at 32 x 2048 peaked at 34 GB on an H100
# (karpathy/nanochat dev/LOG.md, the fp8 lm_head entry) where this model predicts 39 GB, and
# upstream runs d20 at 32 x 2048 on 80 GB cards where this model predicts 95 GiB: it errs on the
# side of a smaller device batch. The device check (dev/device_check.py) prints predicted vs
# measured peak memory on CUDA, to correct these from data.
ACTIVATION_BYTES = {(True, False): 48, (True, True): 40, (False, False): 72, (False, True): 72}
EMBEDDING_BYTES = {(True, False): 11, (True, True): 7, (False, False): 12, (False, True): 12}
LOGITS_BYTES = {(True, False): 8, (True, True): 2, (False, False): 8, (False, True): 8}
LOGITS_BACKWARD_BYTES = {(True, False): 8, (True, True): 4, (False, False): 8, (False, True): 8}
# Memory the allocator cannot hand out to tensors: the CUDA context, cuBLAS workspaces, and
# fragmentation of the caching allocator (reserved exceeds allocated by a few percent). Engineering
# margins, not measurements: a device batch fits when the predicted peak is at most
# FIT_FRACTION x (GPU memory - CUDA_CONTEXT_BYTES).
CUDA_CONTEXT_BYTES = 2**30
FIT_FRACTION = 0.92
# On unified memory (DGX Spark's GB10: CPU and GPU share 128 GB) the OS, the page cache of the
# shards and the data loader's tokenizer threads live in the same memory, and an out-of-memory
# there can freeze the whole machine instead of raising an error; so the budget leaves this much
# to the system and uses a smaller fraction of the rest.
UNIFIED_RESERVE_BYTES = 24 * 2**30
UNIFIED_FIT_FRACTION = 0.85
MAX_AUTO_DEVICE_BATCH_SIZE = 32
CPU_DEVICE_BATCH_SIZE = 4
KEEP_CHECKPOINTS = 3  # base_train keeps the last 3 base checkpoints (--keep-checkpoints): a d20 one is ~5 GB
# for time estimates only (upstream nanochat's d20 runs at ~40-50% MFU on H100s, as its logs print);
# every stage prints its measured MFU
ASSUMED_MFU = 0.40


class RunShapeError(ValueError):
    """A combination of flags that cannot work; the message names the flags and what to change."""


@dataclass
class RunShape:
    """A resolved run. Sizes in tokens unless named otherwise; memory in bytes.

    stage_args: flags for the other stages' scripts ("tok", "loss", "mid", "sft", "rl", "eval"),
    as argument lists, e.g. {"mid": ["--num-iterations", "12", ...]}.
    """
    preset: str
    recipe: str  # training.RECIPES key
    arch: str  # "classic" or "modern" (gpt.GPTConfig.arch)
    depth: int
    vocab_size: int
    max_seq_len: int
    device_batch_size: int
    total_batch_size: int
    world_size: int
    grad_accum_steps: int
    num_params: int  # every parameter
    ratio_params: int  # the parameters "tokens per parameter" counts (the recipe's param_count)
    flops_per_token: float
    num_iterations: int
    horizon: str  # the flag that decided num_iterations, e.g. "--num-iterations"
    eval_every: int
    eval_tokens: int
    sample_every: int
    save_every: int
    core_metric_every: int
    data: str | None  # "offline" for the CPU presets, None: the caller decides (online if the Hub answers)
    state_bytes: int  # fp32 weights + gradients + optimizer state
    optimizer_bytes: int
    bf16: bool  # the forward runs under bf16 autocast (CUDA)
    compile: bool  # base_train torch.compiles the model
    peak_memory: "MemoryEstimate"  # predicted for the chosen device batch size
    memory_budget: int | None  # bytes of predicted peak that fit this GPU (memory_budget()); None off CUDA
    stage_args: dict = field(default_factory=dict)

    @property
    def model_tag(self):
        return f"d{self.depth}"

    @property
    def tokens(self):
        """Pretraining tokens: steps x tokens per step."""
        return self.num_iterations * self.total_batch_size

    @property
    def training_flops(self):
        return self.flops_per_token * self.tokens

    def memory_candidates(self):
        """{device_batch_size: predicted peak bytes} for the powers of two up to 32 and the chosen size."""
        sizes = sorted({2 ** i for i in range(6)} | {self.device_batch_size})
        return {bs: predict_peak_memory(self.depth, self.max_seq_len, bs, self.vocab_size, self.bf16, self.compile,
                                        self.world_size, self.arch).total for bs in sizes}

    @property
    def eval_steps(self):
        """Forward passes per val bpb evaluation (each of device_batch_size x max_seq_len x world_size tokens)."""
        return max(1, self.eval_tokens // (self.device_batch_size * self.max_seq_len * self.world_size))


@functools.lru_cache(maxsize=None)
def model_size(depth, vocab_size, max_seq_len, arch="classic"):
    """(parameters, training FLOPs per token, bytes of fp32 weights + gradients + optimizer state,
    bytes of optimizer state, matmul parameters) of the d`depth` GPT of `arch`, built on the meta
    device (no memory, no init).

    Optimizer state: AdamW keeps two fp32 moments for the embeddings, lm_head and scalars, Muon
    one fp32 momentum buffer for every block matrix (nanochat/adamw.py, nanochat/muon.py; the
    NorMuon buffer is one value per neuron, negligible).

    Raises:
        RunShapeError: depth < 1.
    """
    import torch
    from nanochat.gpt import GPT, GPTConfig
    try:
        config = GPTConfig.from_depth(depth, vocab_size=vocab_size, sequence_len=max_seq_len, arch=arch)
    except ValueError as e:
        raise RunShapeError(str(e)) from None
    with torch.device("meta"):
        model = GPT(config)
    params = model.num_scaling_params()
    gates = sum(b.attn.ve_gate.weight.numel() for b in model.transformer.h if b.attn.ve_gate is not None)
    muon = sum(p.numel() for p in model.transformer.h.parameters()) - gates  # the gates go to AdamW
    optimizer_bytes = 8 * (params - muon) + 4 * muon
    return (params, model.estimate_flops(), 4 * params + 4 * params + optimizer_bytes, optimizer_bytes,
            model.num_matmul_params())


@dataclass
class MemoryEstimate:
    """Predicted peak memory of one training process, in bytes, by term (predict_peak_memory)."""
    weights: int  # fp32 parameters
    grads: int  # fp32 gradients (alive through the whole accumulation)
    optimizer: int  # AdamW moments + Muon momentum (this process's shard)
    weight_copies: int  # bf16 copies of the matrices that autocast makes and keeps for backward
    activations: int  # tensors saved for backward by the blocks and the embedding
    logits: int  # logits saved for backward + the gradient buffers of their backward pass

    @property
    def total(self):
        return self.weights + self.grads + self.optimizer + self.weight_copies + self.activations + self.logits


def predict_peak_memory(depth, max_seq_len, device_batch_size, vocab_size=65536, bf16=True, compile=True,
                        world_size=1, arch="classic"):
    """Predicted peak of torch.cuda.max_memory_allocated() for base_train's step, in bytes, by term.

    bf16: the forward runs under bf16 autocast (the CUDA default); compile: torch.compile'd
    model. world_size: processes; the distributed optimizers shard their state over them
    (nanochat/adamw.py DistAdamW, nanochat/muon.py DistMuon). The constants and their source:
    ACTIVATION_BYTES, EMBEDDING_BYTES, LOGITS_BYTES, LOGITS_BACKWARD_BYTES at the top of this
    module. --arch modern adds its parameters (value embeddings) to the weight terms and, to the
    activations, the fp32 tensors its additions save for backward, counted (not fit): per token,
    the residual stream before each layer's scalars (n_layer x n_embd) and each value embedding
    (n_kv_head x head_dim). Not counted: the CUDA context and allocator fragmentation (see
    memory_budget), and --fp8, which only shrinks the activations.

    Raises:
        RunShapeError: depth < 1.
    """
    params, _, _, optimizer_bytes, matmul_params = model_size(depth, vocab_size, max_seq_len, arch)
    n_embd = 64 * depth
    key = (bool(bf16), bool(compile))
    tokens = device_batch_size * max_seq_len
    modern_bytes = 4 * (depth * n_embd + (depth + 1) // 2 * n_embd) if arch == "modern" else 0
    return MemoryEstimate(
        weights=4 * params, grads=4 * params, optimizer=optimizer_bytes // world_size,
        weight_copies=2 * matmul_params if bf16 else 0,  # autocast copies what it multiplies (not the embeddings)
        activations=tokens * (n_embd * (ACTIVATION_BYTES[key] * depth + EMBEDDING_BYTES[key]) + modern_bytes),
        logits=tokens * vocab_size * (LOGITS_BYTES[key] + LOGITS_BACKWARD_BYTES[key]))


def memory_budget(memory_bytes, unified):
    """Bytes of predicted peak a run may use on a GPU with `memory_bytes` (common.gpu_memory_bytes):
    FIT_FRACTION of what the CUDA context leaves, or on unified memory UNIFIED_FIT_FRACTION of
    what UNIFIED_RESERVE_BYTES leaves to the system."""
    if unified:
        return int(UNIFIED_FIT_FRACTION * max(memory_bytes - UNIFIED_RESERVE_BYTES, 0))
    return int(FIT_FRACTION * max(memory_bytes - CUDA_CONTEXT_BYTES, 0))


def power_lines_batch_size(tokens, reference_tokens, reference_batch_size=REFERENCE_BATCH_SIZE, exponent=0.383):
    """Tokens per optimizer step for a run of `tokens` training tokens: the power of two nearest
    (in log2) to reference_batch_size x (tokens / reference_tokens)^0.383.

    B_opt ∝ D^0.383: Bergsma et al. 2025, "Power Lines", https://arxiv.org/abs/2505.13738. The
    reference is upstream nanochat's d12, tuned at 2^19 tokens per step at its compute-optimal
    horizon (dev/LOG.md 2026-02-05); run_shape passes that horizon for the run's vocabulary,
    context and recipe. 10x the tokens: ~2.4x the batch.
    """
    return 2 ** round(math.log2(reference_batch_size * (tokens / reference_tokens) ** exponent))


def auto_device_batch_size(depth, max_seq_len, total_batch_size, world_size, budget_bytes, vocab_size=65536,
                           bf16=True, compile=True, arch="classic"):
    """The largest power of two <= 32 (upstream's device batch at seq 2048) whose predicted peak
    memory (predict_peak_memory) is within `budget_bytes` (memory_budget) and whose
    device_batch_size x max_seq_len x world_size divides total_batch_size; at least 1."""
    bs = 1
    while (bs * 2 <= MAX_AUTO_DEVICE_BATCH_SIZE and predict_peak_memory(
            depth, max_seq_len, bs * 2, vocab_size, bf16, compile, world_size, arch).total <= budget_bytes):
        bs *= 2
    while bs > 1 and total_batch_size % (bs * max_seq_len * world_size) != 0:
        bs //= 2
    return bs


def format_memory_candidates(predicted, chosen, budget):
    """'predicted peak memory per device batch size: 1: 8.1, ... 16: 51.3 (chosen), 32: 94.8 GiB;
    budget 71.9 GiB'. predicted: {batch size (str or int): bytes}; budget: bytes or None."""
    cells = [f"{bs}: {n / 2**30:.1f}{' (chosen)' if int(bs) == chosen else ''}" for bs, n in predicted.items()]
    tail = f"; budget {budget / 2**30:.1f} GiB" if budget else ""
    return f"predicted peak memory per device batch size: {', '.join(cells)} GiB{tail}"


def get_grad_accum_steps(total_flag, total, per_pass):
    """How many forward/backward passes make up one optimizer step: total / the product of
    per_pass, e.g. get_grad_accum_steps("--total-batch-size", 524288, {"--device-batch-size": 32,
    "--max-seq-len": 2048, "processes": 1}) = 8. Used by run_shape and by the chat stages
    (whose steps count conversations).

    Raises:
        ValueError: total is not a multiple of that product (the message names the flags).
    """
    per_step = math.prod(per_pass.values())
    if total % per_step != 0:
        raise ValueError(f"{total_flag} {total} is not a multiple of {' x '.join(per_pass)} = "
                         f"{' x '.join(str(v) for v in per_pass.values())} = {per_step}; pick sizes that divide it")
    return total // per_step


def _stage_args(flags):
    """{"num-iterations": 12} -> ["--num-iterations", "12"]."""
    return [item for name, value in flags.items() for item in (f"--{name}", str(value))]


def run_shape(preset="gpu", device_type="cpu", world_size=1, gpu_memory_gib=None, unified=False, compile=None,
              **flags):
    """Resolve a run: the preset's defaults, then every flag the user gave (not None) on top.

    Args:
        preset: "gpu" (upstream's recipe), "tiny" or "smoke" (the CPU presets).
        device_type: "cuda", "mps" or "cpu": GPU-sized defaults (the evaluation budget, the device
            batch) apply on CUDA only.
        world_size: processes (GPUs) of the run.
        gpu_memory_gib: memory a CUDA run can use (the auto device batch size is chosen for it by
            the memory model, predict_peak_memory); None: read it, and `unified`, from GPU 0
            (common.gpu_memory_bytes) when device_type is "cuda".
        unified: the GPU shares the system's memory (GB10): a smaller, stated budget (memory_budget).
        compile: base_train torch.compiles the model (None: training.should_compile's default: on
            for CUDA unless NANOCHAT_COMPILE=0), which changes the activation memory.
        flags: base_train's shape flags by their argparse names, None = not given: depth,
            vocab_size, max_seq_len, device_batch_size, total_batch_size, num_iterations,
            target_flops, target_param_data_ratio, eval_every, eval_tokens, sample_every,
            save_every, core_metric_every. Unknown names raise TypeError.

    Returns a RunShape.

    Raises:
        RunShapeError: unknown preset, a size < 1, a device batch that does not divide the step,
            or a horizon of no steps; the message names the flags.
    """
    if preset not in PRESETS:
        raise RunShapeError(f"unknown preset {preset!r}; pick one of {', '.join(PRESETS)}")
    unknown = set(flags) - set(GPU_DEFAULTS)
    if unknown:
        raise TypeError(f"run_shape() got unknown flags {sorted(unknown)}")
    spec = PRESETS[preset]
    given = {k: v for k, v in flags.items() if v is not None}
    s = {**spec["base"], **given}
    # the recipe fills what neither the user nor the preset set: architecture, batch, tokens per parameter
    from nanochat.gpt import ARCHS
    from nanochat.training import DEFAULT_RECIPE, RECIPES
    s["recipe"] = s["recipe"] or DEFAULT_RECIPE
    if s["recipe"] not in RECIPES:
        raise RunShapeError(f"unknown --recipe {s['recipe']!r}; pick one of {', '.join(RECIPES)}")
    recipe = RECIPES[s["recipe"]]
    for name in ("arch", "total_batch_size", "target_param_data_ratio"):
        if s[name] is None:
            s[name] = recipe[name]
    if s["arch"] not in ARCHS:
        raise RunShapeError(f"unknown --arch {s['arch']!r}; pick one of {', '.join(ARCHS)}")
    for name in ("depth", "vocab_size", "max_seq_len"):
        if s[name] < 1:
            raise RunShapeError(f"--{name.replace('_', '-')} must be >= 1, got {s[name]}")
    if s["total_batch_size"] < 1 and s["total_batch_size"] != -1:
        raise RunShapeError(f"--total-batch-size must be >= 1, or -1 to derive it (Power Lines), got {s['total_batch_size']}")
    if world_size < 1:
        raise RunShapeError(f"the number of processes must be >= 1, got {world_size}")
    params, flops_per_token, state_bytes, optimizer_bytes, matmul_params = model_size(
        s["depth"], s["vocab_size"], s["max_seq_len"], s["arch"])
    ratio_params = matmul_params if recipe["param_count"] == "matmul" else params  # what "tokens per parameter" counts

    # the batch from the horizon (Power Lines) when it is -1; the horizon must then be in tokens
    if s["total_batch_size"] == -1:
        if s["num_iterations"] > 0:
            raise RunShapeError("--total-batch-size -1 derives the batch from the training tokens, so the horizon "
                                "must be in tokens: use --target-param-data-ratio or --target-flops instead of "
                                "--num-iterations, or give --total-batch-size")
        tokens = (s["target_flops"] / flops_per_token if s["target_flops"] > 0
                  else s["target_param_data_ratio"] * ratio_params)
        reference_params = model_size(POWER_LINES_REFERENCE_DEPTH, s["vocab_size"], s["max_seq_len"], s["arch"])
        reference_params = reference_params[4] if recipe["param_count"] == "matmul" else reference_params[0]
        s["total_batch_size"] = max(power_lines_batch_size(tokens, s["target_param_data_ratio"] * reference_params),
                                    s["max_seq_len"] * world_size)
        if "device_batch_size" not in given and s["device_batch_size"] is not None:  # a CPU preset's: fit the step
            s["device_batch_size"] = min(s["device_batch_size"], s["total_batch_size"] // (s["max_seq_len"] * world_size))

    # the device batch: the user's, else the preset's, else what the memory model fits in the GPU
    # (CPU: a small one)
    bf16 = device_type == "cuda"
    if compile is None:
        from nanochat.training import should_compile
        compile = should_compile(None, device_type)
    budget = None
    if device_type == "cuda":
        if gpu_memory_gib is None:
            from nanochat.common import gpu_memory_bytes
            memory_bytes, unified = gpu_memory_bytes()
            gpu_memory_gib = memory_bytes / 2**30
        budget = memory_budget(int(gpu_memory_gib * 2**30), unified)
    if "device_batch_size" not in given and s["device_batch_size"] is None:
        if device_type == "cuda":
            s["device_batch_size"] = auto_device_batch_size(s["depth"], s["max_seq_len"], s["total_batch_size"],
                                                            world_size, budget, s["vocab_size"], bf16, compile,
                                                            s["arch"])
        else:
            s["device_batch_size"] = min(CPU_DEVICE_BATCH_SIZE, s["total_batch_size"] // (s["max_seq_len"] * world_size))
    dbs = s["device_batch_size"]
    if dbs < 1:
        raise RunShapeError(f"--device-batch-size must be >= 1, got {dbs}")
    world_tokens = dbs * s["max_seq_len"] * world_size
    try:
        grad_accum_steps = get_grad_accum_steps("--total-batch-size", s["total_batch_size"], {
            "--device-batch-size": dbs, "--max-seq-len": s["max_seq_len"], "processes": world_size})
    except ValueError as e:
        said = [f"--{k.replace('_', '-')} {given[k]}" for k in ("device_batch_size", "max_seq_len", "total_batch_size")
                if k in given]
        you_set = f" (you set {', '.join(said)}; the {preset} preset sets the rest)" if said else ""
        raise RunShapeError(f"{e}, e.g. a power of two for --device-batch-size{you_set}") from None

    # the evaluation budget: GPU-sized only on a GPU, unless the user or a preset set it
    if "eval_tokens" not in given and preset == "gpu" and device_type != "cuda":
        s["eval_tokens"] = CPU_EVAL_FORWARD_PASSES * world_tokens

    # the horizon: the first of these that is set (> 0) wins
    if s["num_iterations"] > 0:
        num_iterations, horizon = s["num_iterations"], "--num-iterations"
    elif s["target_flops"] > 0:
        num_iterations = round(s["target_flops"] / (flops_per_token * s["total_batch_size"]))
        horizon = f"--target-flops {s['target_flops']:e}"
    elif s["target_param_data_ratio"] > 0:
        num_iterations = int(s["target_param_data_ratio"] * ratio_params) // s["total_batch_size"]
        horizon = f"--target-param-data-ratio {s['target_param_data_ratio']:g}"
    else:
        raise RunShapeError("set one of --num-iterations, --target-flops, --target-param-data-ratio to a positive value")
    if num_iterations < 1:
        raise RunShapeError(f"the horizon ({horizon}) gives {num_iterations} steps of {s['total_batch_size']:,} tokens; "
                            "raise it or lower --total-batch-size")

    stage_args = {name: _stage_args(spec[name]) for name in ("tok", "loss", "mid", "sft", "rl", "eval")}
    return RunShape(preset=preset, recipe=s["recipe"], arch=s["arch"], depth=s["depth"], vocab_size=s["vocab_size"],
                    max_seq_len=s["max_seq_len"], ratio_params=ratio_params,
                    device_batch_size=dbs, total_batch_size=s["total_batch_size"], world_size=world_size,
                    grad_accum_steps=grad_accum_steps, num_params=params,
                    flops_per_token=flops_per_token, num_iterations=num_iterations, horizon=horizon,
                    eval_every=s["eval_every"], eval_tokens=s["eval_tokens"], sample_every=s["sample_every"],
                    save_every=s["save_every"], core_metric_every=s["core_metric_every"], data=spec["data"],
                    state_bytes=state_bytes, optimizer_bytes=optimizer_bytes, bf16=bf16, compile=compile,
                    peak_memory=predict_peak_memory(s["depth"], s["max_seq_len"], dbs, s["vocab_size"], bf16, compile,
                                                    world_size, s["arch"]),
                    memory_budget=budget, stage_args=stage_args)


def estimate_seconds(flops, flops_per_second, mfu=ASSUMED_MFU):
    """Seconds to do `flops` at `mfu` of `flops_per_second` (a GPU's bf16 peak, or a CPU's
    measured matmul rate); None when the rate is unknown. An estimate: label it as one."""
    return None if not flops_per_second else flops / (flops_per_second * mfu)


def cpu_matmul_flops():
    """Measured fp32 FLOP/s of a 1024 x 1024 matmul on this CPU (about 0.2 s)."""
    import time
    import torch
    a = torch.randn(1024, 1024)
    a @ a  # warm up
    t0 = time.perf_counter()
    for _ in range(10):
        a @ a
    return 10 * 2 * 1024 ** 3 / (time.perf_counter() - t0)


def shape_flags(args):
    """run_shape's flags from an argparse Namespace that has base_train's shape flags (others ignored)."""
    return {name: getattr(args, name) for name in GPU_DEFAULTS if hasattr(args, name)}
