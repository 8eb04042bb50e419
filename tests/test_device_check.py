"""
dev/device_check.py at CPU sizes (--cpu): the same code that runs on a borrowed GPU, end to end,
so it cannot rot between the rare sessions that have one. Every stage check must pass, and the
JSON and markdown results must hold the tables bench/RESULTS.md takes.
"""

import json
import os
import subprocess
import sys

import pytest

from test_base_train import make_base_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_device_check_runs_end_to_end_at_cpu_sizes(tmp_path):
    base_dir = make_base_dir(str(tmp_path / "base"))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "dev/device_check.py", "--cpu", "--part", "all", "--out", str(out),
                           "--budget-s", "600"], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, NANOCHAT_BASE_DIR=base_dir, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    part1 = json.loads((out / "device_check_part1.json").read_text())
    statuses = {c["name"]: c["status"] for c in part1["checks"]}
    assert all(status == "pass" for status in statuses.values()), part1["checks"]
    assert {"base_train resume from a checkpoint", "mid_train", "chat_sft", "chat_rl", "chat_eval",
            "Engine KV-cache decode", "chat_web + OpenAI client"} <= set(statuses)
    assert part1["train"][0]["depth"] == 2 and part1["train"][0]["tok_s"] > 0
    part2 = json.loads((out / "device_check_part2.json").read_text())
    assert [r["batch"] for r in part2["decode"]] == [1, 4, 1, 4]  # fp32+autocast, then bf16 weights
    assert part2["fp8"][0]["skipped"].startswith("fp8 training needs an NVIDIA GPU")
    assert any(r["ms"] for r in part2["sdpa"]) and part2["settings"]["fastest SDPA backend"]
    markdown = (out / "device_check_part2.md").read_text()
    assert "| depth | mode | batch | seq | tok_s | mfu |" in markdown and "| depth | weights | batch |" in markdown
    part3 = json.loads((out / "device_check_part3.json").read_text())
    assert [(r["max_batch"] == 1, r["clients"]) for r in part3["serving"]] == [(True, 1), (False, 1), (True, 4), (False, 4)]
    (compiled,) = part3["compiled_decode"]  # batch 1 at CPU sizes
    assert compiled["same_greedy_tokens"] is True and compiled["compiled_tok_s"] > 0 and compiled["compile_s"] > 0
    assert "| depth | batch | eager_tok_s | compiled_tok_s |" in (out / "device_check_part3.md").read_text()
    assert all(r["errors"] == 0 and r["slots_free_after"] and r["aggregate_tok_s"] > 0 for r in part3["serving"])
    assert "| server | max_batch | clients | aggregate_tok_s | ratio |" in (out / "device_check_part3.md").read_text()


def test_device_check_refuses_without_gpu_or_data(tmp_path):
    no_gpu = subprocess.run([sys.executable, "dev/device_check.py", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert no_gpu.returncode != 0 and "no CUDA GPU; run with --cpu" in no_gpu.stderr
    no_data = subprocess.run([sys.executable, "dev/device_check.py", "--cpu", "--out", str(tmp_path)], cwd=REPO,
                             capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "empty")))
    assert no_data.returncode != 0 and "NANOCHAT_BASE_DIR must hold" in no_data.stderr
