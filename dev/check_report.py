"""
Check a report card written by an offline pipeline run (CI runs it after `speedrun_dgx.sh --smoke`):
every stage's section is there, and every summary row an offline run can measure has a number
for the MID, SFT and RL models. Exits 1 with the list of what is missing.

    python dev/check_report.py $NANOCHAT_BASE_DIR/report/report.md
"""

import re
import sys

SECTIONS = ["Tokenizer training", "Tokenizer evaluation", "Base model training", "Base model loss", "Midtraining",
            "Chat evaluation mid", "Chat SFT", "Chat evaluation sft", "Chat RL", "Chat evaluation rl"]
OFFLINE_ROWS = ["SpellingBee", "HumanEval", "DefinitionMC", "Arithmetic", "ChatCORE"]
NUMBER = re.compile(r"^-?\d+(\.\d+)?$")

text = open(sys.argv[1], encoding="utf-8").read()
problems = [f"section '## {s}' is missing" for s in SECTIONS if f"## {s}\n" not in text]
rows = {}
for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and len(cells) == 5:
        rows.setdefault(cells[0], cells[1:])  # the summary table comes first
for name in OFFLINE_ROWS:
    if name not in rows:
        problems.append(f"summary row {name} is missing")
        continue
    base, mid, sft, rl = rows[name]
    for column, value in (("MID", mid), ("SFT", sft), ("RL", rl)):
        if not NUMBER.match(value):
            problems.append(f"summary row {name} has no {column} number (got {value!r})")
if problems:
    sys.exit("report card incomplete:\n  " + "\n  ".join(problems))
print(f"report card complete: {len(SECTIONS)} sections, summary rows {OFFLINE_ROWS} filled for MID/SFT/RL")
