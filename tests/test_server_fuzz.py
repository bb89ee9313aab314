"""1,000 malformed or hostile requests: each answered with an OpenAI-shaped 4xx in under a
second, and the server still serving afterwards. The engine computes nothing (no request here
should reach it; the last, valid one proves the server is still whole)."""

import json
import random
import time

import httpx
import pytest

from server_helpers import scripted_engine, serve_engine

N_REQUESTS = 1000
MB = 1 << 20


def hostile_requests(rng: random.Random):
    """(method, path, body bytes) triples, every one of them wrong in some way."""
    user = [{"role": "user", "content": "hi"}]
    wrong_values = [
        "x", "", 1, -1, 0.5, 1e308, -1e308, 10**30, -(10**30), True, None, [], [1, "a"], {}, {"a": {"b": 1}},
        "\u0000\x01", "9" * 1000,
    ]
    fields = {
        "messages": lambda v: not isinstance(v, list) or v == [] or v == [1, "a"],
        "model": lambda v: v is not None,
        "max_tokens": lambda v: v is not None and not (type(v) is int and v >= 1),
        "max_completion_tokens": lambda v: v is not None and not (type(v) is int and v >= 1),
        "temperature": lambda v: v is not None and not (type(v) in (int, float) and 0 <= v <= 100),
        "top_p": lambda v: v is not None and not (type(v) in (int, float) and 0 < v <= 1),
        "top_k": lambda v: v is not None and not (type(v) is int and v >= 0),
        "n": lambda v: v is not None and v != 1,
        "seed": lambda v: v is not None and not (type(v) is int and -(2**63) <= v < 2**64),
        "stream": lambda v: v is not None and type(v) is not bool,
        "stop": lambda v: v is not None and v != [] and not (isinstance(v, str) and v),
        "tools": lambda v: v is not None and v != [],
        "tool_choice": lambda v: v is not None,
        "reasoning_effort": lambda v: v is not None,
        "thinking_budget": lambda v: v is not None and not (type(v) is int and v >= 0),
        "chat_template_kwargs": lambda v: v is not None and not isinstance(v, dict),
        "repeat_penalty": lambda v: v is not None and not (type(v) in (int, float) and 0 < v <= 100),
    }
    makers = []

    def wrong_field():
        name = rng.choice(list(fields))
        value = rng.choice([v for v in wrong_values if fields[name](v)])
        body = {"messages": user, name: value}
        return "POST", "/v1/chat/completions", json.dumps(body).encode()

    def bad_message():
        message = rng.choice([
            {"role": rng.choice(["wizard", "", "USER", "function", 7, None]), "content": "x"},
            {"role": "user", "content": rng.choice([5, {"text": "x"}, [{"type": "image_url"}], [7], [{"type": "text"}]])},
            {"role": "assistant", "content": "x", "tool_calls": rng.choice(["x", [1], [{"function": {}}]])},
            {"role": "assistant", "content": "x", "reasoning_content": 5},
            "just a string", 42, [],
        ])
        return "POST", "/v1/chat/completions", json.dumps({"messages": [message]}).encode()

    def deep_json():
        depth = rng.choice([1000, 10_000, 100_000])
        inner = "[" * depth + "]" * depth
        return "POST", "/v1/chat/completions", ('{"messages": ' + inner + "}").encode()

    def invalid_utf8():
        raw = json.dumps({"messages": [{"role": "user", "content": "AAAA"}]}).encode()
        at = raw.index(b"AAAA")
        return "POST", "/v1/chat/completions", raw[:at] + bytes([rng.choice([0xFF, 0xC3, 0xED, 0x80])]) + raw[at + 1 :]

    def malformed():
        return "POST", rng.choice(["/v1/chat/completions", "/v1/completions"]), rng.choice([
            b"", b"{", b"null", b"[]", b'"text"', b"12", b'{"messages": NaN}', b'{"a": Infinity}',
            b"{'single': 'quotes'}", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))),
            b'{"messages": [{"role": "user", "content": "hi"}]' + b"}" * rng.randrange(2, 5),
        ])

    def huge_body():
        size = rng.choice([4 * MB + 1, 10 * MB])
        return "POST", "/v1/chat/completions", b'{"messages": "' + b"x" * size + b'"}'

    def many_stops():
        return "POST", "/v1/chat/completions", json.dumps({"messages": user, "stop": ["s"] * 10_000}).encode()

    def negative_tokens():
        return "POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": rng.randrange(-10**6, 1)}).encode()

    def bad_completion():
        return "POST", "/v1/completions", json.dumps(rng.choice([
            {"prompt": 5}, {"prompt": ""}, {"prompt": ["a", "b"]}, {}, {"prompt": "x", "echo": True},
            {"prompt": "x", "logprobs": 5}, {"prompt": "x", "n": 4},
        ])).encode()

    def wrong_route():
        return rng.choice([("GET", "/v1/chat/completions", b""), ("PUT", "/v1/models", b"{}"),
                           ("POST", "/v1/embeddings", b"{}"), ("GET", "/" + "a" * 5000, b""),
                           ("DELETE", "/health", b"")])

    makers = [wrong_field] * 6 + [bad_message] * 3 + [deep_json, invalid_utf8, malformed, malformed,
                                                       many_stops, negative_tokens, bad_completion, wrong_route]
    for i in range(N_REQUESTS):
        yield huge_body() if i % 100 == 99 else rng.choice(makers)()


@pytest.fixture(scope="module")
def url():
    engine = scripted_engine()
    engine.compute = False
    with serve_engine(engine) as url:
        yield url


def test_a_thousand_hostile_requests_are_4xx_fast_and_the_server_survives(url):
    slowest, statuses = 0.0, {}
    t_start = time.perf_counter()
    with httpx.Client(base_url=url, timeout=10) as http:
        for method, path, body in hostile_requests(random.Random(20251201)):
            t0 = time.perf_counter()
            r = http.request(method, path, content=body, headers={"content-type": "application/json"})
            took = time.perf_counter() - t0
            assert 400 <= r.status_code < 500, (r.status_code, body[:200], r.text[:300])
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert took < 1.0, (took, body[:200])
            slowest = max(slowest, took)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert sum(statuses.values()) == N_REQUESTS and {400, 404, 405, 413} <= set(statuses)
        assert time.perf_counter() - t_start < 90  # ~10 s on an idle machine, ~50 s on 2 busy shared cores
        ok = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "stop"
        assert http.get("/health").json()["status"] == "ok"
