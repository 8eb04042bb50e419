"""Tests for scripts/chat_web.py with the tiny models of conftest.build_base_dir.

Most drive create_app's app in this process through FastAPI's TestClient (the official openai
client rides on it too): answers, usage, streaming, stop sequences, errors and limits, auth, the
room the context leaves. What needs a real server on 127.0.0.1 gets one: startup, the openai
client over HTTP, 50 concurrent streams some of which hang up, a full queue and a queue timeout.
"""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import REPO, TINY_CONTEXT, free_port
from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine
from scripts import chat_web

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def load(chat_base_dir):
    """load(tag) -> (model, tokenizer): a fresh copy of a chat_base_dir model in this process."""
    def load_tag(tag):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NANOCHAT_BASE_DIR", str(chat_base_dir))
            model, tokenizer, _ = load_model("sft", "cpu", "eval", model_tag=tag)
        return model, tokenizer
    return load_tag


def app_client(load, tag, *flags):
    """A TestClient of chat_web's app serving model `tag` with chat_web's flags, built as main() builds it."""
    model, tokenizer = load(tag)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("NANOCHAT_API_KEY", raising=False)  # the default of --api-key
        args = chat_web.parse_args(["--device-type", "cpu", *flags])
    return TestClient(chat_web.create_app([model], tokenizer, f"nanochat-sft-{tag}-step0", args))


@pytest.fixture(scope="module")
def client(load):
    with app_client(load, "d1") as c:
        yield c


@pytest.fixture(scope="module")
def local(load):
    """The same d1 model, to recompute what the server must have generated."""
    model, tokenizer = load("d1")
    return Engine(model, tokenizer), tokenizer


def expected_reply(local, messages, max_tokens, seed, temperature=0.6, top_k=50):
    """(prompt ids, generated ids including a final stop token if one was sampled) with the server's sampling."""
    engine, tokenizer = local
    prompt = tokenizer.render_for_completion({"messages": messages})
    generated = [column[0] for column, _ in engine.generate(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed)]
    return prompt, generated


def is_stop(local, token):
    return token in (local[1].encode_special("<|assistant_end|>"), local[1].get_bos_token_id())


def openai_client(base_url, api_key="none", http_client=None):
    """The official client, over HTTP or (http_client=a TestClient) straight into the app."""
    from openai import OpenAI
    return OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=60, http_client=http_client)


def in_process(client, api_key="none"):
    return openai_client(str(client.base_url), api_key, http_client=client)


def sse_events(text):
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def assert_openai_error(r, status):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str) and error["message"]
    return error


# -----------------------------------------------------------------------------
# A real server: startup and the official client over HTTP

@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--max-queue", "100", "--queue-timeout", "120")


def test_startup_prints_what_it_loaded(server):
    log = server.log()
    assert "Loaded sft model d1 step 0 from" in log and "model_000000.pt" in log
    assert "nanochat-sft-d1-step0" in log and "M params" in log and "context 256 tokens" in log
    assert f"open {server.url}/" in log


def test_official_client_over_http(server, local):
    client = openai_client(server.url)
    assert [m.id for m in client.models.list().data] == ["nanochat-sft-d1-step0"]
    messages = [{"role": "user", "content": "Tell me a story."}]
    r = client.chat.completions.create(model="nanochat-sft-d1-step0", messages=messages, max_tokens=40, seed=5)
    prompt, generated = expected_reply(local, messages, 40, 5)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(generated)
    chunks = list(client.chat.completions.create(model="nanochat", messages=messages, max_tokens=40, seed=5, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content


def test_no_checkpoint_is_a_clear_error(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "scripts.chat_web", "--port", str(free_port()), "--device-type", "cpu"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "scripts.base_train" in p.stderr and "Traceback" not in p.stderr


# -----------------------------------------------------------------------------
# The OpenAI-compatible API and the page's endpoint, in process

def test_models_health_stats(client):
    assert [m.id for m in in_process(client).models.list().data] == ["nanochat-sft-d1-step0"]
    assert client.get("/health").json() == {"status": "ok", "ready": True, "workers": 1, "model": "nanochat-sft-d1-step0",
                                            "defaults": {"temperature": 0.6, "top_k": 50, "max_tokens": 512}}
    stats = client.get("/stats").json()
    assert stats["workers"] == {"total": 1, "busy": 0, "free": 1}
    assert {"requests_served", "tokens_generated", "tokens_per_second"} <= set(stats)
    assert client.get("/").text.startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_non_streaming_answer_and_usage_match_the_tokenizer(client, local, seed):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
    r = in_process(client).chat.completions.create(model="nanochat-sft-d1-step0", messages=messages, max_tokens=150, seed=seed)
    prompt, generated = expected_reply(local, messages, 150, seed)
    tokenizer = local[1]
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "nanochat-sft-d1-step0"
    assert isinstance(r.created, int) and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(generated)
    assert r.usage.total_tokens == len(prompt) + len(generated)
    stopped = is_stop(local, generated[-1])
    assert choice.finish_reason == ("stop" if stopped else "length")
    assert choice.message.content == tokenizer.decode(generated[:-1] if stopped else generated)


@pytest.mark.slow
def test_compile_flag_serves_what_eager_decoding_generates(load, local):
    """--compile: the worker's Engine decodes through torch.compile, and two requests at once get
    the replies each gets from an eager Engine alone."""
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    with app_client(load, "d1", "--compile", "--max-batch", "2") as c:
        assert c.get("/stats").json()["per_worker"][0]["decode"] == "compiled"
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda seed: in_process(c).chat.completions.create(
                model="nanochat", messages=messages, max_tokens=24, seed=seed), (1, 2)))
        assert c.get("/stats").json()["per_worker"][0]["decode"] == "compiled"  # not fallen back to eager
    for seed, r in zip((1, 2), replies):
        _, generated = expected_reply(local, messages, 24, seed)
        assert r.usage.completion_tokens == len(generated)
        text = local[1].decode(generated[:-1] if is_stop(local, generated[-1]) else generated)
        assert r.choices[0].message.content == text


def test_finish_reason_length_iff_max_tokens_hit(client, local):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Count "}, {"type": "text", "text": "to ten."}]}]
    seen = set()
    for seed in range(6):
        r = in_process(client).chat.completions.create(model="nanochat", messages=messages, max_completion_tokens=8, seed=seed)
        _, generated = expected_reply(local, [{"role": "user", "content": "Count to ten."}], 8, seed)
        assert r.choices[0].finish_reason == ("stop" if is_stop(local, generated[-1]) else "length")
        assert r.usage.completion_tokens == len(generated) <= 8
        seen.add(r.choices[0].finish_reason)
    assert "length" in seen


def test_streaming_chunks(client, local):
    messages = [{"role": "user", "content": "Tell me a story."}]
    stream = in_process(client).chat.completions.create(model="nanochat", messages=messages, max_tokens=40, seed=7,
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


def test_tokens_that_arrive_together_go_out_in_one_chunk(client, local, monkeypatch):
    """When the event loop falls behind the worker (here: every 4 steps' tokens are handed over
    at once), each stream sends what is ready as one chunk: fewer chunks, the same text and usage."""
    held = []

    def deliver_every_4_steps(out):
        held.append(out)
        if len(held) == 4 or any(item is chat_web.Generation.END for _, item in out):
            real_deliver([item for step in held for item in step])
            held.clear()
    real_deliver = chat_web.deliver
    monkeypatch.setattr(chat_web, "deliver", deliver_every_4_steps)
    messages = [{"role": "user", "content": "Tell me a story."}]
    stream = in_process(client).chat.completions.create(model="nanochat", messages=messages, max_tokens=24, seed=7,
                                                        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    prompt, generated = expected_reply(local, messages, 24, 7)
    texts = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    stopped = is_stop(local, generated[-1])
    assert "".join(texts) == local[1].decode(generated[:-1] if stopped else generated)
    assert chunks[-1].usage.completion_tokens == len(generated)
    assert len(texts) <= -(-len(generated) // 4)  # one chunk per hand-over, not one per token


def stream_runs(interval, token_times, end_time):
    """token_runs(interval) of a Generation whose tokens 0, 1, ... arrive at token_times and whose
    end arrives at end_time (seconds from the start, on the event loop, no model). Returns
    ([(seconds, run)], seconds until the stream ended)."""
    async def scenario():
        loop = asyncio.get_running_loop()
        pool = SimpleNamespace(ttft=[], stats={"errors": 0}, release=lambda worker, client: None)
        worker = SimpleNamespace(submit=lambda generation: None, requests_served=0)
        generation = chat_web.Generation(pool, worker, "127.0.0.1", [0], len(token_times), {})
        t0 = time.perf_counter()
        for token, t in enumerate(token_times):
            loop.call_later(t, generation.receive, token)
        loop.call_later(end_time, generation.receive, chat_web.Generation.END)
        runs = [(time.perf_counter() - t0, run) async for run in generation.token_runs(interval)]
        return runs, time.perf_counter() - t0
    return asyncio.run(scenario())


def test_stream_interval_sends_one_chunk_per_interval_and_the_end_at_once():
    """--stream-interval: the first token goes out alone, later runs are at least an interval apart
    and carry every token that arrived meanwhile, and the end does not wait the interval out."""
    runs, seconds = stream_runs(0.1, [0.02 * i for i in range(25)], 0.5)  # 50 tokens/s for 0.5 s
    assert [t for _, run in runs for t in run] == list(range(25))
    assert runs[0][1] == [0]
    gaps = [b - a for (a, _), (b, _) in zip(runs, runs[1:-1])]  # the last run goes when the end arrives
    assert min(gaps) >= 0.1 - 1e-3 and 3 <= len(runs) <= 7, (gaps, runs)

    runs, seconds = stream_runs(1.0, [0.0] + [0.05 + 0.01 * i for i in range(9)], 0.15)
    assert [run for _, run in runs] == [[0], list(range(1, 10))]
    assert seconds < 0.9  # ended with the reply (0.15 s), not after the 1 s interval


def test_stream_interval_out_of_range_is_a_clear_error():
    with pytest.raises(SystemExit) as e:
        chat_web.parse_args(["--stream-interval", "5"])
    assert "--stream-interval must be in 0..1 seconds, got 5.0" in str(e.value.code)


def test_a_model_error_ends_the_request_with_500_and_the_replica_serves_on(load):
    """The model raises mid-reply (as a CUDA error would): the stream ends with an error in
    OpenAI's shape and [DONE]; a non-streaming request gets a 500; the slot comes back and the
    next request is answered."""
    model, tokenizer = load("tiny")  # never samples a stop token
    real_forward, calls = model.forward, []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) in (6, 8):  # a prefill and 4 decode steps go through, then the 6th call fails; later the 8th
            raise RuntimeError("simulated device error")
        return real_forward(*args, **kwargs)
    model.forward = forward
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("NANOCHAT_API_KEY", raising=False)
        args = chat_web.parse_args(["--device-type", "cpu", "--max-batch", "2"])
    with TestClient(chat_web.create_app([model], tokenizer, "nanochat-sft-tiny-step0", args)) as c:
        r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 20, "stream": True})
        events = sse_events(r.text)
        assert events[0]["choices"][0]["delta"]["role"] == "assistant" and r.text.rstrip().endswith("data: [DONE]")
        assert events[-1]["error"]["code"] == "generation_failed" and "simulated device error" in events[-1]["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 20})  # prefill = call 7, the 8th fails
        assert assert_openai_error(r, 500)["code"] == "generation_failed"
        r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        stats = c.get("/stats").json()
        assert stats["errors"] == 2 and stats["slots"]["active"] == 0 and stats["workers"]["free"] == 1


def test_stream_ends_with_done(client):
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 5, "stream": True})
    lines = [line for line in r.text.splitlines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert "usage" not in json.loads(lines[0][6:])  # only with stream_options.include_usage


def test_stop_sequences_end_the_completion(client):
    messages = [{"role": "user", "content": "Say something."}]
    openai = in_process(client)
    text = openai.chat.completions.create(model="nanochat", messages=messages, max_tokens=60, seed=11).choices[0].message.content
    assert len(text) > 12
    stop = text[5:8]
    cut = text[:text.index(stop)]
    for stream in (False, True):
        r = openai.chat.completions.create(model="nanochat", messages=messages, max_tokens=60, seed=11, stop=[stop, "\x00never"], stream=stream)
        if stream:
            chunks = list(r)
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            content, finish = r.choices[0].message.content, [r.choices[0].finish_reason]
        assert content == cut and finish == ["stop"]


def test_top_p_is_honoured(client):
    """top_p=0 keeps only the most likely token: the reply is the greedy one whatever the seed."""
    messages = [{"role": "user", "content": "Tell me a story."}]
    openai = in_process(client)
    greedy = openai.chat.completions.create(model="nanochat", messages=messages, max_tokens=12, temperature=0)
    for seed in (1, 2, 3):
        r = openai.chat.completions.create(model="nanochat", messages=messages, max_tokens=12, temperature=1.0, top_p=0.0, seed=seed)
        assert r.choices[0].message.content == greedy.choices[0].message.content


def test_ui_stream_endpoint(client):
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "1+1"}, {"type": "python_output", "text": "2"}]}, {"role": "user", "content": "thanks"}],
            "max_tokens": 20, "seed": 3, "temperature": 1.0, "top_k": 5}
    r = client.post("/chat/completions", json=body)
    events = sse_events(r.text)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert events[-1]["done"] is True and events[-1]["finish_reason"] in ("stop", "length")
    assert all(e["kind"] in ("text", "python", "output") for e in events[:-1])


# -----------------------------------------------------------------------------
# The room the context leaves: a request without max_tokens gets it (up to --max-tokens), one
# with a max_tokens that cannot fit gets OpenAI's 400

@pytest.fixture(scope="module")
def tiny(load):
    """The tiny run's context (512 tokens) with the server's default --max-tokens (512); its replies never stop early."""
    with app_client(load, "tiny") as c:
        yield c


def test_page_endpoint_without_max_tokens_fills_the_context(tiny):
    body = {"messages": [{"role": "user", "content": "Why is the sky blue?"}]}
    done = sse_events(tiny.post("/chat/completions", json=body).text)[-1]
    assert done["done"] is True and done["finish_reason"] == "length"
    assert done["prompt_tokens"] + done["completion_tokens"] == TINY_CONTEXT


def test_api_without_max_tokens_fills_the_context(tiny):
    r = in_process(tiny).chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Why is the sky blue?"}])
    assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == TINY_CONTEXT


def test_max_tokens_flag_caps_the_room(load):
    with app_client(load, "tiny", "--max-tokens", "20") as c:
        r = in_process(c).chat.completions.create(model="nanochat", messages=USER)
    assert r.usage.completion_tokens == 20


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_explicit_max_tokens_past_the_context_is_400(tiny, path):
    r = tiny.post(path, json={"messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 512})
    error = assert_openai_error(r, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert f"> the model's context of {TINY_CONTEXT} tokens" in error["message"] and "leave it out" in error["message"]


def test_a_full_context_is_400(tiny):
    messages = [{"role": "user", "content": "The cat sat on the mat. " * 200}]
    for body in ({"messages": messages}, {"messages": messages, "max_tokens": 1}):
        error = assert_openai_error(tiny.post("/v1/chat/completions", json=body), 400)
        assert error["code"] == "context_length_exceeded" and "shorten the conversation" in error["message"]


# -----------------------------------------------------------------------------
# Bad input: the documented 4xx in OpenAI's error shape, never a 500, and the app keeps serving

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
def test_bad_requests_get_openai_errors(client, body, status, needle):
    error = assert_openai_error(client.post("/v1/chat/completions", json=body), status)
    assert needle in error["message"] or needle == error["param"], error


def test_invalid_json_is_400(client):
    headers = {"Content-Type": "application/json"}
    error = assert_openai_error(client.post("/v1/chat/completions", content=b'{"messages": [', headers=headers), 400)
    assert "JSON" in error["message"]
    assert_openai_error(client.post("/chat/completions", content=b"{not json", headers=headers), 400)


def test_oversize_body_is_413(client):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    error = assert_openai_error(client.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"}), 413)
    assert str(1 << 20) in error["message"]

    def chunked():  # no Content-Length: the app counts
        for _ in range(40):
            yield b"x" * 65536
    assert_openai_error(client.post("/v1/chat/completions", content=chunked()), 413)


def test_ui_endpoint_limits(client):
    assert_openai_error(client.post("/chat/completions", json={"messages": USER, "temperature": -1}), 422)
    assert_openai_error(client.post("/chat/completions", json={"messages": [{"role": "user", "content": [{"type": "python", "text": "1"}]}]}), 400)


def test_unknown_route_is_404_in_openai_shape(client):
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)


def test_app_keeps_serving_after_bad_requests(client):
    r = in_process(client).chat.completions.create(model="nanochat", messages=USER, max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")
    stats = client.get("/stats").json()
    assert stats["workers"]["free"] == 1 and stats["errors"] == 0


@pytest.mark.parametrize("device", ["cuda:1", "cpu"])
def test_generation_thread_makes_its_replica_s_gpu_current(load, monkeypatch, device):
    """A replica on GPU 1 samples in a thread whose current CUDA device is GPU 1, so what names no
    device goes there rather than to GPU 0; a CPU replica leaves CUDA alone."""
    model, tokenizer = load("d1")
    worker = chat_web.Worker(0, model, tokenizer, torch.float32, max_batch=2)
    worker.device = torch.device(device)  # cuda:1 as on a 2-GPU machine; the weights stay on the CPU
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append((d, threading.current_thread())))
    pool = chat_web.WorkerPool([worker], max_queue=1, queue_timeout=1)

    async def generate():
        prompt = tokenizer.render_for_completion({"messages": USER})
        generation = chat_web.Generation(pool, await pool.acquire("test"), "test", prompt, 3, {"temperature": 0.0})
        return [t async for run in generation.token_runs() for t in run]

    assert asyncio.run(generate())
    assert calls == ([(torch.device("cuda:1"), worker.thread)] if device == "cuda:1" else [])


def test_api_key(load):
    from openai import AuthenticationError
    with app_client(load, "d1", "--api-key", "s3cret") as keyed:
        with pytest.raises(AuthenticationError):
            in_process(keyed, api_key="wrong").chat.completions.create(model="nanochat", messages=USER, max_tokens=3)
        assert_openai_error(keyed.get("/v1/models"), 401)
        assert_openai_error(keyed.post("/v1/chat/completions", json={"messages": USER}), 401)
        r = in_process(keyed, api_key="s3cret").chat.completions.create(model="nanochat", messages=USER, max_tokens=3)
        assert r.usage.completion_tokens >= 1
        assert keyed.get("/health").status_code == 200 and keyed.get("/").status_code == 200  # health and the page stay open


# -----------------------------------------------------------------------------
# Load, on a real server: 50 concurrent streams, some hanging up early; a full queue; a timeout

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
    assert stats["slots"]["active"] == 0 and stats["active_sequences"] == 0  # every hung-up stream freed its slot
    assert stats["requests_served"] >= 50 and stats["errors"] == 0
    assert stats["ttft_seconds"]["requests"] >= 40 and 0 < stats["ttft_seconds"]["p50"] <= stats["ttft_seconds"]["p95"]


def test_a_request_gets_the_same_reply_alone_and_inside_a_full_batch(server, local):
    """Continuous batching decodes it next to 15 others that join and leave (other prompts,
    lengths, temperatures and seeds); with its seed it still gets the reply it gets alone,
    which is the one the Engine generates for it in this process."""
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    body = {"messages": messages, "max_tokens": 40, "seed": 7, "temperature": 0.9}
    alone = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]["content"]
    replies = {}

    def one(i):
        other = {"messages": [{"role": "user", "content": "x " * (i + 1)}], "max_tokens": 5 + 3 * i, "seed": i, "temperature": 0.1 * i}
        r = httpx.post(server.url + "/v1/chat/completions", json=body if i == 8 else other, timeout=120)
        replies[i] = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.status_code

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join(timeout=300)
    assert all(isinstance(r, str) for r in replies.values()), replies
    assert replies[8] == alone
    prompt, generated = expected_reply(local, messages, 40, 7, temperature=0.9)
    assert replies[8] == local[1].decode([t for t in generated if not is_stop(local, t)])
    assert httpx.get(server.url + "/stats").json()["slots"]["total"] == 16


def test_full_queue_gets_429_and_timeout_gets_503(start_server):
    s = start_server("--model-tag", "chatty", "--max-batch", "1", "--max-queue", "1", "--queue-timeout", "1")

    def post(body):
        return httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)

    long = {"messages": USER, "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=long, timeout=60) as busy:
        lines = busy.iter_lines()  # kept referenced: a dropped iterator closes the connection
        next(lines)  # the only worker is now generating
        error = assert_openai_error(post({"messages": USER, "max_tokens": 2}), 503)
        assert "1 s" in error["message"]
        waiting = threading.Thread(target=post, args=({"messages": USER, "max_tokens": 2},))
        waiting.start()
        time.sleep(0.3)
        assert_openai_error(post({"messages": USER, "max_tokens": 2}), 429)
        waiting.join()
    deadline = time.time() + 10  # the hung-up stream frees the worker within a token
    while httpx.get(s.url + "/stats").json()["workers"]["free"] != 1:
        assert time.time() < deadline
        time.sleep(0.1)
    assert openai_client(s.url).chat.completions.create(model="nanochat", messages=USER, max_tokens=2).usage.completion_tokens == 2
    s.stop()


def test_one_client_cannot_take_every_slot(start_server):
    """Two slots; by default one client address may decode in one of them. Its second request
    waits although a slot is free, its third may not wait too (half the line of 2), and another
    address (127.0.0.2, loopback too) passes them."""
    s = start_server("--model-tag", "chatty", "--max-batch", "2", "--queue-timeout", "60", "--max-queue", "2")
    stats = lambda: httpx.get(s.url + "/stats").json()  # noqa: E731
    assert stats()["max_slots_per_client"] == 1
    replies = {}

    def post(name, client):
        replies[name] = client.post(s.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=60)

    other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    long = {"messages": USER, "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=long, timeout=60) as busy:
        lines = busy.iter_lines()  # kept referenced: a dropped iterator closes the connection
        next(lines)  # 127.0.0.1 decodes in one slot
        second = threading.Thread(target=post, args=("second", httpx.Client()))
        second.start()
        deadline = time.time() + 10
        while stats()["waiting"] != 1:
            assert time.time() < deadline
            time.sleep(0.05)
        now = stats()
        assert now["slots"] == {"total": 2, "active": 1} and now["clients"] == 1  # one slot free, yet it waits
        error = assert_openai_error(httpx.post(s.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}), 429)
        assert "(127.0.0.1) has 1 request(s) waiting already, half the line" in error["message"]  # nor half the line
        post("other", other)  # another client takes the free slot at once
        assert replies["other"].status_code == 200 and second.is_alive() and stats()["waiting"] == 1
    second.join(timeout=60)  # the hung-up stream frees 127.0.0.1's slot: its waiting request runs
    assert replies["second"].status_code == 200 and replies["second"].json()["usage"]["completion_tokens"] == 2
    now = stats()
    assert now["slots"]["active"] == 0 and now["waiting"] == 0 and now["clients"] == 0
    s.stop()


def test_default_slots_per_client_keep_a_quarter_for_others():
    assert [chat_web.default_max_slots_per_client(n) for n in (1, 2, 3, 4, 16, 64)] == [1, 1, 2, 3, 12, 48]
