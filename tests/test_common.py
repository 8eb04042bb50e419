"""
nanochat/common.py's shared helpers, the one copy the whole library uses: atomic writes, the
duration format, the Hub check (against servers on 127.0.0.1) and the unified-memory check.
"""

import http.server
import os
import socket
import threading

import pytest

from nanochat.common import ProgressPrinter, atomic_write, format_duration, hub_reachable, is_unified_memory


def test_atomic_write_bytes_text_and_callable(tmp_path):
    path = tmp_path / "sub" / "f.bin"  # parent directories are created
    atomic_write(str(path), b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    atomic_write(str(path), "héllo")
    assert path.read_text(encoding="utf-8") == "héllo"
    atomic_write(str(path), lambda f: f.write(b"streamed"))
    assert path.read_bytes() == b"streamed"
    assert os.listdir(path.parent) == ["f.bin"]  # no temporary file left behind


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(str(path), "old")

    def half_then_fail(f):
        f.write(b"new but hal")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), half_then_fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_atomic_write_gives_the_permissions_open_would(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a"), "x")
        os.umask(0o077)
        atomic_write(str(tmp_path / "b"), "x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "b").st_mode & 0o777 == 0o600


def test_format_duration():
    assert format_duration(None) == "?"
    assert format_duration(-5) == "0s"
    assert format_duration(7.9) == "7s"
    assert format_duration(725) == "12m05s"
    assert format_duration(12345) == "3h25m45s"
    assert format_duration(3 * 86400 + 4 * 3600 + 5 * 60 + 6) == "3d04h05m"


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.send_response(404)  # any answer counts: the server is there
        self.end_headers()

    def log_message(self, *args):
        pass


def test_hub_reachable_asks_hf_endpoint(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub_reachable(timeout=5)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert not hub_reachable(timeout=5)  # not even asked
    finally:
        server.shutdown()
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert not hub_reachable(timeout=5)


def test_unified_memory_gpus():
    assert is_unified_memory("NVIDIA GB10", False)  # by name, whatever the driver says
    assert is_unified_memory("Orin", True)
    assert not is_unified_memory("NVIDIA H100 80GB HBM3", False)


def test_progress_printer_never_prints_the_last_item(capsys):
    progress = ProgressPrinter("val pass@k", 3, "problems", every_s=0)
    for done in (1, 2, 3):
        progress.update(done)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["val pass@k: 1/3 problems (33%)", "val pass@k: 2/3 problems (67%)"]
    quiet = ProgressPrinter("x", 3, "items")  # every 30 s: a quick loop prints nothing
    for done in (1, 2, 3):
        quiet.update(done)
    assert capsys.readouterr().out == ""
