"""Tests for scripts/chat_web.py: a real server on 127.0.0.1 serving a tiny random model, driven
by the official openai client and raw HTTP (errors, limits, auth, 50 concurrent streams).

The helpers at the top (build_base_dir, start_server) are shared with test_ui.py and test_chat_cli.py.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import httpx
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["The cat sat on the mat. Hello, how are you today? I am fine, thank you.",
         "Numbers like 12 and 345 add up: 12 + 345 = 357. Python prints results."] * 30


def build_base_dir(base_dir):
    """A NANOCHAT_BASE_DIR with a small BPE tokenizer and two 1-layer chat (sft) models at step 0:

    d1      1 layer, random init (near-uniform next token, so replies end on their own after ~100 tokens), context 256
    chatty  4 layers, crafted so it never samples <|assistant_end|> or <|bos|>, context 4096 (long, slower streams)
    """
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import RustBPETokenizer
    tokenizer = RustBPETokenizer.train_from_iterator(iter(TEXTS), 400)
    tokenizer.save(os.path.join(base_dir, "tokenizer"))
    vocab_size = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    for tag, sequence_len, n_layer, n_embd in (("d1", 256, 1, 64), ("chatty", 4096, 4, 128)):
        model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=1, n_kv_head=1, n_embd=n_embd))
        model.init_weights()
        if tag == "chatty":
            with torch.no_grad():  # a large constant feature 0 after the final norm; stop tokens read it negatively
                model.transformer.wte.weight[:, 0] = 20.0
                model.lm_head.weight.zero_()
                model.lm_head.weight[:, 0] = 1.0
                for name in ("<|assistant_end|>", "<|bos|>"):
                    model.lm_head.weight[tokenizer.encode_special(name), 0] = -1.0
        meta = {"model_config": asdict(model.config), "tokenizer_hash": tokenizer.content_hash()}
        save_checkpoint(os.path.join(base_dir, "chatsft_checkpoints", tag), 0, model.state_dict(), None, meta)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m scripts.chat_web` in a subprocess on 127.0.0.1; .url, .stop()."""

    def __init__(self, base_dir, *flags):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base_dir, f"server_{self.port}.log")
        env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1"}
        env.pop("NANOCHAT_API_KEY", None)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--port", str(self.port), "--device-type", "cpu", *flags],
                                         cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, f"server exited early:\n{self.log()}"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server did not come up:\n{self.log()}")

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def chat_base_dir(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("nanochat_chat")
    build_base_dir(str(base_dir))
    return base_dir


@pytest.fixture(scope="module")
def server(chat_base_dir):
    s = Server(chat_base_dir, "--max-queue", "100", "--queue-timeout", "120")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(chat_base_dir):
    """The same d1 model in this process, to recompute what the server must have generated."""
    os.environ["NANOCHAT_BASE_DIR"] = str(chat_base_dir)
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    model, tokenizer, _ = load_model("sft", "cpu", "eval", model_tag="d1")
    return Engine(model, tokenizer), tokenizer


def expected_reply(local, messages, max_tokens, seed, temperature=0.6, top_k=50):
    """(prompt ids, generated ids including a final stop token if one was sampled) with the server's sampling."""
    engine, tokenizer = local
    prompt = tokenizer.render_for_completion({"messages": messages})
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    generated = []
    for column, _ in engine.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed):
        generated.append(column[0])
        if column[0] in stops:
            break
    return prompt, generated


def client_for(server, api_key="none"):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


# -----------------------------------------------------------------------------
# The OpenAI-compatible API, through the official client

def test_startup_prints_what_it_loaded(server):
    log = server.log()
    assert "Loaded sft model d1 step 0 from" in log and "model_000000.pt" in log
    assert "nanochat-sft-d1-step0" in log and "M params" in log


def test_models_health_stats(server):
    models = client_for(server).models.list()
    assert [m.id for m in models.data] == ["nanochat-sft-d1-step0"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "ready": True, "workers": 1, "model": "nanochat-sft-d1-step0"}
    stats = httpx.get(server.url + "/stats").json()
    assert stats["workers"] == {"total": 1, "busy": 0, "free": 1}
    assert {"requests_served", "tokens_generated", "tokens_per_second"} <= set(stats)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_non_streaming_answer_and_usage_match_the_tokenizer(server, local, seed):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
    r = client_for(server).chat.completions.create(model="nanochat-sft-d1-step0", messages=messages, max_tokens=150, seed=seed)
    prompt, generated = expected_reply(local, messages, 150, seed)
    tokenizer = local[1]
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "nanochat-sft-d1-step0"
    assert isinstance(r.created, int) and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(generated)
    assert r.usage.total_tokens == len(prompt) + len(generated)
    stopped = generated[-1] in (tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id())
    assert choice.finish_reason == ("stop" if stopped else "length")
    assert choice.message.content == tokenizer.decode(generated[:-1] if stopped else generated)


def test_finish_reason_length_iff_max_tokens_hit(server, local):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Count "}, {"type": "text", "text": "to ten."}]}]
    seen = set()
    for seed in range(6):
        r = client_for(server).chat.completions.create(model="nanochat", messages=messages, max_completion_tokens=8, seed=seed)
        _, generated = expected_reply(local, [{"role": "user", "content": "Count to ten."}], 8, seed)
        hit_stop = generated[-1] in (local[1].encode_special("<|assistant_end|>"), local[1].get_bos_token_id())
        assert r.choices[0].finish_reason == ("stop" if hit_stop else "length")
        assert r.usage.completion_tokens == len(generated) <= 8
        seen.add(r.choices[0].finish_reason)
    assert "length" in seen


def test_streaming_chunks(server, local):
    messages = [{"role": "user", "content": "Tell me a story."}]
    stream = client_for(server).chat.completions.create(model="nanochat", messages=messages, max_tokens=40, seed=7,
                                                        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    prompt, generated = expected_reply(local, messages, 40, 7)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id and c.id.startswith("chatcmpl-") for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.prompt_tokens == len(prompt)
    assert usage_chunk.usage.completion_tokens == len(generated)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    stopped = finals[0].choices[0].finish_reason == "stop"
    assert content == local[1].decode(generated[:-1] if stopped else generated)


def test_stream_ends_with_done(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert "usage" not in json.loads(lines[0][6:])  # only with stream_options.include_usage


def test_stop_sequences_end_the_completion(server, local):
    messages = [{"role": "user", "content": "Say something."}]
    free = client_for(server).chat.completions.create(model="nanochat", messages=messages, max_tokens=60, seed=11)
    text = free.choices[0].message.content
    assert len(text) > 12
    stop = text[5:8]
    cut = text[:text.index(stop)]
    for stream in (False, True):
        r = client_for(server).chat.completions.create(model="nanochat", messages=messages, max_tokens=60, seed=11, stop=[stop, "\x00never"], stream=stream)
        if stream:
            chunks = list(r)
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            content, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
        assert content == cut and finish == ["stop"]


def test_ui_stream_endpoint(server, chat_base_dir):
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "1+1"}, {"type": "python_output", "text": "2"}]}, {"role": "user", "content": "thanks"}],
            "max_tokens": 20, "seed": 3, "temperature": 1.0, "top_k": 5}
    with httpx.stream("POST", server.url + "/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    assert events[-1]["done"] is True and events[-1]["finish_reason"] in ("stop", "length")
    assert all(e["kind"] in ("text", "python", "output") for e in events[:-1])


# -----------------------------------------------------------------------------
# Bad input: the documented 4xx in OpenAI's error shape, never a 500, and the server keeps serving

def post(server, body=None, content=None, headers=None, path="/v1/chat/completions"):
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=60)


def assert_openai_error(r, status):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str) and error["message"]
    return error


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body,status,needle", [
    ({"messages": "hello"}, 422, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "role"),
    ({"messages": [{"role": "user", "content": 42}]}, 422, "content"),
    ({"messages": []}, 422, "messages"),
    ({}, 422, "messages"),
    ({"messages": USER, "temperature": 2.5}, 422, "temperature"),
    ({"messages": USER, "temperature": "hot"}, 422, "temperature"),
    ({"messages": USER, "top_k": 0}, 422, "top_k"),
    ({"messages": USER, "top_k": 500}, 422, "top_k"),
    ({"messages": USER, "max_tokens": 0}, 422, "max_tokens"),
    ({"messages": USER, "max_tokens": 5000}, 422, "max_tokens"),
    ({"messages": USER, "stream": "yes"}, 422, "stream"),
    ({"messages": USER, "n": 2}, 400, "n=2"),
    ({"messages": USER, "max_tokens": 300}, 400, "256"),
    ({"messages": USER, "model": "gpt-4"}, 404, "gpt-4"),
    ({"messages": [{"role": "user", "content": ""}]}, 400, "empty"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, "last message"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, 400, "8000"),
    ({"messages": [{"role": "user", "content": "x" * 7000}, {"role": "assistant", "content": "y" * 7000}] * 2
                  + [{"role": "user", "content": "z" * 7000}]}, 400, "32000"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}] * 250 + USER}, 422, "500"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
])
def test_bad_requests_get_openai_errors(server, body, status, needle):
    error = assert_openai_error(post(server, body), status)
    assert needle in error["message"] or needle == error["param"], error


def test_invalid_json_is_400(server):
    error = assert_openai_error(post(server, content=b'{"messages": [', headers={"Content-Type": "application/json"}), 400)
    assert "JSON" in error["message"]
    assert_openai_error(post(server, content=b"{not json", headers={"Content-Type": "application/json"}, path="/chat/completions"), 400)


def test_oversize_body_is_413(server):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    error = assert_openai_error(post(server, content=big, headers={"Content-Type": "application/json"}), 413)
    assert str(1 << 20) in error["message"]

    def chunked():  # no Content-Length: the server counts
        for _ in range(40):
            yield b"x" * 65536
    assert_openai_error(httpx.post(server.url + "/v1/chat/completions", content=chunked(), timeout=60), 413)


def test_ui_endpoint_limits(server):
    assert_openai_error(post(server, {"messages": USER, "temperature": -1}, path="/chat/completions"), 422)
    assert_openai_error(post(server, {"messages": [{"role": "user", "content": [{"type": "python", "text": "1"}]}]}, path="/chat/completions"), 400)


def test_unknown_route_is_404_in_openai_shape(server):
    assert_openai_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(server.url + "/v1/chat/completions"), 405)


def test_server_keeps_serving_after_bad_requests(server):
    r = client_for(server).chat.completions.create(model="nanochat", messages=USER, max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(server.url + "/stats").json()["workers"]["free"] == 1


def test_api_key(chat_base_dir):
    from openai import AuthenticationError
    keyed = Server(chat_base_dir, "--api-key", "s3cret", "--model-tag", "d1")
    try:
        with pytest.raises(AuthenticationError):
            client_for(keyed, api_key="wrong").chat.completions.create(model="nanochat", messages=USER, max_tokens=3)
        assert_openai_error(httpx.get(keyed.url + "/v1/models"), 401)
        assert_openai_error(post(keyed, {"messages": USER}), 401)
        r = client_for(keyed, api_key="s3cret").chat.completions.create(model="nanochat", messages=USER, max_tokens=3)
        assert r.usage.completion_tokens >= 1
        assert httpx.get(keyed.url + "/health").status_code == 200  # health and the page stay open
    finally:
        keyed.stop()


# -----------------------------------------------------------------------------
# Load: 50 concurrent streams, some hanging up early

def test_fifty_concurrent_streams_some_disconnecting(server):
    results = [None] * 50

    def one(i):
        body = {"messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": 30, "seed": i, "stream": True}
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
                if r.status_code != 200:
                    results[i] = ("status", r.status_code)
                    return
                lines = []
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                    if i % 5 == 0 and len(lines) >= 3:  # hang up mid-stream
                        results[i] = ("left", len(lines))
                        return
                results[i] = ("done", lines[-1])
        except httpx.HTTPError as e:
            results[i] = ("error", repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(r is not None for r in results), results
    for i, r in enumerate(results):
        if i % 5 == 0:
            assert r[0] in ("left", "done"), r
        else:
            assert r == ("done", "data: [DONE]"), (i, r)
    deadline = time.time() + 30
    while time.time() < deadline:
        stats = httpx.get(server.url + "/stats").json()
        if stats["workers"]["free"] == 1 and stats["waiting"] == 0:
            break
        time.sleep(0.2)
    assert stats["workers"] == {"total": 1, "busy": 0, "free": 1}
    assert stats["requests_served"] >= 50 and stats["errors"] == 0


def test_full_queue_gets_429_and_timeout_gets_503(chat_base_dir):
    s = Server(chat_base_dir, "--model-tag", "chatty", "--max-queue", "1", "--queue-timeout", "1")
    try:
        long = {"messages": USER, "max_tokens": 4000, "stream": True}
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=long, timeout=60) as busy:
            lines = busy.iter_lines()  # kept referenced: a dropped iterator closes the connection
            next(lines)  # the only worker is now generating
            error = assert_openai_error(post(s, {"messages": USER, "max_tokens": 2}), 503)
            assert "1 s" in error["message"]
            waiting = threading.Thread(target=post, args=(s, {"messages": USER, "max_tokens": 2}))
            waiting.start()
            time.sleep(0.3)
            assert_openai_error(post(s, {"messages": USER, "max_tokens": 2}), 429)
            waiting.join()
        deadline = time.time() + 10  # the hung-up stream frees the worker within a token
        while httpx.get(s.url + "/stats").json()["workers"]["free"] != 1:
            assert time.time() < deadline
            time.sleep(0.1)
        assert client_for(s).chat.completions.create(model="nanochat", messages=USER, max_tokens=2).usage.completion_tokens == 2
    finally:
        s.stop()


def test_no_checkpoint_is_a_clear_error(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "scripts.chat_web", "--port", str(free_port()), "--device-type", "cpu"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "scripts.base_train" in p.stderr and "Traceback" not in p.stderr


def test_top_p_is_honoured(server):
    """top_p=0 keeps only the most likely token: the reply is the greedy one whatever the seed."""
    messages = [{"role": "user", "content": "Tell me a story."}]
    client = client_for(server)
    greedy = client.chat.completions.create(model="nanochat", messages=messages, max_tokens=12, temperature=0)
    for seed in (1, 2, 3):
        r = client.chat.completions.create(model="nanochat", messages=messages, max_tokens=12, temperature=1.0,
                                           top_p=0.0, seed=seed)
        assert r.choices[0].message.content == greedy.choices[0].message.content
