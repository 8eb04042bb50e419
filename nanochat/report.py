"""
The report card: each stage appends its own markdown section under
$NANOCHAT_BASE_DIR/report/, and `generate` assembles them into report.md.

    python -m nanochat.report reset      # start a new run's report (removes old sections)
    python -m nanochat.report generate   # write report.md (and copy it to the repo root)

Not for: computing metrics (the stages do that and hand the numbers over).
"""

import datetime
import os
import platform
import re
import shutil
import subprocess
import sys

from nanochat.common import ArgumentParser, get_base_dir

# Sections in pipeline order; report.md lists them in this order, then any others by name.
SECTION_ORDER = ["tokenizer-training", "tokenizer-evaluation", "base-model-training", "base-model-loss",
                 "base-model-evaluation", "midtraining", "chat-evaluation-mid", "chat-sft",
                 "chat-evaluation-sft", "chat-rl", "chat-evaluation-rl"]


def slugify(title):
    """'Base model training' -> 'base-model-training' (the section's file name, without .md)."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def write_atomic(path, text):
    """Write `text` to `path` through a temp file + rename, so readers never see half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


class Report:
    """Markdown sections in `report_dir`, one file per stage."""

    def __init__(self, report_dir=None):
        self.report_dir = report_dir or os.path.join(get_base_dir(), "report")
        os.makedirs(self.report_dir, exist_ok=True)

    def log(self, section, data):
        """Write (or overwrite) one stage's section.

        Args:
            section: title, e.g. "Base model training".
            data: list of dicts (key: value rows, floats printed with 4 significant digits)
                and/or strings (markdown pasted as is).
        Returns: the path of the section file.
        """
        lines = [f"## {section}", f"timestamp: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}", ""]
        for item in data:
            if isinstance(item, str):
                lines += [item, ""]
                continue
            for k, v in item.items():
                v = f"{v:.4g}" if isinstance(v, float) else v
                lines.append(f"- {k}: {v}")
            lines.append("")
        path = os.path.join(self.report_dir, f"{slugify(section)}.md")
        write_atomic(path, "\n".join(lines) + "\n")
        return path

    def reset(self):
        """Remove every section and report.md, then write a fresh header (start of a run)."""
        for name in os.listdir(self.report_dir):
            if name.endswith(".md"):
                os.remove(os.path.join(self.report_dir, name))
        write_atomic(os.path.join(self.report_dir, "header.md"), system_header())

    def generate(self, copy_to=None):
        """Assemble header + sections into report.md (and copy it to `copy_to` if given).

        Returns: the path of report.md.
        """
        header_path = os.path.join(self.report_dir, "header.md")
        parts = [open(header_path, encoding="utf-8").read() if os.path.exists(header_path) else system_header()]
        names = [n[:-3] for n in os.listdir(self.report_dir) if n.endswith(".md") and n not in ("header.md", "report.md")]
        order = {name: i for i, name in enumerate(SECTION_ORDER)}
        for name in sorted(names, key=lambda n: (order.get(n, len(order)), n)):
            parts.append(open(os.path.join(self.report_dir, f"{name}.md"), encoding="utf-8").read())
        out = os.path.join(self.report_dir, "report.md")
        write_atomic(out, "\n".join(parts))
        if copy_to:
            shutil.copyfile(out, copy_to)
        return out


def git_commit():
    """(short commit hash, dirty flag) of the repo this file lives in, or ("unknown", False)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                                    text=True, check=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def system_header():
    """Markdown header: date, git commit, hardware and software versions."""
    import psutil
    import torch
    commit, dirty = git_commit()
    gpu = "none"
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    lines = [
        "# nanochat-spark report card", "",
        f"- date: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}",
        f"- git commit: {commit}{' (dirty)' if dirty else ''}",
        f"- GPU: {gpu}",
        f"- CPU: {platform.processor() or platform.machine()}, {psutil.cpu_count(logical=True)} logical cores",
        f"- memory: {psutil.virtual_memory().total / 2**30:.1f} GiB",
        f"- Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda or 'n/a'}",
        "",
    ]
    return "\n".join(lines)


def get_report():
    """The Report for $NANOCHAT_BASE_DIR/report (rank 0 only writes; others get a no-op)."""
    from nanochat.common import get_dist_info
    return Report() if get_dist_info()[1] == 0 else DummyReport()


class DummyReport:
    """Stands in for Report on ranks > 0 so only one process writes."""

    def log(self, *args, **kwargs):
        return None


if __name__ == "__main__":
    parser = ArgumentParser(description="Reset or generate the report card")
    parser.add_argument("command", choices=["reset", "generate"])
    args = parser.parse_args()
    report = Report()
    if args.command == "reset":
        report.reset()
        print(f"report reset in {report.report_dir}")
    else:
        repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = report.generate(copy_to=os.path.join(repo_root, "report.md"))
        print(f"report written to {path} (and copied to the repository root)")
    sys.exit(0)
