"""
Checkpoints of every training stage: save and load model + optimizer + metadata, save and
restore a whole training run for an exact resume, find the largest model tag and the last
step, and rebuild a GPT from a checkpoint.

Layout (one directory per stage and model tag, under $NANOCHAT_BASE_DIR):
    {base,mid,chatsft,chatrl}_checkpoints/<model_tag>/
        model_<step:06d>.pt            model state_dict (rank 0)
        optim_<step:06d>_rank<r>.pt    each rank's optimizer state
        meta_<step:06d>.json           model config, step, user config, val bpb, dataloader
                                       state, tokenizer hash, RNG states, ... (rank 0)
Under several nodes each node's directory holds its own ranks' optimizer files, and the model
and meta too (written by its first process) unless the nodes share the base directory.
Every file is written to a temporary name in the same directory, fsynced and renamed, and
the meta file is written last: a step counts as saved only once its meta file exists, so a
crash mid-save leaves the previous step as the last complete checkpoint.

Not for: deciding when to save (training.should_save) or what goes into the meta (the stage
scripts do that), or downloading checkpoints.
"""

import base64
import json
import os
import random
import re
import shutil

import torch
import torch.distributed as dist

from nanochat.common import (DiskFullError, atomic_write, format_bytes, fsync_dir, gather_from_ranks, get_base_dir,
                             get_dist_info, print0, writes_checkpoint_files)
from nanochat.gpt import GPT, GPTConfig
from nanochat.muon import DistMuon, Muon
from nanochat.tokenizer import get_tokenizer

# stage -> (its checkpoints directory under $NANOCHAT_BASE_DIR, the script that writes it)
STAGE_DIRS = {
    "base": ("base_checkpoints", "scripts.base_train"),
    "mid": ("mid_checkpoints", "scripts.mid_train"),
    "sft": ("chatsft_checkpoints", "scripts.chat_sft"),
    "rl": ("chatrl_checkpoints", "scripts.chat_rl"),
}
META_PATTERN = re.compile(r"meta_(\d+)\.json")


def _model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def _optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


def _meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def _barrier():
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _encode_meta(meta_data):
    """meta dict -> JSON bytes, or a TypeError that names the key that cannot be stored."""
    for key, value in meta_data.items():
        try:
            json.dumps(value)
        except TypeError as e:
            raise TypeError(f"meta_data[{key!r}] cannot be stored in the meta JSON ({e}); store plain "
                            "numbers/str/lists/dicts (capture_rng_state() does this for RNG states)") from None
    return json.dumps(meta_data, indent=2).encode("utf-8")


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0, writer=None):
    """Save one step: model state and meta from the writer(s), optimizer state from every rank.

    A collective under torch.distributed: every rank calls it (it barriers before the meta
    file, so the meta only appears once every rank's optimizer file is in place).

    Args:
        checkpoint_dir: e.g. $NANOCHAT_BASE_DIR/base_checkpoints/d20 (created if needed).
        step: int, the number of optimizer steps taken.
        model_data: model.state_dict() (used by writers only).
        optimizer_data: this rank's optimizer state (anything torch.load(weights_only=True)
            reads back: tensors, numbers, str, lists, dicts), or None to save none.
        meta_data: JSON-able dict; must hold "model_config" (GPTConfig fields, used by
            build_model); by convention also "user_config", "val_bpb", "dataloader_state",
            "tokenizer_hash" (checked by build_model), "rng_state" (capture_rng_state()).
            "step" is set to `step`.
        rank: this process's rank.
        writer: whether this process writes the model and meta files; None: rank 0 does.
            Under multi-node torchrun the first process of each node with a disk of its own
            writes them too (common.writes_checkpoint_files), so every node has a full copy.

    Raises:
        ValueError: meta_data has no "model_config".
        TypeError: a meta_data value is not JSON-able.
        DiskFullError: the disk filled up; this step's files are removed again and the message
            says how much space a checkpoint needs. (Under torch.distributed the other ranks then
            wait at the barrier until their timeout.)
    """
    writer = rank == 0 if writer is None else writer
    meta_bytes = None
    if writer:
        if "model_config" not in meta_data:
            raise ValueError("meta_data needs a 'model_config' dict (the GPTConfig fields) so build_model can rebuild the model")
        meta_bytes = _encode_meta({**meta_data, "step": step})
        os.makedirs(checkpoint_dir, exist_ok=True)
        # saving a step again: un-mark it first, so a crash below cannot leave the old meta
        # describing a half-replaced set of files
        if os.path.exists(_meta_path(checkpoint_dir, step)):
            os.unlink(_meta_path(checkpoint_dir, step))
            fsync_dir(checkpoint_dir)
    _barrier()
    written = []  # this step's files, removed again if the disk fills before its meta marks it complete
    try:
        if writer:
            atomic_write(_model_path(checkpoint_dir, step), lambda f: torch.save(model_data, f))
            written.append(_model_path(checkpoint_dir, step))
        if optimizer_data is not None:
            atomic_write(_optim_path(checkpoint_dir, step, rank), lambda f: torch.save(optimizer_data, f))
            written.append(_optim_path(checkpoint_dir, step, rank))
        _barrier()
        if writer:
            atomic_write(_meta_path(checkpoint_dir, step), meta_bytes)
        _barrier()  # every node has this step before any prunes an older one (training.should_save callers)
    except DiskFullError as e:
        for path in written:
            os.unlink(path)
        needed = _state_bytes(model_data if writer else None) + _state_bytes(optimizer_data)
        free = shutil.disk_usage(checkpoint_dir).free
        raise DiskFullError(
            f"the disk is full: checkpoint step {step} did not fit in {checkpoint_dir} (it takes about "
            f"{format_bytes(needed)}, {format_bytes(free)} are free). The checkpoints before it are intact. Free at "
            f"least {format_bytes(max(needed - free, 0) + 2**20)} there (older checkpoints, other runs' folders, "
            f"--keep-checkpoints) and run the same command again: it resumes from the last checkpoint") from e


def _state_bytes(state):
    """Bytes of the tensors in a (nested) state dict, about what torch.save writes."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def list_steps(checkpoint_dir):
    """Sorted steps (ints) that have a complete checkpoint (a meta file) in `checkpoint_dir`; [] if none or no dir."""
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(checkpoint_dir) if (m := META_PATTERN.fullmatch(name)))


def find_last_step(checkpoint_dir):
    """The largest step with a complete checkpoint (its meta file exists) in `checkpoint_dir`.

    Raises:
        FileNotFoundError: no complete checkpoint there.
    """
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (meta_<step>.json) in {checkpoint_dir}")
    return steps[-1]


def find_largest_model(checkpoints_dir):
    """The model tag (subdirectory name) to load by default from a stage's checkpoints dir.

    Among the tags holding a complete checkpoint (all tags if none does): the largest depth
    when tags look like d<depth> (d12, d20, d34), else the most recently modified one.

    Raises:
        FileNotFoundError: no subdirectory in `checkpoints_dir` (or no such directory).
    """
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))] \
        if os.path.isdir(checkpoints_dir) else []
    if not tags:
        raise FileNotFoundError(f"no model tags (subdirectories) in {checkpoints_dir}")
    complete = [t for t in tags if list_steps(os.path.join(checkpoints_dir, t))]
    tags = complete or tags
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def load_meta(checkpoint_dir, step):
    """The meta dict (model_config, user_config, training state) of checkpoint `step`.

    Raises:
        FileNotFoundError: `step` has no complete checkpoint (the message lists the steps that do).
    """
    meta_path = _meta_path(checkpoint_dir, step)
    if not os.path.exists(meta_path):
        steps = list_steps(checkpoint_dir)
        raise FileNotFoundError(f"no checkpoint for step {step} in {checkpoint_dir} (no {os.path.basename(meta_path)}); "
                                f"complete steps there: {steps or 'none'}")
    with open(meta_path, encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """Load one step: (model_state, optimizer_state or None, meta dict).

    Tensors are mapped to `device`. Files are read with torch.load(weights_only=True), so a
    downloaded checkpoint can hold only data, never code.

    Raises:
        FileNotFoundError: `step` has no complete checkpoint (the message lists the steps that
            do), or its model/optimizer file is missing.
    """
    meta = load_meta(checkpoint_dir, step)
    paths = [_model_path(checkpoint_dir, step)] + ([_optim_path(checkpoint_dir, step, rank)] if load_optimizer else [])
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint step {step} in {checkpoint_dir} has a meta file but no {os.path.basename(path)}; "
                                    "the directory was changed by hand; restore the file or pick another step")
    model_data = torch.load(paths[0], map_location=device, weights_only=True)
    optimizer_data = torch.load(paths[1], map_location=device, weights_only=True) if load_optimizer else None
    return model_data, optimizer_data, meta


def build_model(checkpoint_dir, step, device, phase):
    """Rebuild the GPT of a checkpoint: (model, tokenizer, meta).

    The model is built from meta["model_config"] on the meta device, materialised on
    `device`, and loaded with strict=True (a `_orig_mod.` prefix left by torch.compile is
    stripped). It is in train() mode for phase="train", eval() for phase="eval". The
    tokenizer is $NANOCHAT_BASE_DIR/tokenizer, which must be the one the checkpoint was
    trained with (same content_hash() as meta["tokenizer_hash"]).

    Raises:
        ValueError: bad phase, or the tokenizer does not match the checkpoint.
        FileNotFoundError: see load_checkpoint.
    """
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    device = torch.device(device)
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    tokenizer = get_tokenizer()
    expected_hash = meta.get("tokenizer_hash")
    if expected_hash is None:
        print0(f"warning: {_meta_path(checkpoint_dir, step)} has no tokenizer_hash; cannot check the tokenizer matches")
    elif tokenizer.content_hash() != expected_hash:
        tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
        raise ValueError(
            f"the tokenizer in {tokenizer_dir} (hash {tokenizer.content_hash()[:12]}) is not the one checkpoint "
            f"{checkpoint_dir} was trained with (hash {expected_hash[:12]}); point NANOCHAT_BASE_DIR at the directory "
            "that checkpoint came from, or retrain from base_train with the current tokenizer")
    model_data = {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}
    with torch.device("meta"):
        model = GPT(GPTConfig(**meta["model_config"]))
    model.to_empty(device=device)
    model.init_weights()  # recomputes the non-persistent buffers (rotary tables) that the state dict lacks
    model.load_state_dict(model_data, strict=True)
    model.train(phase == "train")
    return model, tokenizer, meta


def get_checkpoint_dir(stage, model_tag):
    """Where `stage` ("base", "mid", "sft", "rl") keeps the checkpoints of `model_tag`:
    $NANOCHAT_BASE_DIR/<STAGE_DIRS[stage][0]>/<model_tag>."""
    return os.path.join(get_base_dir(), STAGE_DIRS[stage][0], model_tag)


def load_model(source, device, phase, model_tag=None, step=None):
    """Load a stage's model: (model, tokenizer, meta), and print which file it loaded.

    Args:
        source: "base", "mid", "sft" or "rl".
        device, phase: as in build_model.
        model_tag: e.g. "d20"; default: find_largest_model.
        step: default: find_last_step.

    Returns:
        (model, tokenizer, meta): meta is the checkpoint's meta dict (with "step"), plus
        meta["model_tag"], the tag this call resolved (the one given, or the largest), which
        is not stored in the file. A later stage writes its checkpoints under that tag.

    Raises:
        ValueError: unknown source, or see build_model.
        FileNotFoundError: no checkpoints for the source / tag / step; the message names the
            script that writes them or lists the available steps.
    """
    if source not in STAGE_DIRS:
        raise ValueError(f"unknown checkpoint source {source!r}; pick one of {sorted(STAGE_DIRS)}")
    dir_name, script = STAGE_DIRS[source]
    checkpoints_dir = os.path.join(get_base_dir(), dir_name)
    tags = os.listdir(checkpoints_dir) if os.path.isdir(checkpoints_dir) else []
    complete_tags = sorted(t for t in tags if list_steps(os.path.join(checkpoints_dir, t)))
    if not complete_tags:
        raise FileNotFoundError(f"no checkpoints in {checkpoints_dir}; run `python -m {script}` first")
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
    if model_tag not in complete_tags:
        raise FileNotFoundError(f"no checkpoints for model tag {model_tag!r} in {checkpoints_dir}; tags with "
                                f"checkpoints: {complete_tags}; pass one of them as --model-tag")
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if step is None:
        step = find_last_step(checkpoint_dir)
    model, tokenizer, meta = build_model(checkpoint_dir, step, device, phase)
    print0(f"Loaded {source} model {model_tag} step {step} from {_model_path(checkpoint_dir, step)}")
    return model, tokenizer, {**meta, "model_tag": model_tag}


def save_training_state(checkpoint_dir, step, model, optimizers, meta, loader_state):
    """Checkpoint a training run after `step` optimizer steps, so that it can resume exactly,
    and print where.

    A collective under torch.distributed (every rank calls it): each rank's loader_state (its
    data position) is gathered into meta["dataloader_state"] (a list indexed by rank), each
    rank saves its own optimizer shard, and rank 0 (and under several nodes the first process
    of every node, common.writes_checkpoint_files) saves the model, the RNG states and the meta.
    `model` is the uncompiled module (clean state_dict names); `meta` must hold "model_config"
    (save_checkpoint's contract).
    """
    rank = get_dist_info()[1]
    loader_states = gather_from_ranks(loader_state)
    meta = {**meta, "dataloader_state": loader_states, "rng_state": capture_rng_state()}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), [opt.state_dict() for opt in optimizers], meta,
                    rank=rank, writer=writes_checkpoint_files())
    print0(f"saved checkpoint {checkpoint_dir} step {step}")


def load_training_state(checkpoint_dir, step, model, optimizers, device):
    """Restore model, optimizers and RNG from a save_training_state checkpoint, in place, and
    print which one. step None = the last complete checkpoint in checkpoint_dir; under torch.distributed
    the last one complete on every node (a node killed while saving may lack the newest).

    Returns (step, meta, loader_state): loader_state is this rank's data position.

    Raises:
        FileNotFoundError: no checkpoint there, or not that step (the message lists the steps there are),
            or no step that every node has.
        ValueError: the checkpoint was written by another number of processes and some of their
            optimizer files are missing here, or its model does not fit `model` (the message
            names both shapes). Another number of processes is fine otherwise: the optimizer
            states are resharded (reshard_optimizer_states) and the data loaders' states are
            global (dataloader.py), so the run continues as it would have.
    """
    ddp, rank, _, world_size = get_dist_info()
    if step is None and ddp:
        every_rank = gather_from_ranks(list_steps(checkpoint_dir))
        common = set(every_rank[0]).intersection(*every_rank[1:])
        if not common:
            raise FileNotFoundError(f"no checkpoint in {checkpoint_dir} that every node has (steps per rank: "
                                    f"{every_rank}); copy that directory from a node that has the last step to the "
                                    "others (a run moving from one node to two needs it on both), or start the stage "
                                    f"again after removing {checkpoint_dir}")
        step = max(common)
    elif step is None:
        step = find_last_step(checkpoint_dir)
    meta = load_meta(checkpoint_dir, step)
    saved_world = len(meta["dataloader_state"])
    if any(state != meta["dataloader_state"][0] for state in meta["dataloader_state"]):
        raise ValueError(f"the checkpoint {checkpoint_dir} step {step} was written by an older version that gave each "
                         "process its own data order, which this one cannot continue exactly; finish the run with "
                         "that version, or start the stage again")
    model_data, optim_data, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=saved_world == world_size,
                                                   rank=rank)
    if saved_world != world_size:  # another number of processes or nodes: reshard the optimizer states
        missing = [p for r in range(saved_world) if not os.path.exists(p := _optim_path(checkpoint_dir, step, r))]
        if missing:
            raise ValueError(f"the checkpoint {checkpoint_dir} step {step} was written by {saved_world} processes and "
                             f"this run has {world_size}, which needs every process's optimizer file, but "
                             f"{', '.join(os.path.basename(p) for p in missing)} are not there; copy them from the node "
                             "that wrote them (its same directory), or resume with the original number of processes")
        saved = [torch.load(_optim_path(checkpoint_dir, step, r), map_location=device, weights_only=True)
                 for r in range(saved_world)]
        optim_data = reshard_optimizer_states(saved, optimizers, rank, world_size)
        print0(f"resharded the optimizer states of {saved_world} processes for {world_size}")
    if GPTConfig(**meta["model_config"]) != model.config:  # a checkpoint from before GPTConfig.arch is "classic"
        raise ValueError(f"the checkpoint {checkpoint_dir} step {step} holds a {meta['model_config']} model, but this "
                         f"run builds {model.config.__dict__}; use the flags of the original run")
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in model_data.items()}, strict=True)
    for opt, state in zip(optimizers, optim_data):
        opt.load_state_dict(state)
    restore_rng_state(meta["rng_state"])
    print0(f"resumed from {checkpoint_dir} step {step}")
    return step, meta, meta["dataloader_state"][rank if saved_world == world_size else 0]


def reshard_optimizer_states(saved, optimizers, rank, world_size):
    """The optimizer state dicts that `rank` of `world_size` processes loads, made from those that
    len(saved) processes saved, so a run resumes on another number of GPUs or nodes.

    saved: per saved rank, the list of its optimizers' state_dict()s (what save_training_state
    wrote to optim_<step>_rank<r>.pt), in the order of `optimizers` (gpt.setup_optimizers':
    AdamW, Muon). The layouts (nanochat/adamw.py, nanochat/muon.py):
      AdamW: one process keeps each tensor's exp_avg/exp_avg_sq whole (torch.optim.AdamW, step a
        float tensor); DistAdamW rank r keeps rows [r*rows, (r+1)*rows), rows = ceil(d0 / W),
        step an int. The rows are concatenated in rank order, then cut for the new world size.
      Muon: per matrix, momentum_buffer and second_moment whole; DistMuon rank r keeps the
        matrices [r*k, (r+1)*k) of each shape group (k = ceil(n / W)). Merged, then this rank's.
    Hyperparameters (lr, betas, momentum, initial_lr, ...) are the saved ones; the rest of a
    param group (say torch AdamW's fused flag) stays the live optimizer's.
    Returns a list of state dicts for opt.load_state_dict.
    """
    resharded = []
    for i, opt in enumerate(optimizers):
        live = opt.state_dict()
        params = [p for group in opt.param_groups for p in group["params"]]  # state_dict index -> parameter
        merged = {}
        if isinstance(opt, (Muon, DistMuon)):
            for states in saved:
                merged.update(states[i]["state"])
            if world_size > 1:  # keep the matrices this rank owns
                owned, index = set(), 0
                for group in opt.param_groups:
                    n = len(group["params"])
                    k = -(-n // world_size)
                    owned.update(range(index + rank * k, index + min((rank + 1) * k, n)))
                    index += n
                merged = {idx: state for idx, state in merged.items() if idx in owned}
        else:
            for idx, p in enumerate(params):
                pieces = [states[i]["state"][idx] for states in saved if idx in states[i]["state"]]
                if not pieces:
                    continue
                full = {key: torch.cat([piece[key] for piece in pieces]) if len(saved) > 1 else pieces[0][key]
                        for key in ("exp_avg", "exp_avg_sq")}
                step = int(float(pieces[0]["step"]))
                if world_size == 1:
                    merged[idx] = {"step": torch.tensor(float(step), dtype=torch.float32), **full}
                else:
                    rows = -(-p.size(0) // world_size)
                    start = min(rank * rows, p.size(0))
                    end = min(start + rows, p.size(0))
                    merged[idx] = {"step": step, **{key: value[start:end].clone() for key, value in full.items()}}
        groups = [{**live_group, **{k: v for k, v in saved_group.items() if k in live_group and k != "params"}}
                  for live_group, saved_group in zip(live["param_groups"], saved[0][i]["param_groups"])]
        resharded.append({"state": merged, "param_groups": groups})
    return resharded


def capture_rng_state():
    """The Python, torch CPU and (when initialised) CUDA RNG states as a JSON-able dict, for meta["rng_state"].

    CUDA: the current device's generator. Torch states are base64 strings of their bytes.
    """
    version, internal, gauss_next = random.getstate()
    state = {"python": [version, list(internal), gauss_next],
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode("ascii")
    return state


def restore_rng_state(state):
    """Set the RNGs from a capture_rng_state() dict (the CUDA one only when CUDA is available)."""
    def to_tensor(b64):
        return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    torch.set_rng_state(to_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(to_tensor(state["cuda"]))


def find_default_source():
    """The most advanced stage with a complete checkpoint, in the order rl > sft > mid > base.

    What chat_cli and chat_web load when no --source is given. A stage directory with no
    complete checkpoint (empty, or only half-saved steps) does not count.

    Raises:
        FileNotFoundError: no stage has a checkpoint; the message says which script to run first.
    """
    base_dir = get_base_dir()
    for source in ("rl", "sft", "mid", "base"):
        checkpoints_dir = os.path.join(base_dir, STAGE_DIRS[source][0])
        tags = os.listdir(checkpoints_dir) if os.path.isdir(checkpoints_dir) else []
        if any(list_steps(os.path.join(checkpoints_dir, t)) for t in tags):
            return source
    raise FileNotFoundError(f"no model checkpoints under {base_dir} (looked in base_checkpoints, mid_checkpoints, "
                            f"chatsft_checkpoints, chatrl_checkpoints); train one first: `python -m {STAGE_DIRS['base'][1]}`, "
                            f"then `python -m {STAGE_DIRS['mid'][1]}` and `python -m {STAGE_DIRS['sft'][1]}` for a chat model "
                            "(or set NANOCHAT_BASE_DIR to the directory that holds your checkpoints)")


def prune_checkpoints(checkpoint_dir, keep):
    """Delete all but the last `keep` complete checkpoints in `checkpoint_dir` (the processes that
    write checkpoints only: common.writes_checkpoint_files).

    Each old step is un-marked first (its meta file goes before its model and optimizer files),
    so a crash mid-prune never leaves a step that looks complete but is not. A d20 checkpoint
    with optimizer state is ~5 GB: keeping every one of a 21,400-step run would take >100 GB.
    Returns the steps deleted.

    Raises:
        ValueError: keep < 1 (the latest checkpoint is what a resume needs).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep}): the last checkpoint is needed to resume")
    old = list_steps(checkpoint_dir)[:-keep]
    for step in old:
        for path in [_meta_path(checkpoint_dir, step)] + [
                os.path.join(checkpoint_dir, name) for name in sorted(os.listdir(checkpoint_dir))
                if name.startswith((f"model_{step:06d}", f"optim_{step:06d}_"))]:
            try:
                os.unlink(path)
            except FileNotFoundError:  # another node pruning a directory they share
                pass
            if path.endswith(".json"):
                fsync_dir(checkpoint_dir)
    return old
