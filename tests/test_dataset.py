"""Tests for nanochat/dataset.py: reading shards, the FineWeb-EDU download (against a local HTTP server),
and the command line (whose --offline forwards to nanochat/offline_corpus.py, tested in test_offline_corpus.py)."""

import http.server
import os
import socket
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import DatasetError, download_shards, list_parquet_files, main, parquets_iter_batched

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
# Reading shards

def write_shards(data_dir, docs_per_shard=(6, 6, 4), row_group_size=2):
    os.makedirs(data_dir, exist_ok=True)
    shards = []
    for s, n in enumerate(docs_per_shard):
        docs = [f"shard {s} doc {d}" for d in range(n)]
        pq.write_table(pa.table({"text": docs}), os.path.join(data_dir, f"shard_{s:05d}.parquet"), row_group_size=row_group_size)
        shards.append(docs)
    return shards


def test_parquets_iter_batched_splits_and_strides(tmp_path):
    data_dir = str(tmp_path / "base_data")
    shards = write_shards(data_dir)
    open(os.path.join(data_dir, "shard_00003.parquet.tmp"), "w").close()  # an unfinished download is not a shard
    assert len(list_parquet_files(data_dir)) == 3
    train = list(parquets_iter_batched("train", data_dir=data_dir))
    assert train == [shards[s][i:i + 2] for s in (0, 1) for i in (0, 2, 4)]
    assert [d for b in parquets_iter_batched("val", data_dir=data_dir) for d in b] == shards[2]
    ranks = [list(parquets_iter_batched("train", start=r, step=2, data_dir=data_dir)) for r in (0, 1)]
    assert ranks[0] == [train[0], train[2], train[3], train[5]] and ranks[1] == [train[1], train[4]]


def test_parquets_iter_batched_defaults_to_the_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    shards = write_shards(str(tmp_path / "base_data"))
    assert dataset.get_data_dir() == str(tmp_path / "base_data")
    assert next(parquets_iter_batched("val")) == shards[2][:2]


def test_reading_without_shards_names_the_commands(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m nanochat.dataset -n 8.*--offline"):
        next(parquets_iter_batched("train", data_dir=str(tmp_path)))
    write_shards(str(tmp_path), docs_per_shard=(2,))
    with pytest.raises(FileNotFoundError, match="validation"):
        next(parquets_iter_batched("train", data_dir=str(tmp_path)))
    assert next(parquets_iter_batched("val", data_dir=str(tmp_path))) == ["shard 0 doc 0", "shard 0 doc 1"]
    with pytest.raises(ValueError, match="split"):
        next(parquets_iter_batched("test", data_dir=str(tmp_path)))


# -----------------------------------------------------------------------------
# Downloading, from a local HTTP server

class ShardServer:
    """Serves parquet shards on 127.0.0.1; can fail the first request, truncate, answer HTML, or 404."""

    def __init__(self, files):
        self.files, self.requests = files, {}
        self.fail_first, self.truncate, self.html = set(), set(), set()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.send_response(200)
                self.end_headers()

            def do_GET(self):
                name = self.path.rsplit("/", 1)[1]
                server.requests[name] = server.requests.get(name, 0) + 1
                if name not in server.files:
                    return self.send_error(404)
                if name in server.fail_first and server.requests[name] == 1:
                    return self.send_error(500)
                body = b"<html>rate limited</html>" if name in server.html else server.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if name in server.truncate else body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/resolve/main"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def parquet_bytes(texts):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"text": texts}), sink)
    return sink.getvalue().to_pybytes()


@pytest.fixture
def server():
    files = {f"shard_{i:05d}.parquet": parquet_bytes([f"web page {i}.{j}" for j in range(5)]) for i in range(4)}
    s = ShardServer(files)
    yield s
    s.close()


def test_download_fetches_in_parallel_and_skips_present_shards(server, tmp_path):
    data_dir = str(tmp_path)
    paths = download_shards(3, data_dir=data_dir, base_url=server.url, num_workers=3, backoff_s=0.01)
    assert paths == list_parquet_files(data_dir) and len(paths) == 3
    for path in paths:
        assert open(path, "rb").read() == server.files[os.path.basename(path)]
    download_shards(3, data_dir=data_dir, base_url=server.url, backoff_s=0.01)
    assert server.requests == {f"shard_{i:05d}.parquet": 1 for i in range(3)}
    assert next(parquets_iter_batched("val", data_dir=data_dir)) == [f"web page 2.{j}" for j in range(5)]


def test_download_retries_after_a_server_error(server, tmp_path):
    server.fail_first.add("shard_00001.parquet")
    download_shards(2, data_dir=str(tmp_path), base_url=server.url, backoff_s=0.01)
    assert server.requests["shard_00001.parquet"] == 2
    assert open(tmp_path / "shard_00001.parquet", "rb").read() == server.files["shard_00001.parquet"]


@pytest.mark.parametrize("failure", ["truncate", "html"])
def test_a_failed_download_leaves_no_partial_file(server, tmp_path, failure):
    getattr(server, failure).add("shard_00000.parquet")
    with pytest.raises(DatasetError, match="after 3 attempts"):
        download_shards(1, data_dir=str(tmp_path), base_url=server.url, max_attempts=3, backoff_s=0.01)
    assert server.requests["shard_00000.parquet"] == 3
    assert os.listdir(tmp_path) == []


def test_download_of_a_missing_shard_is_not_retried(server, tmp_path):
    with pytest.raises(DatasetError, match="404"):
        dataset.download_single_file(7, str(tmp_path), server.url, backoff_s=0.01)
    assert server.requests == {"shard_00007.parquet": 1} and os.listdir(tmp_path) == []


def test_unreachable_server_points_to_the_offline_corpus(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(DatasetError, match=r"cannot reach 127.0.0.1:\d+.*python -m nanochat.dataset --offline"):
        download_shards(2, data_dir=str(tmp_path), base_url=f"http://127.0.0.1:{port}/x")


def test_cli_downloads_from_nanochat_data_url(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url)
    main(["-n", "2", "-w", "2"])
    assert [os.path.basename(p) for p in list_parquet_files()] == ["shard_00000.parquet", "shard_00001.parquet"]
    with pytest.raises(SystemExit, match="between 1 and 1823"):
        main(["--num_files", "5000"])


def test_download_refuses_a_folder_holding_the_offline_corpus(server, tmp_path):
    (tmp_path / dataset.OFFLINE_MANIFEST).write_text("{}")
    with pytest.raises(DatasetError, match="offline corpus"):
        download_shards(1, data_dir=str(tmp_path), base_url=server.url)
    assert server.requests == {}


# -----------------------------------------------------------------------------
# Command line

def test_cli_names_both_modes_and_forwards_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "either -n N" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"^error: no Debian package database"):  # offline_corpus's message
        main(["--offline", "--root", str(tmp_path / "empty"), "--force"])


@pytest.mark.slow
def test_the_training_path_does_not_import_the_corpus_builder():
    code = "import sys, nanochat.dataset; assert 'nanochat.offline_corpus' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
