"""
nanochat/core_eval.py and scripts/base_eval.py on CPU, on a small eval bundle written here in
the format of the real one (core.yaml, eval_meta_data.csv, eval_data/*.jsonl; one task per
type, hand-written examples): exact prompts, scored spans, oracle models that must score 1.0 and
0.0, the centered formula, the bundle download (local server, copied zip, offline error), and
base_eval end to end on a saved tiny checkpoint, alone and under torchrun.
"""

import dataclasses
import functools
import http.server
import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
import types
import zipfile

import pytest
import torch

from nanochat.checkpoint_manager import save_checkpoint
from nanochat.core_eval import (RENDERERS, EvalBundleError, centered_accuracy, download_eval_bundle, evaluate_core,
                                evaluate_task, format_core_table, load_core_tasks, load_task_data, prepare_example,
                                render_prompts_lm, render_prompts_mc, render_prompts_schema, sample_fewshot)
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MC = [  # multiple_choice: query, choices, gold
    {"query": "Question: What color is the sky on a clear day?", "choices": ["green", "blue", "red"], "gold": 1},
    {"query": "Question: How many legs does a cat have?", "choices": ["four", "two", "six"], "gold": 0},
    {"query": "Question: What do bees make?", "choices": ["milk", "silk", "honey"], "gold": 2},
    {"query": "Question: Which is the largest?", "choices": ["an ant", "a whale", "a mouse"], "gold": 1},
    {"query": "Question: What falls from clouds?", "choices": ["rain", "sand", "glass"], "gold": 0},
    {"query": "Question: Where do fish live?", "choices": ["in trees", "in deserts", "in water"], "gold": 2},
]
SCHEMA = [  # schema: context_options, continuation, gold
    {"context_options": ["The trophy did not fit in the case because the trophy",
                         "The trophy did not fit in the case because the case"],
     "continuation": "was too big.", "gold": 0},
    {"context_options": ["The man could not lift his son because the man",
                         "The man could not lift his son because the son"], "continuation": "was so weak.", "gold": 0},
    {"context_options": ["Joan thanked Susan for the help Joan",
                         "Joan thanked Susan for the help Susan"], "continuation": "had given.", "gold": 1},
    {"context_options": ["The fish ate the worm because the fish",
                         "The fish ate the worm because the worm"], "continuation": "was hungry.", "gold": 0},
    {"context_options": ["The city council denied the protesters a permit because the council",
                         "The city council denied the protesters a permit because the protesters"],
     "continuation": "feared violence.", "gold": 0},
]
LM = [  # language_modeling: context, continuation
    {"context": "The cat sat on the ", "continuation": "mat"},
    {"context": "One, two, three, four,", "continuation": "five"},
    {"context": "Roses are red, violets are", "continuation": "blue"},
    {"context": "  The capital of France is", "continuation": "Paris"},
    {"context": "Monday, Tuesday,", "continuation": "Wednesday"},
    {"context": "A, B, C,", "continuation": "D"},
    {"context": "Salt and", "continuation": "pepper"},
]
TASKS = [  # label, type, file, few-shot, delimiter, random baseline (percent), data
    ("demo_mc", "multiple_choice", "world_knowledge/demo_mc.jsonl", 2, "\nAnswer: ", 100 / 3, MC),
    ("demo_schema", "schema", "language_understanding/demo_schema.jsonl", 1, " ", 50.0, SCHEMA),
    ("demo_lm", "language_modeling", "language_understanding/demo_lm.jsonl", 2, " ", 0.0, LM),
]


def write_bundle(bundle_dir):
    """An eval bundle with the three TASKS, laid out as upstream's."""
    yaml_lines = ["icl_tasks:"]
    csv_lines = ["Eval Task,Task Category,Task Type,#shots,Random baseline"]
    for label, task_type, uri, shots, delimiter, baseline, data in TASKS:
        path = os.path.join(bundle_dir, "eval_data", uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in data)
        yaml_lines += [f"- label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                       f"  icl_task_type: {task_type}", f"  continuation_delimiter: {json.dumps(delimiter)}"]
        csv_lines.append(f"{label},demo,{task_type},{shots},{baseline}")
    with open(os.path.join(bundle_dir, "core.yaml"), "w", encoding="utf-8") as f:
        f.write("\n".join(yaml_lines) + "\n")
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), "w", encoding="utf-8") as f:
        f.write("\n".join(csv_lines) + "\n")
    return bundle_dir


@functools.lru_cache(maxsize=1)
def byte_tokenizer():
    """No merges: one token per byte, plus the special tokens."""
    return RustBPETokenizer.train_from_iterator(iter(["byte level"]), 256 + 9)


def tiny_model(sequence_len=128):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=byte_tokenizer().get_vocab_size(), n_layer=1, n_head=1,
                       n_kv_head=1, n_embd=64)
    model = GPT(config)
    model.init_weights()
    return model.eval()


def task_meta(label):
    _, task_type, _, shots, delimiter, _, _ = next(t for t in TASKS if t[0] == label)
    return {"task_type": task_type, "num_fewshot": shots, "continuation_delimiter": delimiter}


class OracleModel(torch.nn.Module):
    """Predicts every next token perfectly on sequences whose text ends with one of `endings`
    (low loss, argmax right) and knows nothing elsewhere (uniform logits: loss ln V, argmax 0)."""

    def __init__(self, tokenizer, endings, sequence_len=128):
        super().__init__()
        self.tokenizer, self.endings = tokenizer, tuple(endings)
        self.config = types.SimpleNamespace(sequence_len=sequence_len)

    def forward(self, ids):
        bos = self.tokenizer.get_bos_token_id()
        logits = torch.zeros(*ids.shape, self.tokenizer.get_vocab_size())  # (N, T, V)
        for i, row in enumerate(ids.tolist()):
            n = len(row)
            while n > 1 and row[n - 1] == bos:  # right padding
                n -= 1
            text = self.tokenizer.decode([t for t in row[:n] if t != bos])
            if text.endswith(self.endings):
                logits[i, torch.arange(n - 1), torch.tensor(row[1:n])] = 20.0
        return logits


def gold_endings(label, wrong=False):
    """The text each example's correct (or, with wrong=True, first incorrect) sequence ends with."""
    meta = task_meta(label)
    d = meta["continuation_delimiter"]
    data = next(t for t in TASKS if t[0] == label)[-1]
    if meta["task_type"] == "multiple_choice":
        pick = (lambda r: 1 if r["gold"] == 0 else 0) if wrong else (lambda r: r["gold"])
        return [f"{r['query']}{d}{r['choices'][pick(r)]}" for r in data]
    if meta["task_type"] == "schema":
        pick = (lambda r: 1 - r["gold"]) if wrong else (lambda r: r["gold"])
        return [f"{r['context_options'][pick(r)]}{d}{r['continuation']}" for r in data]
    return [] if wrong else [f"{r['context'].strip()}{d}{r['continuation']}" for r in data]


# -----------------------------------------------------------------------------
# Prompts

def test_render_prompts_exact_strings():
    item, shots = MC[0], [MC[1], MC[2]]
    assert render_prompts_mc(item, "\nAnswer: ", shots) == [
        "Question: How many legs does a cat have?\nAnswer: four\n\n"
        "Question: What do bees make?\nAnswer: honey\n\n"
        f"Question: What color is the sky on a clear day?\nAnswer: {choice}" for choice in ("green", "blue", "red")]
    assert render_prompts_schema(SCHEMA[0], " ", [SCHEMA[2]]) == [
        "Joan thanked Susan for the help Susan had given.\n\n"
        "The trophy did not fit in the case because the trophy was too big.",
        "Joan thanked Susan for the help Susan had given.\n\n"
        "The trophy did not fit in the case because the case was too big."]
    # contexts are stripped; the prompt without the continuation loses its trailing delimiter
    assert render_prompts_lm(LM[0], " ", [LM[3], LM[1]]) == [
        "The capital of France is Paris\n\nOne, two, three, four, five\n\nThe cat sat on the",
        "The capital of France is Paris\n\nOne, two, three, four, five\n\nThe cat sat on the mat"]
    assert render_prompts_mc(item, " ", []) == [f"{item['query']} {c}" for c in item["choices"]]


def test_fewshot_excludes_the_example_and_is_fixed():
    data = list(range(8))
    for idx in range(8):
        shots = sample_fewshot(data, idx, 3)
        assert len(shots) == 3 and idx not in shots and len(set(shots)) == 3
        assert sample_fewshot(data, idx, 3) == shots
    assert sorted(sample_fewshot(data[:3], 0, 10)) == [1, 2]  # fewer others than asked: all of them
    assert sample_fewshot(data, 0, 0) == []


def test_scored_spans_are_the_continuations():
    tok = byte_tokenizer()
    bos = tok.get_bos_token_id()
    tokens, starts, ends = prepare_example(tok, MC[0], "multiple_choice", "\nAnswer: ", [MC[1]])
    assert [tok.decode(t[s:e]) for t, s, e in zip(tokens, starts, ends)] == ["green", "blue", "red"]
    assert all(t[0] == bos for t in tokens)
    tokens, starts, ends = prepare_example(tok, SCHEMA[0], "schema", " ", [SCHEMA[1]])
    assert [tok.decode(t[s:e]) for t, s, e in zip(tokens, starts, ends)] == [" was too big."] * 2
    tokens, starts, ends = prepare_example(tok, LM[0], "language_modeling", " ", [LM[1]])
    assert len(tokens) == 1 and tok.decode(tokens[0][starts[0]:ends[0]]) == " mat"
    # cropped from the left to max_seq_len: the span keeps pointing at the continuation
    tokens, starts, ends = prepare_example(tok, MC[0], "multiple_choice", "\nAnswer: ", [MC[1], MC[2]], max_seq_len=40)
    assert all(len(t) == 40 for t in tokens)
    assert [tok.decode(t[s:e]) for t, s, e in zip(tokens, starts, ends)] == ["green", "blue", "red"]


def test_spans_are_never_empty():
    tok = byte_tokenizer()
    # one choice's tokens begin the other's: the shared prefix stops one token short of the shorter
    tokens, starts, ends = prepare_example(tok, {"query": "Q", "choices": ["ab", "abc"], "gold": 0},
                                           "multiple_choice", " ", [])
    assert all(1 <= s < e for s, e in zip(starts, ends))
    # a merge across the context/continuation boundary ("b" + "c" -> "bc"): the context's
    # tokens are no prefix of the full prompt's; the tokens from the first difference are scored
    merging = RustBPETokenizer.train_from_iterator(iter(["bcbc bc " * 100]), 256 + 9 + 1)
    tokens, starts, ends = prepare_example(merging, {"context": "ab", "continuation": "c"}, "language_modeling", "", [])
    assert merging.decode(tokens[0][starts[0]:ends[0]]) == "bc"


# -----------------------------------------------------------------------------
# Scoring

@pytest.mark.parametrize("label", ["demo_mc", "demo_schema", "demo_lm"])
def test_oracle_scores_one_and_anti_oracle_zero(label):
    tok = byte_tokenizer()
    data = next(t for t in TASKS if t[0] == label)[-1]
    assert evaluate_task(OracleModel(tok, gold_endings(label)), tok, data, "cpu", task_meta(label)) == 1.0
    assert evaluate_task(OracleModel(tok, gold_endings(label, wrong=True)), tok, data, "cpu", task_meta(label)) == 0.0
    # a context window that cuts into the few-shot examples: the prompts are cropped from the
    # left, and the continuation is still the part scored
    meta = task_meta(label)
    window = max(len(e) for e in gold_endings(label)) + 1
    prompts = [p for idx, item in enumerate(data) for p in RENDERERS[meta["task_type"]](
        item, meta["continuation_delimiter"], sample_fewshot(data, idx, meta["num_fewshot"]))]
    assert sum(len(p) + 1 > window for p in prompts) >= len(data)  # most are cropped
    assert evaluate_task(OracleModel(tok, gold_endings(label), sequence_len=window), tok, data, "cpu",
                         task_meta(label)) == 1.0


def test_centered_accuracy():
    assert centered_accuracy(0.25, 25.0) == 0.0
    assert centered_accuracy(1.0, 25.0) == 1.0
    assert centered_accuracy(0.5, 25.0) == pytest.approx(1 / 3)
    assert centered_accuracy(0.1, 0.0) == 0.1
    assert centered_accuracy(0.0, 50.0) == -1.0


def test_evaluate_core_on_a_tiny_model(tmp_path, capsys):
    bundle = write_bundle(str(tmp_path / "eval_bundle"))
    out = evaluate_core(tiny_model(), byte_tokenizer(), "cpu", bundle_dir=bundle)
    assert set(out["results"]) == {"demo_mc", "demo_schema", "demo_lm"}
    for label, _, _, _, _, baseline, data in TASKS:
        acc = out["results"][label]
        assert 0.0 <= acc <= 1.0
        assert (acc * len(data)) == pytest.approx(round(acc * len(data)))  # a count of correct examples
        assert out["centered_results"][label] == pytest.approx((acc - 0.01 * baseline) / (1 - 0.01 * baseline))
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 3)
    assert "not the 22 of CORE" in capsys.readouterr().out
    assert evaluate_core(tiny_model(), byte_tokenizer(), "cpu", bundle_dir=bundle) == out  # deterministic
    table = format_core_table(out)
    assert "| demo_lm |" in table and f"**{out['core_metric']:.4f}**" in table


def test_evaluate_core_with_an_oracle_is_one(tmp_path):
    bundle = write_bundle(str(tmp_path / "eval_bundle"))
    endings = [e for label in ("demo_mc", "demo_schema", "demo_lm") for e in gold_endings(label)]
    out = evaluate_core(OracleModel(byte_tokenizer(), endings), byte_tokenizer(), "cpu", bundle_dir=bundle)
    assert out["results"] == {"demo_mc": 1.0, "demo_schema": 1.0, "demo_lm": 1.0}
    assert out["core_metric"] == pytest.approx(1.0)


def test_max_per_task_takes_a_fixed_sample(tmp_path):
    bundle = write_bundle(str(tmp_path / "eval_bundle"))
    tasks = {t["label"]: t for t in load_core_tasks(bundle)}
    assert tasks["demo_mc"]["num_fewshot"] == 2 and tasks["demo_mc"]["continuation_delimiter"] == "\nAnswer: "
    assert tasks["demo_schema"]["random_baseline"] == 50.0
    full = load_task_data(tasks["demo_lm"]["data_path"], "language_modeling")
    three = load_task_data(tasks["demo_lm"]["data_path"], "language_modeling", max_per_task=3)
    assert sorted(map(json.dumps, full)) == sorted(map(json.dumps, LM)) and three == full[:3]
    out = evaluate_core(tiny_model(), byte_tokenizer(), "cpu", bundle_dir=bundle, max_per_task=3)
    assert all(round(acc * 3, 6) in (0, 1, 2, 3) for acc in out["results"].values())


def test_malformed_bundles_name_the_file(tmp_path):
    bundle = write_bundle(str(tmp_path / "eval_bundle"))
    meta_csv = os.path.join(bundle, "eval_meta_data.csv")
    lines = open(meta_csv).read().splitlines()
    with open(meta_csv, "w") as f:
        f.write("\n".join(line for line in lines if not line.startswith("demo_lm")) + "\n")
    with pytest.raises(EvalBundleError, match="eval_meta_data.csv has no random baseline for task 'demo_lm'"):
        load_core_tasks(bundle)
    os.remove(os.path.join(bundle, "core.yaml"))
    with pytest.raises(EvalBundleError, match="core.yaml is missing"):
        load_core_tasks(bundle)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "Q", "choices": ["a"], "gold": 0}\n{"query": "Q"}\n')
    with pytest.raises(EvalBundleError, match=r"bad.jsonl:2 lacks \['choices', 'gold'\]"):
        load_task_data(str(bad), "multiple_choice")


# -----------------------------------------------------------------------------
# The bundle download

def bundle_zip_bytes(tmp_path):
    """eval_bundle.zip as upstream ships it: one top-level folder eval_bundle/."""
    src = write_bundle(str(tmp_path / "src" / "eval_bundle"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for root, _, files in os.walk(src):
            for name in files:
                path = os.path.join(root, name)
                zf.write(path, os.path.relpath(path, os.path.dirname(src)))
    return buf.getvalue()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_download_unpacks_the_bundle_from_a_server(tmp_path):
    payload = bundle_zip_bytes(tmp_path)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = tmp_path / "base"
        url = f"http://127.0.0.1:{server.server_port}/eval_bundle.zip"
        bundle = download_eval_bundle(str(base / "eval_bundle"), url=url)
    finally:
        server.shutdown()
    assert [t["label"] for t in load_core_tasks(bundle)] == ["demo_mc", "demo_schema", "demo_lm"]
    assert sorted(os.listdir(base)) == ["eval_bundle", "eval_bundle.zip"]  # no temporary files left


def test_a_copied_zip_is_unpacked_without_network(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "eval_bundle.zip").write_bytes(bundle_zip_bytes(tmp_path))
    bundle = download_eval_bundle(str(base / "eval_bundle"), url=f"http://127.0.0.1:{closed_port()}/eval_bundle.zip")
    assert len(load_core_tasks(bundle)) == 3


def test_offline_download_is_a_clear_error(tmp_path):
    base = tmp_path / "base"
    url = f"http://127.0.0.1:{closed_port()}/eval_bundle.zip"
    with pytest.raises(EvalBundleError) as e:
        download_eval_bundle(str(base / "eval_bundle"), url=url)
    msg = str(e.value)
    assert f"cannot download the CORE eval bundle from {url}" in msg
    assert f"copy eval_bundle.zip to {base / 'eval_bundle.zip'}" in msg and "skip base_eval" in msg
    assert os.listdir(base) == []  # no partial zip, no half bundle


# -----------------------------------------------------------------------------
# scripts/base_eval end to end

def make_checkpoint(base_dir):
    """A saved d1 base checkpoint (random weights) and its byte-level tokenizer under base_dir."""
    tok = byte_tokenizer()
    tok.save(os.path.join(base_dir, "tokenizer"))
    model = tiny_model()
    meta = {"model_config": dataclasses.asdict(model.config), "user_config": {}, "tokenizer_hash": tok.content_hash()}
    save_checkpoint(os.path.join(base_dir, "base_checkpoints", "d1"), 5, model.state_dict(), None, meta)


def run_base_eval(base_dir, *args, launcher=(sys.executable, "-m"), **env):
    env = dict(os.environ, NANOCHAT_BASE_DIR=base_dir, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    return subprocess.run([*launcher, "scripts.base_eval", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def core_from_stdout(stdout):
    return float(stdout.split("CORE metric: ")[1].split()[0])


def test_base_eval_end_to_end(tmp_path):
    base = str(tmp_path / "base")
    make_checkpoint(base)
    write_bundle(os.path.join(base, "eval_bundle"))
    proc = run_base_eval(base, "--device-type", "cpu", "--max_per_task", "4")  # the underscore alias works too
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Loaded base model d1 step 5" in proc.stdout
    for label in ("demo_mc", "demo_schema", "demo_lm"):
        assert f"| {label} |" in proc.stdout
    core = core_from_stdout(proc.stdout)
    assert math.isfinite(core)
    report = open(os.path.join(base, "report", "base-model-evaluation.md")).read()
    assert "## Base model evaluation" in report and "d1 step 5" in report and f"**{core:.4f}**" in report
    csv_text = open(os.path.join(base, "base_eval", "d1_000005.csv")).read()
    assert csv_text.startswith("task,accuracy,centered") and "demo_schema," in csv_text


def test_base_eval_offline_without_bundle_is_a_clear_error(tmp_path):
    base = str(tmp_path / "base")
    make_checkpoint(base)
    url = f"http://127.0.0.1:{closed_port()}/eval_bundle.zip"
    proc = run_base_eval(base, "--device-type", "cpu", NANOCHAT_EVAL_BUNDLE_URL=url)
    assert proc.returncode != 0
    assert f"base_eval: cannot download the CORE eval bundle from {url}" in proc.stderr
    assert "copy eval_bundle.zip to" in proc.stderr and "Traceback" not in proc.stderr


def test_base_eval_without_checkpoint_is_a_clear_error(tmp_path):
    base = str(tmp_path / "base")
    write_bundle(os.path.join(base, "eval_bundle"))
    proc = run_base_eval(base, "--device-type", "cpu")
    assert proc.returncode != 0
    assert "base_eval: no checkpoints in" in proc.stderr and "scripts.base_train" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_base_eval_under_torchrun_matches_one_process(tmp_path):
    base = str(tmp_path / "base")
    make_checkpoint(base)
    write_bundle(os.path.join(base, "eval_bundle"))
    single = run_base_eval(base, "--device-type", "cpu")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m")
    double = run_base_eval(base, "--device-type", "cpu", launcher=torchrun)
    assert single.returncode == 0 and double.returncode == 0, double.stdout[-3000:] + double.stderr[-3000:]
    assert "x 2 |" in double.stdout
    assert core_from_stdout(double.stdout) == pytest.approx(core_from_stdout(single.stdout), abs=1e-6)
    assert double.stdout.count("CORE metric:") == 1  # printed by rank 0 only
