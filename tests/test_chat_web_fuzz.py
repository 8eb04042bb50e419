"""Property-based fuzzing of scripts/chat_web.py through its own OpenAPI schema (schemathesis):
every operation, bodies that fit the schema and bodies that break it, then wrong content types,
huge, malformed and unusual-unicode bodies by hand. Every response must be 2xx or 4xx, every
error in OpenAI's shape, the server must stay up and every slot must be free afterwards.
"""

import collections
import json
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

EXAMPLES = 150  # per operation and mode; a POST example decodes up to --max-tokens 8 tokens of a d1


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--model-tag", "d1", "--max-tokens", "8", "--max-batch", "4", "--max-queue", "64")


def check_response(status_counts, where, response):
    """2xx or 4xx; a 4xx carries OpenAI's error object (the page's / is HTML, the rest JSON)."""
    status_counts[(where, response.status_code)] += 1
    assert response.status_code < 500, (where, response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text[:500]


def assert_all_slots_free(url):
    deadline = time.time() + 30  # streams the fuzzer dropped leave the batch within a token
    while True:
        stats = httpx.get(url + "/stats").json()
        if stats["slots"]["active"] == 0 and stats["waiting"] == 0:
            return stats
        assert time.time() < deadline, stats
        time.sleep(0.2)


@pytest.mark.slow
def test_every_operation_answers_any_input_without_a_5xx(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {("POST", "/v1/chat/completions"), ("POST", "/chat/completions"),
                                                                     ("GET", "/v1/models"), ("GET", "/stats"), ("GET", "/health")}
    status_counts = collections.Counter()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def call(case):
                check_response(status_counts, f"{operation.method.upper()} {operation.path} {mode.value}",
                               case.call(base_url=server.url, timeout=120))
            try:
                call()
            except Unsatisfiable:  # nothing in the operation can be made invalid (GET without parameters)
                assert mode == GenerationMode.NEGATIVE and not operation.body and not operation.query
    print("schemathesis:", sum(status_counts.values()), "requests:", dict(sorted(status_counts.items())))
    assert sum(v for (where, status), v in status_counts.items() if where.startswith("POST") and status == 200) > 0
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert assert_all_slots_free(server.url)["errors"] == 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_wrong_content_types_huge_and_odd_bodies_get_a_4xx(server, path):
    url = server.url + path
    messages = [{"role": "user", "content": "hi"}]
    attempts = {
        "text/plain": dict(content=b"hello", headers={"content-type": "text/plain"}),
        "form": dict(data={"messages": "hi"}),
        "multipart": dict(files={"file": ("a.txt", b"hello")}),
        "no content type": dict(content=json.dumps({"messages": messages}).encode(), headers={"content-type": ""}),
        "empty": dict(content=b"", headers={"content-type": "application/json"}),
        "not json": dict(content=b"{\"messages\": [", headers={"content-type": "application/json"}),
        "not utf-8": dict(content=b"\xff\xfe{\"messages\": 1}", headers={"content-type": "application/json"}),
        "a json list": dict(json=[1, 2, 3]),
        "deep nesting": dict(content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"}),
        "2 MB": dict(json={"messages": [{"role": "user", "content": "x" * 2_000_000}]}),
        "lone surrogate": dict(content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                               headers={"content-type": "application/json"}),
        "NUL, RTL, emoji, combining": dict(json={"messages": [{"role": "user", "content": "\x00\u202e\U0001f600e\u0301" * 100}],
                                                 "max_tokens": 2}),
        "huge numbers": dict(json={"messages": messages, "max_tokens": 10**30, "temperature": 1e308, "top_p": -0.0}),
        "NaN": dict(content=b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                    headers={"content-type": "application/json"}),
    }
    status_counts = collections.Counter()
    for name, kwargs in attempts.items():
        response = httpx.post(url, timeout=60, **kwargs)
        check_response(status_counts, name, response)
        if name not in ("no content type", "lone surrogate", "NUL, RTL, emoji, combining"):  # those may be fine
            assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert_all_slots_free(server.url)
