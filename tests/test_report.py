"""
nanochat/report.py: a section's markdown and JSON, the metric logs, reset (header with the run
configuration and code size, old files gone), and generate: the summary table read from the
stages' JSON, the wall-time/energy totals and cost, the plots, the section order, and the CLI.
"""

import json
import os
import subprocess
import sys
import types

import pytest
import torch

from nanochat.common import is_unified_memory
from nanochat.report import (DummyReport, Report, code_size, get_report, gpu_info, metric_series, parse_config,
                             price_from_env, summary_table, system_header, totals_markdown)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def report(tmp_path):
    return Report(str(tmp_path / "report"))


def log_run(report):
    """Sections with the keys the stages log (scripts/*.py), numbers where they log numbers."""
    report.log("Tokenizer training", [{"vocab size": 65536, "wall time (s)": 60.0}])
    report.log("Base model training", [{"depth": 4}, {"minimum val bpb": 1.1, "final val bpb": 1.12,
                                                      "CORE metric": 0.05, "training time": "1h00m00s",
                                                      "wall time (s)": 3600.0, "energy (Wh)": 250.0}])
    report.log("Base model evaluation", [{"CORE metric": 0.0612}, "| task | ... |"])
    report.log("Midtraining", [{"wall time (s)": 600, "energy (Wh)": 40.5}])
    report.log("Chat evaluation mid", [{"source": "mid"}, "| task | accuracy |", {
        "ARC-Easy": 0.31, "ARC-Challenge": 0.27, "MMLU": 0.29, "GSM8K": 0.02, "HumanEval": 0.05,
        "SpellingBee": 0.5, "ChatCORE": 0.08}])
    report.log("Chat SFT", [{"wall time (s)": 300, "energy (Wh)": "n/a"}])
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.35, "MMLU": 0.3, "Arithmetic": 0.9, "ChatCORE": 0.1}])


def test_log_writes_markdown_and_json(report):
    path = report.log("Base model training", [{"a": 1.23456789, "b": "x"}, "some **markdown**",
                                              {"b": "later wins", "nan": float("nan"), "t": torch.tensor(2.5),
                                               "device": torch.device("cpu")}])
    assert path.endswith("base-model-training.md")
    md = open(path).read()
    assert md.startswith("## Base model training") and "- a: 1.235" in md and "some **markdown**" in md
    record = json.load(open(os.path.join(report.report_dir, "base-model-training.json")))
    assert record["section"] == "Base model training"
    assert record["data"] == {"a": 1.23456789, "b": "later wins", "nan": "nan", "t": 2.5, "device": "cpu"}
    assert record["text"] == ["some **markdown**"]
    assert report.read_data("base-model-training")["a"] == 1.23456789


def test_log_metrics_appends_json_lines_and_skips_a_torn_line(report):
    report.log_metrics("base", 0, train_loss=4.0)
    report.log_metrics("base", 1, train_loss=3.5, lrm=torch.tensor(1.0))
    with open(os.path.join(report.report_dir, "metrics_base.jsonl"), "a") as f:
        f.write('{"step": 2, "train_lo')  # a run killed mid-write
    assert report.read_metrics("base") == [{"step": 0, "train_loss": 4.0}, {"step": 1, "train_loss": 3.5, "lrm": 1.0}]


def test_metric_series_splits_metrics_and_keeps_the_latest_value_of_a_step():
    rows = [{"step": 0, "train_loss": 4.0}, {"step": 1, "train_loss": 3.9}, {"step": 2, "train_loss": 3.8},
            {"step": 2, "val_bpb": 1.5, "note": "text"},
            {"step": 1, "train_loss": 3.7}, {"step": 2, "train_loss": 3.6}]  # resumed from step 1
    assert metric_series(rows) == {"train_loss": ([0, 1, 2], [4.0, 3.7, 3.6]), "val_bpb": ([2], [1.5])}
    assert metric_series([{"step": 0, "note": "text"}]) == {}


def test_other_ranks_write_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dummy = get_report()
    assert isinstance(dummy, DummyReport)
    assert dummy.log("X", [{"a": 1}]) is None and dummy.log_metrics("base", 0, train_loss=1.0) is None
    assert not os.path.exists(tmp_path / "report")


def test_reset_clears_the_run_and_records_config(report):
    log_run(report)
    report.log_metrics("base", 0, train_loss=1.0)
    report.generate()
    keep = os.path.join(report.report_dir, "notes.txt")
    open(keep, "w").write("mine")
    report.reset({"depth": 20, "run": "speedrun"})
    assert sorted(os.listdir(report.report_dir)) == ["header.md", "notes.txt"]
    header = open(os.path.join(report.report_dir, "header.md")).read()
    assert "- depth: 20" in header and "- run: speedrun" in header
    assert "- git commit:" in header and "- code:" in header and "torch" in header


def test_summary_table_reads_numbers_from_json(report):
    log_run(report)
    data = {slug: report.read_data(slug) for slug in report.sections()}
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in summary_table(data).splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["Metric"] == ["BASE", "MID", "SFT", "RL"]
    assert rows["CORE"] == ["0.0612", "-", "-", "-"]  # base_eval's CORE wins over base_train's
    assert rows["ARC-Easy"] == ["-", "0.3100", "0.3500", "-"]
    assert rows["GSM8K"] == ["-", "0.0200", "-", "-"]
    assert rows["Arithmetic"] == ["-", "-", "0.9000", "-"]  # an offline task some stage ran
    assert "DefinitionMC" not in rows  # one no stage ran
    assert rows["ChatCORE"] == ["-", "0.0800", "0.1000", "-"]


def test_summary_falls_back_to_base_train_core(report):
    report.log("Base model training", [{"CORE metric": 0.05}])
    assert "| CORE | 0.0500 |" in summary_table({"base-model-training": report.read_data("base-model-training")})
    assert "| CORE | - |" in summary_table({"base-model-training": {"CORE metric": "n/a"}})


def test_totals_sum_wall_time_and_energy_and_price_it(report):
    log_run(report)
    data = {slug: report.read_data(slug) for slug in report.sections()}
    text = totals_markdown(data, price_per_kwh=0.5)
    assert "- total wall time: 1h16m00s" in text  # 60 + 3600 + 600 + 300 = 4560 s
    assert "- GPU energy: 290.5 Wh" in text  # the SFT's "n/a" is left out
    assert "- energy cost: 0.15 at 0.5 per kWh" in text
    assert "| chat-sft | 5m00s | - |" in text
    assert "energy cost" not in totals_markdown(data)
    empty = totals_markdown({})
    assert "- total wall time: n/a" in empty and "- GPU energy: n/a" in empty


def test_generate_assembles_everything_in_pipeline_order(report, tmp_path):
    report.reset({"depth": 4})
    log_run(report)
    with open(os.path.join(report.report_dir, "legacy.md"), "w") as f:
        f.write("## Legacy\nno json\n")  # a section without JSON still shows, after the known ones
    for step in range(5):
        report.log_metrics("base", step, train_loss=4.0 - step * 0.1)
    report.log_metrics("base", 4, val_bpb=1.2)
    copy = tmp_path / "copy.md"
    out = report.generate(copy_to=str(copy), price_per_kwh=0.3)
    text = open(out).read()
    assert open(copy).read() == text
    order = ["# nanochat-spark report card", "- depth: 4", "## Summary", "## Time and energy", "## Plots",
             "## Tokenizer training", "## Base model training", "## Base model evaluation", "## Midtraining",
             "## Chat evaluation mid", "## Chat SFT", "## Chat evaluation sft", "## Legacy"]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert "![base](plot_base.png)" in text  # relative: the folder can be copied anywhere
    png = os.path.join(report.report_dir, "plot_base.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_generate_without_anything_logged(report):
    text = open(report.generate()).read()
    assert "# nanochat-spark report card" in text and "| CORE | - | - | - | - |" in text and "## Plots" not in text


def test_price_from_env(monkeypatch):
    monkeypatch.delenv("NANOCHAT_PRICE_PER_KWH", raising=False)
    assert price_from_env() is None
    monkeypatch.setenv("NANOCHAT_PRICE_PER_KWH", "0.25")
    assert price_from_env() == 0.25
    for bad in ("cheap", "-1", "nan"):
        monkeypatch.setenv("NANOCHAT_PRICE_PER_KWH", bad)
        with pytest.raises(ValueError, match="NANOCHAT_PRICE_PER_KWH"):
            price_from_env()


def test_parse_config():
    assert parse_config(["depth=20", "run=a=b"]) == {"depth": "20", "run": "a=b"}
    with pytest.raises(ValueError, match="key=value"):
        parse_config(["depth"])


def test_code_size_counts_our_code_only(tmp_path):
    (tmp_path / "a.py").write_text("1\n2\n3\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.rs").write_text("x\ny\n")
    (tmp_path / "notes.txt").write_text("not code\n")
    for skipped in (".venv", "target", ".git"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "c.py").write_text("skip\n")
    assert code_size(str(tmp_path)) == (5, 2)


def test_unified_memory_gpu_reports_system_memory(monkeypatch):
    import psutil
    assert is_unified_memory("NVIDIA GB10", False) and is_unified_memory("Orin", 1)
    assert not is_unified_memory("NVIDIA H100 80GB HBM3", 0)
    props = types.SimpleNamespace(name="NVIDIA GB10", major=12, minor=1, total_memory=5 * 2**30, is_integrated=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    info = gpu_info()
    assert info == {"name": "NVIDIA GB10", "count": 1, "capability": (12, 1),
                    "memory_bytes": psutil.virtual_memory().total, "unified": True}
    assert "NVIDIA GB10 x 1 (sm_121," in system_header() and "unified with the CPU" in system_header()
    props.name, props.is_integrated = "NVIDIA H100 80GB HBM3", 0
    assert gpu_info()["memory_bytes"] == 5 * 2**30


@pytest.mark.slow
def test_cli_reset_and_generate(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "NANOCHAT_PRICE_PER_KWH": "0.4"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "nanochat.report", *args], cwd=REPO_ROOT, env=env,
                                       capture_output=True, text=True)
    out = run("reset", "--config", "depth=4", "run=cli")
    assert out.returncode == 0, out.stderr
    Report(str(tmp_path / "report")).log("Midtraining", [{"wall time (s)": 90, "energy (Wh)": 1000.0}])
    copy = tmp_path / "root-report.md"
    out = run("generate", "--copy-to", str(copy))
    assert out.returncode == 0, out.stderr
    text = copy.read_text()
    assert "- run: cli" in text and "- energy cost: 0.40 at 0.4 per kWh" in text and "## Midtraining" in text
    bad = run("generate", "--copy-to", str(copy), "--price-per-kwh", "-2")
    assert bad.returncode != 0 and "--price-per-kwh" in bad.stderr
    bad = run("reset", "--config", "depth")
    assert bad.returncode != 0 and "key=value" in bad.stderr
