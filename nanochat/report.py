"""
The report card: each stage logs its own section under $NANOCHAT_BASE_DIR/report/ (a
markdown file for people and a JSON file for programs), may append per-step metrics for the
plots, and `generate` assembles report.md: the system header, a summary table (CORE and the
chat tasks per stage), total wall time and GPU energy (and its price), the loss plots, then
every section in pipeline order.

    python -m nanochat.report reset --config depth=20 run=speedrun   # start a new run's report
    python -m nanochat.report generate --price-per-kwh 0.30         # write report.md (+ a copy in the repo root)

Not for: computing metrics (the stages do that and hand the numbers over) or measuring energy
(nanochat/energy.py does).
"""

import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys

import psutil
import torch

from nanochat.common import (ArgumentParser, atomic_write, format_duration, get_base_dir, get_dist_info,
                             gpu_memory_bytes, raise_if_disk_full)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Sections in pipeline order; report.md lists them in this order, then any others by name.
SECTION_ORDER = ["tokenizer-training", "tokenizer-evaluation", "base-model-training", "base-model-loss",
                 "base-model-evaluation", "chat-evaluation-base", "midtraining", "chat-evaluation-mid", "chat-sft",
                 "chat-evaluation-sft", "chat-rl", "chat-evaluation-rl"]

# Summary table: its columns and the section each column's chat-task scores come from.
SUMMARY_COLUMNS = [("BASE", "chat-evaluation-base"), ("MID", "chat-evaluation-mid"),
                   ("SFT", "chat-evaluation-sft"), ("RL", "chat-evaluation-rl")]
# Rows always shown (upstream's tasks), then offline tasks that only appear when some stage ran them.
SUMMARY_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
OFFLINE_TASKS = ["DefinitionMC", "Arithmetic"]

# Keys the stages log as plain numbers for the totals (seconds, watt-hours).
WALL_TIME_KEY = "wall time (s)"
ENERGY_KEY = "energy (Wh)"

CODE_EXTENSIONS = (".py", ".rs", ".sh", ".html")
# Folders whose files are not ours: environments, build outputs, caches.
SKIPPED_DIRS = {"target", "__pycache__", "node_modules", "build", "dist"}


def slugify(title):
    """'Base model training' -> 'base-model-training' (the section's file name, without .md)."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def to_jsonable(value):
    """A value as JSON can hold it: numbers and strings as they are, NaN/inf as the strings
    "nan"/"inf" (strict JSON has no such numbers), 0-d tensors/numpy scalars as their Python
    number, and anything else (a torch.device, a path) as its str()."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return str(value)


def as_number(value):
    """`value` as a float when it is a finite real number (not a bool, not a string), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


class Report:
    """The report directory: one section per stage (<slug>.md + <slug>.json), metric logs
    (metrics_<stage>.jsonl), plots (plot_<stage>.png), header.md and report.md."""

    def __init__(self, report_dir=None):
        self.report_dir = report_dir or os.path.join(get_base_dir(), "report")
        os.makedirs(self.report_dir, exist_ok=True)

    def log(self, section, data):
        """Write (or overwrite) one stage's section: <slug>.md and <slug>.json.

        Args:
            section: title, e.g. "Base model training".
            data: list of dicts (key: value rows, floats printed with 4 significant digits)
                and/or strings (markdown pasted as is). The JSON file holds the dicts merged
                into one ("data"; a later key wins) and the strings as a list ("text"), so
                `generate` reads numbers from it and never parses markdown.
        Returns: the path of the markdown file.
        """
        now = datetime.datetime.now()
        lines = [f"## {section}", f"timestamp: {now:%Y-%m-%d %H:%M:%S}", ""]
        merged, texts = {}, []
        for item in data:
            if isinstance(item, str):
                lines += [item, ""]
                texts.append(item)
                continue
            for k, v in item.items():
                merged[str(k)] = to_jsonable(v)
                v = f"{v:.4g}" if isinstance(v, float) else v
                lines.append(f"- {k}: {v}")
            lines.append("")
        slug = slugify(section)
        record = {"section": section, "timestamp": now.isoformat(timespec="seconds"), "data": merged, "text": texts}
        # JSON first: generate treats a section as present once its .md exists
        atomic_write(os.path.join(self.report_dir, f"{slug}.json"), json.dumps(record, indent=2) + "\n")
        path = os.path.join(self.report_dir, f"{slug}.md")
        atomic_write(path, "\n".join(lines) + "\n")
        return path

    def log_metrics(self, stage, step, **values):
        """Append one line {"step": step, **values} to metrics_<stage>.jsonl (for the plots).

        Cheap enough to call every step: one open in append mode and one short write (pass
        Python floats: a CUDA tensor would be synced by .item()). A killed run can at most tear
        its last line, which read_metrics skips.
        E.g. log_metrics("base", 250, train_loss=3.1) and log_metrics("base", 250, val_bpb=1.02).

        Raises:
            DiskFullError: the disk is full (the message names the report directory).
        """
        line = json.dumps({"step": int(step), **{k: to_jsonable(v) for k, v in values.items()}})
        path = os.path.join(self.report_dir, f"metrics_{slugify(stage)}.jsonl")
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:
            raise_if_disk_full(e, path, 0)
            raise

    def reset(self, config=None):
        """Start a run: remove every section, metric log, plot and report.md, then write a
        fresh header.md that records `config` (a dict: the run's configuration)."""
        for name in os.listdir(self.report_dir):
            if (name.endswith((".md", ".json")) or (name.startswith("metrics_") and name.endswith(".jsonl"))
                    or (name.startswith("plot_") and name.endswith(".png"))):
                os.remove(os.path.join(self.report_dir, name))
        atomic_write(os.path.join(self.report_dir, "header.md"), system_header(config))

    def sections(self):
        """Slugs of the logged sections, in pipeline order then by name."""
        names = [n[:-3] for n in os.listdir(self.report_dir) if n.endswith(".md") and n not in ("header.md", "report.md")]
        order = {name: i for i, name in enumerate(SECTION_ORDER)}
        return sorted(names, key=lambda n: (order.get(n, len(order)), n))

    def read_data(self, slug):
        """The merged key/value data a section logged (its JSON "data"), or {} if it has no JSON."""
        path = os.path.join(self.report_dir, f"{slug}.json")
        if not os.path.exists(path):
            return {}
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("data", {})

    def read_metrics(self, stage_slug):
        """The lines of metrics_<stage>.jsonl as dicts; a torn last line (killed run) is skipped."""
        rows = []
        with open(os.path.join(self.report_dir, f"metrics_{stage_slug}.jsonl"), encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return rows

    def generate(self, copy_to=None, price_per_kwh=None):
        """Assemble report.md: header, summary table, totals, plots, then every section.

        Args:
            copy_to: also copy report.md there (the CLI copies it to the repo root).
            price_per_kwh: electricity price per kWh (any currency); with it the energy line
                also shows the cost. None leaves the cost out.
        Returns: the path of report.md.
        """
        header_path = os.path.join(self.report_dir, "header.md")
        if os.path.exists(header_path):
            with open(header_path, encoding="utf-8") as f:
                header = f.read()
        else:
            header = system_header()
        sections = self.sections()
        data = {slug: self.read_data(slug) for slug in sections}
        parts = [header, summary_table(data), totals_markdown(data, price_per_kwh), self.plots_markdown()]
        for slug in sections:
            with open(os.path.join(self.report_dir, f"{slug}.md"), encoding="utf-8") as f:
                parts.append(f.read())
        out = os.path.join(self.report_dir, "report.md")
        atomic_write(out, "\n".join(p for p in parts if p))
        if copy_to:
            shutil.copyfile(out, copy_to)
        return out

    def plots_markdown(self):
        """Draw plot_<stage>.png for every metrics_<stage>.jsonl and return the markdown that
        links them (relative paths, so report.md works wherever the folder is copied), or ""."""
        stages = sorted(n[len("metrics_"):-len(".jsonl")] for n in os.listdir(self.report_dir)
                        if n.startswith("metrics_") and n.endswith(".jsonl"))
        links = []
        for stage in stages:
            name = f"plot_{stage}.png"
            if plot_metrics(self.read_metrics(stage), stage, os.path.join(self.report_dir, name)):
                links.append(f"![{stage}]({name})")
        return "## Plots\n\n" + "\n\n".join(links) + "\n" if links else ""


def metric_series(rows):
    """log_metrics rows -> {metric: (steps, values)}, steps ascending.

    Metrics logged at different steps (train loss every step, val bpb every 250) each keep only
    the steps where they appear. A step logged twice (a run resumed from an earlier checkpoint
    repeats steps) keeps its latest value. Non-numeric values are left out.
    """
    by_step = {}  # metric -> {step: value}
    for row in rows:
        for key, value in row.items():
            value = as_number(value)
            if key != "step" and value is not None and isinstance(row.get("step"), int):
                by_step.setdefault(key, {})[row["step"]] = value
    return {key: (sorted(d), [d[s] for s in sorted(d)]) for key, d in by_step.items()}


def plot_metrics(rows, title, path):
    """Save one PNG with a panel per metric of metric_series(rows) (value against step).

    Returns True if a plot was written (False: no numeric metric in `rows`).
    """
    series = metric_series(rows)
    if not series:
        return False
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on a training box
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.5), squeeze=False)
    for ax, (key, (steps, values)) in zip(axes[0], sorted(series.items())):
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def summary_table(data):
    """The markdown summary: rows CORE, the chat tasks and ChatCORE, columns BASE/MID/SFT/RL,
    "-" where a stage did not measure a value. `data` maps section slug -> its logged data."""
    def fmt(value):
        value = as_number(value)
        return "-" if value is None else f"{value:.4f}"

    base_core = data.get("base-model-evaluation", {}).get("CORE metric")
    if as_number(base_core) is None:  # base_eval not run: the CORE base_train measured, if any
        base_core = data.get("base-model-training", {}).get("CORE metric")
    offline = [t for t in OFFLINE_TASKS if any(t in data.get(slug, {}) for _, slug in SUMMARY_COLUMNS)]
    lines = ["## Summary", "", "| Metric | " + " | ".join(c for c, _ in SUMMARY_COLUMNS) + " |",
             "|---" * (len(SUMMARY_COLUMNS) + 1) + "|",
             f"| CORE | {fmt(base_core)} | " + " | ".join("-" for _ in SUMMARY_COLUMNS[1:]) + " |"]
    for task in SUMMARY_TASKS + offline + ["ChatCORE"]:
        lines.append(f"| {task} | " + " | ".join(fmt(data.get(slug, {}).get(task)) for _, slug in SUMMARY_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def totals_markdown(data, price_per_kwh=None):
    """Per-stage wall time and GPU energy, their totals, and the energy's cost.

    Reads the numeric WALL_TIME_KEY (seconds) and ENERGY_KEY (Wh) each section logged; a
    stage without them is left out of the sums (and its cell shows "-"), and a total with no
    stage behind it reads "n/a". The cost is energy (kWh) x price_per_kwh, shown only when
    a price is given and some energy was measured.
    """
    rows, total_s, total_wh = [], None, None
    for slug, values in data.items():
        seconds, wh = as_number(values.get(WALL_TIME_KEY)), as_number(values.get(ENERGY_KEY))
        if seconds is None and wh is None:
            continue
        if seconds is not None:
            total_s = (total_s or 0.0) + seconds
        if wh is not None:
            total_wh = (total_wh or 0.0) + wh
        rows.append(f"| {slug} | {'-' if seconds is None else format_duration(seconds)} | "
                    f"{'-' if wh is None else f'{wh:.1f}'} |")
    lines = [f"- total wall time: {'n/a' if total_s is None else format_duration(total_s)}",
             f"- GPU energy: {'n/a' if total_wh is None else f'{total_wh:.1f} Wh'}"]
    if price_per_kwh is not None and total_wh is not None:
        lines.append(f"- energy cost: {total_wh / 1000 * price_per_kwh:.2f} at {price_per_kwh:g} per kWh")
    if rows:
        lines += ["", "| stage | wall time | GPU energy (Wh) |", "|---|---|---|", *rows]
    return "## Time and energy\n\n" + "\n".join(lines) + "\n"


def price_from_env():
    """The price per kWh in $NANOCHAT_PRICE_PER_KWH, or None when it is unset or empty.

    Raises:
        ValueError: it is set but is not a non-negative number.
    """
    raw = os.environ.get("NANOCHAT_PRICE_PER_KWH", "").strip()
    if not raw:
        return None
    try:
        price = float(raw)
    except ValueError:
        price = -1.0
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"NANOCHAT_PRICE_PER_KWH={raw!r} is not a price; set it to a number such as 0.30, or unset it")
    return price


def git_commit():
    """(short commit hash, dirty flag) of the repo this file lives in, or ("unknown", False)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True,
                                    text=True, check=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def code_size(root=REPO_ROOT):
    """(lines, files) of our code (*.py, *.rs, *.sh, *.html) under `root`, skipping hidden
    folders (.venv, .git), build outputs (target/) and caches."""
    lines = files = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in SKIPPED_DIRS]
        for name in filenames:
            if name.endswith(CODE_EXTENSIONS):
                with open(os.path.join(dirpath, name), "rb") as f:
                    lines += sum(1 for _ in f)
                files += 1
    return lines, files


def gpu_info():
    """The CUDA GPU torch sees, as a dict (None without one).

    Keys: name, count, capability ((major, minor)), memory_bytes (bytes a run can use: for
    unified-memory GPUs such as GB10 the system memory, see common.is_unified_memory),
    unified (bool).
    """
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    memory_bytes, unified = gpu_memory_bytes(0)
    return {"name": props.name, "count": torch.cuda.device_count(), "capability": (props.major, props.minor),
            "memory_bytes": memory_bytes, "unified": unified}


def system_header(config=None):
    """Markdown header: date, git commit, hardware, software, code size and the run's `config`."""
    commit, dirty = git_commit()
    gpu = gpu_info()
    if gpu is None:
        gpu_line = "none"
    else:
        memory = f"{gpu['memory_bytes'] / 2**30:.1f} GiB" + (" unified with the CPU" if gpu["unified"] else "")
        gpu_line = f"{gpu['name']} x {gpu['count']} (sm_{gpu['capability'][0]}{gpu['capability'][1]}, {memory})"
    lines, files = code_size()
    out = [
        "# nanochat-spark report card", "",
        f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
        f"- git commit: {commit}{' (dirty)' if dirty else ''}",
        f"- GPU: {gpu_line}",
        f"- CPU: {platform.processor() or platform.machine()}, {psutil.cpu_count(logical=True)} logical cores",
        f"- memory: {psutil.virtual_memory().total / 2**30:.1f} GiB",
        f"- Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda or 'n/a'}",
        f"- code: {lines:,} lines in {files} files (*.py, *.rs, *.sh, *.html)",
    ]
    if config:
        out += ["", "Run configuration:", ""] + [f"- {k}: {v}" for k, v in config.items()]
    return "\n".join(out) + "\n"


def get_report():
    """The Report for $NANOCHAT_BASE_DIR/report (rank 0 only writes; others get a no-op)."""
    return Report() if get_dist_info()[1] == 0 else DummyReport()


class DummyReport:
    """Stands in for Report on ranks > 0 so only one process writes."""

    def log(self, *args, **kwargs):
        return None

    def log_metrics(self, *args, **kwargs):
        return None


def parse_config(pairs):
    """["depth=20", "run=x"] -> {"depth": "20", "run": "x"}.

    Raises:
        ValueError: an item without "=" (the message names it).
    """
    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--config {pair!r} is not key=value (e.g. --config depth=20)")
        config[key] = value
    return config


if __name__ == "__main__":
    parser = ArgumentParser(description="Reset or generate the report card")
    parser.add_argument("command", choices=["reset", "generate"])
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE",
                        help="reset: the run configuration to record in the header")
    parser.add_argument("--copy-to", default=os.path.join(REPO_ROOT, "report.md"),
                        help="generate: also copy report.md here (default: the repository root, as upstream)")
    parser.add_argument("--price-per-kwh", type=float, default=None,
                        help="generate: electricity price per kWh for the energy cost "
                             "(default: $NANOCHAT_PRICE_PER_KWH; unset: no cost line)")
    args = parser.parse_args()
    report = Report()
    if args.command == "reset":
        try:
            config = parse_config(args.config)
        except ValueError as e:
            parser.error(str(e))
        report.reset(config)
        print(f"report reset in {report.report_dir}")
    else:
        try:
            price = args.price_per_kwh if args.price_per_kwh is not None else price_from_env()
        except ValueError as e:
            parser.error(str(e))
        if price is not None and not (math.isfinite(price) and price >= 0):
            parser.error(f"--price-per-kwh {price} is not a price; pass a number such as 0.30")
        path = report.generate(copy_to=args.copy_to, price_per_kwh=price)
        print(f"report written to {path} (and copied to {args.copy_to})")
    sys.exit(0)
