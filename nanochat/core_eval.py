"""
The CORE metric of DCLM (Li et al. 2024, "DataComp-LM", https://arxiv.org/abs/2406.11794):
in-context evaluation of a base model on 22 tasks, reduced to one number, the mean over the
tasks of the accuracy centered on the task's random baseline.

Three kinds of task, each judged by the model's losses on a continuation after a few-shot prompt:
    multiple_choice    one context, several continuations: the one with the lowest mean
                       per-token loss is the model's answer (ARC, HellaSwag, PIQA, ...)
    schema             several contexts, one continuation: the context under which the
                       continuation has the lowest mean loss is the answer (Winograd, COPA-like)
    language_modeling  one context, one continuation: correct iff greedy (argmax) decoding
                       would produce every continuation token (LAMBADA, SQuAD, ...)

The data is the eval bundle upstream nanochat distributes (`$NANOCHAT_BASE_DIR/eval_bundle/`:
core.yaml, eval_meta_data.csv, eval_data/**.jsonl). Prompt rendering, few-shot sampling and
the data order follow upstream's conventions so the numbers are comparable with its reports.

Not for: chat-model evaluation (scripts/chat_eval), bits per byte (loss_eval.py), or the
choice of when to run (scripts/base_eval, scripts/base_train --core-metric-every).
"""

import csv
import json
import os
import random
import shutil
import tempfile
import time
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import atomic_write, get_base_dir, print0, writes_checkpoint_files

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"

# The 22 tasks of CORE (the DCLM paper's "Core" set), as labelled in the bundle's core.yaml.
CORE_TASK_LABELS = (
    "hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata", "arc_easy", "arc_challenge", "copa",
    "commonsense_qa", "piqa", "openbook_qa", "lambada_openai", "hellaswag", "winograd", "winogrande",
    "bigbench_dyck_languages", "agi_eval_lsat_ar", "bigbench_cs_algorithms", "bigbench_operators",
    "bigbench_repeat_copy_logic", "squad", "coqa", "boolq", "bigbench_language_identification",
)

# task type -> the fields every JSONL row of that type must have
TASK_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}

FEWSHOT_SEPARATOR = "\n\n"  # between the few-shot examples and before the example itself
DATA_SHUFFLE_SEED = 1337  # the fixed order max_per_task cuts from (upstream's seed)
FEWSHOT_SEED = 1234  # example idx draws its few-shot examples with Random(FEWSHOT_SEED + idx) (upstream's)


class EvalBundleError(RuntimeError):
    """A problem with the eval bundle the user can fix (offline, a broken file); the message says how."""


# -----------------------------------------------------------------------------
# The eval bundle: download, unpack, read

def get_eval_bundle_dir():
    """$NANOCHAT_BASE_DIR/eval_bundle (str); not created."""
    return os.path.join(get_base_dir(), "eval_bundle")


def get_eval_bundle_url():
    """Where the bundle is downloaded from: $NANOCHAT_EVAL_BUNDLE_URL (a mirror, a test server) or EVAL_BUNDLE_URL."""
    return os.environ.get("NANOCHAT_EVAL_BUNDLE_URL") or EVAL_BUNDLE_URL


def download_eval_bundle(bundle_dir=None, url=None):
    """Make sure the eval bundle is unpacked in `bundle_dir`; return `bundle_dir`.

    Nothing happens when bundle_dir/core.yaml exists. Otherwise the zip is taken from
    eval_bundle.zip next to `bundle_dir` (copy it there by hand on an offline machine) or
    downloaded to that path (through a temporary file renamed once complete), then unpacked
    into a temporary folder that is renamed onto `bundle_dir`, so an interrupted download or
    unzip never leaves a half bundle behind. The zip is kept, so removing `bundle_dir` and
    calling this again unpacks it without a download.

    Args:
        bundle_dir: default get_eval_bundle_dir().
        url: default get_eval_bundle_url().

    Raises:
        EvalBundleError: the server cannot be reached or answers with an error (the message
            says where to copy eval_bundle.zip instead), the zip is broken or holds no
            core.yaml, or `bundle_dir` exists without core.yaml.
    """
    bundle_dir = os.path.abspath(bundle_dir or get_eval_bundle_dir())
    url = url or get_eval_bundle_url()
    if os.path.exists(os.path.join(bundle_dir, "core.yaml")):
        return bundle_dir
    if os.path.exists(bundle_dir):
        raise EvalBundleError(f"{bundle_dir} exists but has no core.yaml (an unfinished copy?); "
                              "remove it and run again")
    parent = os.path.dirname(bundle_dir)
    os.makedirs(parent, exist_ok=True)
    zip_path = os.path.join(parent, "eval_bundle.zip")
    if not os.path.exists(zip_path):
        _download(url, zip_path)
    if not zipfile.is_zipfile(zip_path):
        raise EvalBundleError(f"{zip_path} is not a zip archive (a broken download?); delete it and run again")
    tmp = tempfile.mkdtemp(dir=parent, prefix=".eval_bundle.")
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)  # extractall drops absolute paths and ".." from member names
        # upstream's zip holds one top-level folder eval_bundle/; accept core.yaml at the root too
        unpacked = next((d for d in (os.path.join(tmp, "eval_bundle"), tmp)
                         if os.path.exists(os.path.join(d, "core.yaml"))), None)
        if unpacked is None:
            raise EvalBundleError(f"{zip_path} holds no core.yaml (not the CORE eval bundle); delete it and run again")
        os.rename(unpacked, bundle_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print0(f"unpacked the CORE eval bundle into {bundle_dir}")
    return bundle_dir


def _download(url, path):
    """Stream `url` to `path` through a temporary file in the same folder (common.atomic_write).

    Raises:
        EvalBundleError: the server cannot be reached or answers with an error status.
    """
    import requests  # only the online path needs it

    def stream_zip(f):
        with requests.get(url, stream=True, timeout=(10, 60)) as response:
            response.raise_for_status()
            for chunk in response.iter_content(chunk_size=1 << 20):
                f.write(chunk)

    print0(f"downloading the CORE eval bundle from {url} to {path}")
    try:
        atomic_write(path, stream_zip)
    except (requests.RequestException, OSError) as e:
        raise EvalBundleError(f"cannot download the CORE eval bundle from {url} ({type(e).__name__}: {e}); copy "
                              f"eval_bundle.zip to {path} (it is unpacked from there), or skip the CORE evaluation "
                              "(skip base_eval; base_train --core-metric-every -1)") from None
    print0(f"downloaded eval_bundle.zip ({os.path.getsize(path) / 1e6:.1f} MB)")


def ensure_eval_bundle(device, bundle_dir=None):
    """download_eval_bundle() on the process that writes this node's files (rank 0, and the first
    process of every other node with a disk of its own: common.writes_checkpoint_files), the
    others wait for it; return the bundle dir.

    A collective under torch.distributed: every rank calls it. `device` carries the success
    flag (nccl reduces only CUDA tensors), so when a download fails every rank raises instead of
    waiting forever.

    Raises:
        EvalBundleError: as download_eval_bundle (on every rank).
    """
    bundle_dir = os.path.abspath(bundle_dir or get_eval_bundle_dir())
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    error = None
    if not distributed or writes_checkpoint_files():
        try:
            download_eval_bundle(bundle_dir)
        except EvalBundleError as e:
            error = e
    if distributed:
        failed = torch.tensor(float(error is not None), device=device)
        dist.all_reduce(failed)
        if failed.item() and error is None:
            raise EvalBundleError(f"a node could not provide the CORE eval bundle in {bundle_dir}; see its message")
    if error is not None:
        raise error
    return bundle_dir


def load_core_tasks(bundle_dir):
    """The tasks of core.yaml, with their random baselines from eval_meta_data.csv.

    Returns a list of dicts in core.yaml's order:
        label (str), task_type ("multiple_choice" | "schema" | "language_modeling"),
        data_path (str, the JSONL file), num_fewshot (int), continuation_delimiter (str,
        default " "), random_baseline (float, the accuracy of guessing, in percent).

    Raises:
        EvalBundleError: a file is missing or a task is malformed; the message names the file.
    """
    import yaml  # pyyaml; reads core.yaml only
    config_path = os.path.join(bundle_dir, "core.yaml")
    meta_path = os.path.join(bundle_dir, "eval_meta_data.csv")
    for path in (config_path, meta_path):
        if not os.path.exists(path):
            raise EvalBundleError(f"{path} is missing: {bundle_dir} is not a complete eval bundle; remove it and "
                                  "run again to unpack it afresh")
    with open(config_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise EvalBundleError(f"{config_path} has no 'icl_tasks' list; it is not a CORE task config")
    with open(meta_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"Eval Task", "Random baseline"} <= rows[0].keys():
        raise EvalBundleError(f"{meta_path} lacks the columns 'Eval Task' and 'Random baseline'")
    baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in rows}

    if not config["icl_tasks"]:
        raise EvalBundleError(f"{config_path} lists no tasks under 'icl_tasks'")
    tasks = []
    for i, task in enumerate(config["icl_tasks"]):
        where = f"{config_path}, icl_tasks[{i}]"
        missing = [k for k in ("label", "dataset_uri", "num_fewshot", "icl_task_type") if k not in task]
        if missing:
            raise EvalBundleError(f"{where} lacks {missing}")
        label, task_type = task["label"], task["icl_task_type"]
        if task_type not in TASK_FIELDS:
            raise EvalBundleError(f"{where} ({label}) has icl_task_type {task_type!r}; known: {sorted(TASK_FIELDS)}")
        if label not in baselines:
            raise EvalBundleError(f"{meta_path} has no random baseline for task {label!r} (no 'Eval Task' row)")
        num_fewshot = task["num_fewshot"]
        num_fewshot = num_fewshot[0] if isinstance(num_fewshot, list) else num_fewshot  # CORE uses one count per task
        data_path = os.path.join(bundle_dir, "eval_data", task["dataset_uri"])
        if not os.path.exists(data_path):
            raise EvalBundleError(f"{data_path} (task {label}) is missing; remove {bundle_dir} and run again to "
                                  "unpack the bundle afresh")
        tasks.append({"label": label, "task_type": task_type, "data_path": data_path, "num_fewshot": int(num_fewshot),
                      "continuation_delimiter": task.get("continuation_delimiter", " "),
                      "random_baseline": baselines[label]})
    return tasks


def load_task_data(data_path, task_type, max_per_task=-1):
    """The examples of one task: its JSONL rows in a fixed shuffled order, the first max_per_task (-1: all).

    The shuffle (Random(1337)) makes a cut at max_per_task a fair sample of the task rather
    than its first rows, and the same for every run.

    Raises:
        EvalBundleError: a row is not JSON or lacks a field of its task type (file and line named).
    """
    data = []
    with open(data_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalBundleError(f"{data_path}:{line_no} is not JSON ({e})") from None
            missing = [k for k in TASK_FIELDS[task_type] if k not in row]
            if missing:
                raise EvalBundleError(f"{data_path}:{line_no} lacks {missing}, which a {task_type} example needs")
            data.append(row)
    random.Random(DATA_SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


# -----------------------------------------------------------------------------
# Prompts: few-shot examples, rendering, tokens and the span to score

def sample_fewshot(data, idx, num_fewshot):
    """The few-shot examples for data[idx]: num_fewshot others (never itself), the same on every run and rank.

    Fewer when the task has fewer other examples (e.g. a small max_per_task).
    """
    if num_fewshot <= 0:
        return []
    others = [i for i in range(len(data)) if i != idx]
    rng = random.Random(FEWSHOT_SEED + idx)
    return [data[i] for i in rng.sample(others, min(num_fewshot, len(others)))]


def render_prompts_mc(item, delimiter, fewshot):
    """One prompt per choice: few-shot "query<delim>gold choice" blocks, then "query<delim>choice"."""
    prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}{FEWSHOT_SEPARATOR}" for ex in fewshot)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, delimiter, fewshot):
    """One prompt per context option: few-shot "gold context<delim>continuation" blocks, then
    "option<delim>continuation"."""
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}{FEWSHOT_SEPARATOR}"
                     for ex in fewshot)
    return [f"{prefix}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item, delimiter, fewshot):
    """[prompt without the continuation, prompt with it].

    Contexts are stripped (some datasets' contexts end in whitespace), and so is the whole
    prompt without the continuation: a trailing space would be merged into the continuation's
    first token in the prompt with it, so the first could not be a token prefix of the second.
    """
    prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}{FEWSHOT_SEPARATOR}" for ex in fewshot)
    context = f"{prefix}{item['context'].strip()}{delimiter}"
    return [context.strip(), f"{context}{item['continuation']}"]


RENDERERS = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
             "language_modeling": render_prompts_lm}


def _common_prefix_length(seqs):
    n = 0
    while n < min(len(s) for s in seqs) and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def prepare_example(tokenizer, item, task_type, delimiter, fewshot, max_seq_len=None):
    """Token sequences to run for one example and the span of each that is scored.

    Every prompt starts with <|bos|>. The scored span [start, end) is the continuation:
    multiple_choice: after the prefix all choices share; schema: the suffix all context
    options share; language_modeling: the prompt with the continuation after the one without
    (only that one sequence is run). Spans are never empty and never include position 0
    (a choice whose tokens begin another choice's would otherwise score nothing). Sequences
    longer than max_seq_len lose tokens from the left, as does their span's start.

    Returns:
        (tokens, starts, ends): list of list[int] (one per option; one for language_modeling),
        and two list[int] with 1 <= start < end <= len(tokens[i]).
    """
    prompts = RENDERERS[task_type](item, delimiter, fewshot)
    bos = tokenizer.get_bos_token_id()
    tokens = tokenizer.encode(prompts, prepend=bos)
    if task_type == "multiple_choice":
        start = min(_common_prefix_length(tokens), min(len(t) for t in tokens) - 1)
        starts, ends = [start] * len(tokens), [len(t) for t in tokens]
    elif task_type == "schema":
        suffix = _common_prefix_length([t[::-1] for t in tokens])
        suffix = max(1, min(suffix, min(len(t) for t in tokens) - 1))
        starts, ends = [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    else:
        without, with_continuation = tokens
        # Normally `without` is a token prefix of `with_continuation`. Should the tokenizer merge
        # across the boundary it is not; then the tokens from the first difference on are scored
        # (upstream stops with an assertion error there).
        start = min(_common_prefix_length(tokens), len(with_continuation) - 1)
        tokens, starts, ends = [with_continuation], [start], [len(with_continuation)]
    if max_seq_len is not None:
        for i, t in enumerate(tokens):
            crop = len(t) - max_seq_len
            if crop > 0:
                tokens[i] = t[crop:]
                starts[i] = max(1, starts[i] - crop)
                ends[i] -= crop
    return tokens, starts, ends


# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def evaluate_example(model, tokenizer, item, task_type, delimiter, fewshot, device):
    """Whether the model answers one example correctly (bool). One forward pass over all its options.

    The options are right-padded with <|bos|> to the longest; the model is causal, so padding
    after a sequence changes none of its logits. Run it under the caller's autocast.
    """
    max_seq_len = model.config.sequence_len
    tokens, starts, ends = prepare_example(tokenizer, item, task_type, delimiter, fewshot, max_seq_len)
    num_options, seq_len = len(tokens), max(len(t) for t in tokens)
    ids = torch.full((num_options, seq_len), tokenizer.get_bos_token_id(), dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    ids = ids.to(device)  # (N, T)
    logits = model(ids)  # (N, T, V) fp32; position j predicts token j+1
    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        predicted = logits[0, s - 1:e - 1].argmax(dim=-1)  # (e-s,)
        return bool(torch.equal(predicted, ids[0, s:e]))
    # only the spans' losses: a full (N, T, V) cross entropy would double the peak memory
    mean_losses = torch.stack([F.cross_entropy(logits[i, s - 1:e - 1], ids[i, s:e])
                               for i, (s, e) in enumerate(zip(starts, ends))])  # (N,)
    return int(mean_losses.argmin().item()) == item["gold"]  # ties: the first option, as upstream


@torch.no_grad()
def evaluate_task(model, tokenizer, data, device, task_meta):
    """Accuracy (float in [0, 1]) of the model on one task's examples.

    Args:
        model: called as model(ids) with ids (N, T) int64 -> logits (N, T, vocab) float;
            model.config.sequence_len is the longest sequence it is given (longer prompts
            are cut from the left). Run it under the caller's autocast.
        data: the task's examples (load_task_data), the same list on every rank.
        task_meta: dict with task_type, num_fewshot, continuation_delimiter.

    Under torch.distributed rank r evaluates examples r, r + world, ... and the correct counts
    are all-reduced: every rank returns the accuracy over all of `data` (a collective: every
    rank calls it).
    """
    task_type, delimiter = task_meta["task_type"], task_meta["continuation_delimiter"]
    num_fewshot = task_meta["num_fewshot"]
    if not data:
        raise ValueError("evaluate_task: the task has no examples")
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    correct = 0
    for idx in range(rank, len(data), world):
        fewshot = sample_fewshot(data, idx, num_fewshot)
        correct += evaluate_example(model, tokenizer, data[idx], task_type, delimiter, fewshot, device)
    correct = torch.tensor(float(correct), dtype=torch.float32, device=device)  # counts up to 2^24 are exact
    if distributed:
        dist.all_reduce(correct)
    return correct.item() / len(data)


def centered_accuracy(accuracy, random_baseline):
    """(acc - b) / (1 - b) with b = random_baseline / 100: 0 at chance, 1 at perfect (DCLM's centering).

    `random_baseline` is in percent, as in eval_meta_data.csv.
    """
    b = 0.01 * random_baseline
    return (accuracy - b) / (1.0 - b)


def evaluate_core(model, tokenizer, device, bundle_dir=None, max_per_task=-1):
    """Evaluate every task of the eval bundle and the CORE metric.

    Args:
        model, device: as evaluate_task (run under the caller's autocast; the model in eval mode).
        bundle_dir: default $NANOCHAT_BASE_DIR/eval_bundle, downloaded there when missing
            (ensure_eval_bundle; a collective under torch.distributed).
        max_per_task: examples per task (-1: all). Upstream evaluates 500 per task during
            training: faster, but a noisier number than the full evaluation.

    Returns:
        {"results": {label: accuracy}, "centered_results": {label: centered accuracy},
         "core_metric": mean centered accuracy over the tasks} (floats). It is the CORE of
        DCLM only when the bundle has its 22 tasks and max_per_task is -1; a warning says so
        otherwise.

    Raises:
        EvalBundleError: the bundle cannot be downloaded or is malformed.
    """
    bundle_dir = ensure_eval_bundle(device, bundle_dir)
    tasks = load_core_tasks(bundle_dir)
    labels = [t["label"] for t in tasks]
    if sorted(labels) != sorted(CORE_TASK_LABELS):
        print0(f"warning: {bundle_dir}/core.yaml has {len(labels)} tasks, not the 22 of CORE; the metric is "
               "not comparable with published CORE numbers")
    results, centered_results = {}, {}
    for task in tasks:
        t0 = time.time()
        data = load_task_data(task["data_path"], task["task_type"], max_per_task)
        results[task["label"]] = accuracy = evaluate_task(model, tokenizer, data, device, task)
        centered_results[task["label"]] = centered = centered_accuracy(accuracy, task["random_baseline"])
        print0(f"{task['label']:<34} {task['num_fewshot']:>2}-shot {len(data):>6} examples | accuracy {accuracy:.4f} "
               f"| centered {centered:+.4f} | {time.time() - t0:.1f} s")
    core_metric = sum(centered_results.values()) / len(centered_results)
    return {"results": results, "centered_results": centered_results, "core_metric": core_metric}


def format_core_table(out):
    """evaluate_core's output as a markdown table: task, accuracy, centered, then the CORE row."""
    lines = ["| task | accuracy | centered |", "|---|---:|---:|"]
    for label, accuracy in out["results"].items():
        lines.append(f"| {label} | {accuracy:.4f} | {out['centered_results'][label]:.4f} |")
    lines.append(f"| **CORE** | | **{out['core_metric']:.4f}** |")
    return "\n".join(lines)
