"""dev/identity_data.py: show, add and validate the identity conversations, naming bad lines."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(path, *args):
    return subprocess.run([sys.executable, "-m", "dev.identity_data", "--file", str(path), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, NANOCHAT_BASE_DIR=str(path.parent / "no_base")))


def test_show_add_validate(tmp_path):
    path = tmp_path / "identity.jsonl"
    good = {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "nanochat."}]}
    path.write_text(json.dumps(good) + "\n")
    added = run(path, "add", "--system", "Be brief.", "--user", "Who made you?", "--assistant", "Ada.",
                "--user", "On what?", "--assistant", "A DGX Spark.")
    assert added.returncode == 0 and "added conversation 2" in added.stdout
    shown = run(path, "show", "-n", "0")
    assert "--- line 2" in shown.stdout and "assistant: A DGX Spark." in shown.stdout and "(2 conversations" in shown.stdout
    assert "all 2 conversations" in run(path, "validate").stdout
    refused = run(path, "add", "--user", "Hi", "--assistant", "")  # empty reply: training would reject it
    assert refused.returncode != 0 and "not added" in refused.stderr and len(path.read_text().splitlines()) == 2
    with open(path, "a") as f:
        f.write('{"messages": [{"role": "assistant", "content": "first"}]}\n{not json\n')
    bad = run(path, "validate")
    assert bad.returncode != 0 and "2 of 4 conversations" in bad.stderr
    assert "line 3: messages[0] is from the assistant" in bad.stdout and "line 4: not JSON" in bad.stdout
