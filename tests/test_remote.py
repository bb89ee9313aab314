"""backends/remote against fake servers on 127.0.0.1 that speak each peer's dialect (tests.fake_servers.py)."""

from __future__ import annotations

import threading
import time

import pytest

from app.session import split_thinking
from backends.remote import (
    NotOpenAICompatible,
    RemoteAuthError,
    RemoteEngine,
    RemoteError,
    RemoteModelNotFound,
    RemoteRateLimited,
    RemoteServerError,
    RemoteStreamCut,
    RemoteTimeout,
    RemoteTLSError,
    RemoteUnreachable,
)
from backends.remote.client import RemoteClient
from backends.remote.errors import server_message
from backends.sampling import GREEDY, SamplingParams
from tests.fake_servers import FakePeer, Script, ServerThread, free_port, html_site

KINDS = ["vllm", "sglang", "llama-server", "mlx-lm", "ollama", "openai", "smollm3"]
HELLO = [{"role": "user", "content": "Hi"}]
REASONING = ["Let me", " think", "."]
ANSWER = ["Hello", ",", " world", "!"]


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    servers: list[ServerThread] = []

    def start(app) -> str:
        servers.append(ServerThread(app).start())
        return servers[-1].url

    yield start
    for server in servers:
        server.stop()


def connect(serve, kind: str, script: Script | None = None, model: str = "HuggingFaceTB/SmolLM3-3B", **kwargs):
    peer = FakePeer(kind, model=model, script=script, api_key=kwargs.pop("server_key", None))
    return peer, RemoteEngine(serve(peer.app()) + "/v1", **kwargs)


def answer(engine: RemoteEngine, **kwargs) -> str:
    kwargs.setdefault("max_tokens", 64)
    return "".join(engine.chat(HELLO, **kwargs))


# --- probing ---


@pytest.mark.parametrize("kind", KINDS)
def test_probe_detects_the_dialect_and_takes_the_first_model(serve, kind):
    _, engine = connect(serve, kind, model="org/some-model")
    assert engine.dialect.name == kind
    assert engine.model == "org/some-model"
    info = engine.info
    assert (info.backend, info.checkpoint) == ("remote", "org/some-model")
    assert info.device.startswith("127.0.0.1:")
    assert info.extra == {"endpoint": engine.endpoint, "dialect": kind}


def test_dialect_override_and_served_model_win_over_the_probe(serve):
    peer, engine = connect(serve, "vllm", served_model="other", dialect="openai")
    assert (engine.dialect.name, engine.model) == ("openai", "other")


def test_endpoint_without_v1_and_with_trailing_slash(serve):
    peer = FakePeer("ollama")
    url = serve(peer.app())
    for endpoint in (url, url + "/", url + "/v1/"):
        engine = RemoteEngine(endpoint)
        assert engine.endpoint == url + "/v1" and engine.dialect.name == "ollama"


def test_bad_endpoint_and_dialect_are_one_line_errors():
    with pytest.raises(RemoteError, match="--endpoint must be an http:// or https:// URL, got 'gpu-box:8000'"):
        RemoteEngine("gpu-box:8000")
    with pytest.raises(RemoteError, match="unknown dialect 'tgi'"):
        RemoteEngine("http://127.0.0.1:1/v1", dialect="tgi")


# --- reasoning ---


@pytest.mark.parametrize("kind", KINDS)
def test_reasoning_from_each_servers_field_comes_as_a_think_block(serve, kind):
    peer, engine = connect(serve, kind, Script(reasoning=REASONING, content=ANSWER))
    text = answer(engine, thinking=True)
    assert text == "<think>Let me think.</think>Hello, world!"
    assert split_thinking(text) == ("Let me think.", "Hello, world!")
    assert engine.stats.stop_reason == "eos"


def test_vllm_0_11_reasoning_field(serve):
    peer, engine = connect(serve, "vllm", Script(reasoning=REASONING, content=ANSWER, reasoning_field="reasoning"))
    assert answer(engine) == "<think>Let me think.</think>Hello, world!"


def test_pieces_stream_as_they_arrive(serve):
    peer, engine = connect(serve, "vllm", Script(reasoning=["a", "b"], content=["c", "d"]))
    assert list(engine.chat(HELLO, max_tokens=8)) == ["<think>a", "b", "</think>c", "d"]


# --- what each dialect is sent ---


@pytest.mark.parametrize("kind", ["vllm", "sglang", "llama-server", "mlx-lm", "smollm3"])
@pytest.mark.parametrize("thinking", [True, False])
def test_thinking_switch_in_chat_template_kwargs_and_smollm3_flag(serve, kind, thinking):
    peer, engine = connect(serve, kind)
    answer(engine, thinking=thinking)
    body = peer.requests[-1]
    assert body["chat_template_kwargs"] == {"enable_thinking": thinking}
    flag = "/think" if thinking else "/no_think"
    assert body["messages"] == [{"role": "system", "content": flag}, *HELLO]
    assert engine.supports_thinking


@pytest.mark.parametrize("thinking", [True, False])
def test_ollama_thinking_switch_is_think(serve, thinking):
    peer, engine = connect(serve, "ollama", model="smollm3:3b")
    answer(engine, thinking=thinking)
    body = peer.requests[-1]
    assert body["think"] is thinking and "chat_template_kwargs" not in body
    assert body["messages"][0] == {"role": "system", "content": "/think" if thinking else "/no_think"}


def test_ollama_model_without_thinking_gets_no_think_field(serve):
    # Ollama answers 400 '"m" does not support thinking' to `think: true` for such a model.
    peer = FakePeer("ollama", model="smollm3:3b", thinks=False)
    engine = RemoteEngine(serve(peer.app()))
    answer(engine, thinking=True)
    assert "think" not in peer.requests[-1] and peer.requests[-1]["messages"][0]["content"] == "/think"
    assert engine.supports_thinking  # through SmolLM3's system flag
    peer = FakePeer("ollama", model="llama3.2", thinks=False)
    engine = RemoteEngine(serve(peer.app()))
    assert answer(engine, thinking=True) == "Hello, world!" and not engine.supports_thinking


def test_plain_openai_gets_only_the_system_flag_and_only_for_smollm3(serve):
    peer, engine = connect(serve, "openai")
    answer(engine, thinking=False, sampling=SamplingParams(top_k=20, repeat_penalty=1.3))
    body = peer.requests[-1]
    assert "chat_template_kwargs" not in body and "top_k" not in body and "repetition_penalty" not in body
    assert body["messages"][0] == {"role": "system", "content": "/no_think"}
    peer, engine = connect(serve, "openai", model="gpt-4o-mini")
    answer(engine, thinking=False)
    assert peer.requests[-1]["messages"] == HELLO
    assert not engine.supports_thinking


def test_thinking_none_sends_no_switch(serve):
    peer, engine = connect(serve, "vllm")
    answer(engine)
    assert "chat_template_kwargs" not in peer.requests[-1] and peer.requests[-1]["messages"] == HELLO


def test_system_flag_replaces_one_in_the_users_system_prompt(serve):
    peer, engine = connect(serve, "vllm")
    list(engine.chat([{"role": "system", "content": "Be brief. /think"}, *HELLO], max_tokens=8, thinking=False))
    assert peer.requests[-1]["messages"][0] == {"role": "system", "content": "Be brief. /no_think"}


SAMPLING = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, repeat_penalty=1.2, repeat_last_n=32, seed=7)
COMMON = {"model": "HuggingFaceTB/SmolLM3-3B", "stream": True, "stream_options": {"include_usage": True},
          "max_tokens": 50, "temperature": 0.7, "top_p": 0.9, "seed": 7, "top_k": 20}


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("vllm", {"repetition_penalty": 1.2}),
        ("sglang", {"repetition_penalty": 1.2}),
        ("llama-server", {"repeat_penalty": 1.2, "repeat_last_n": 32}),
        ("mlx-lm", {"repetition_penalty": 1.2, "repetition_context_size": 32}),
        ("smollm3", {"repeat_penalty": 1.2, "repeat_last_n": 32}),
    ],
)
def test_sampling_fields_per_dialect(serve, kind, extra):
    peer, engine = connect(serve, kind)
    list(engine.chat(HELLO, max_tokens=50, sampling=SAMPLING))
    body = peer.requests[-1]
    del body["messages"]
    assert body == {**COMMON, **extra}


def test_ollama_sampling_goes_in_options(serve):
    peer, engine = connect(serve, "ollama")
    list(engine.chat(HELLO, max_tokens=50, sampling=SAMPLING))
    body = peer.requests[-1]
    assert body["options"] == {"num_predict": 50, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 7,
                               "repeat_penalty": 1.2, "repeat_last_n": 32}
    assert body["stream"] is True and "think" not in body


def test_greedy_sends_temperature_zero_and_penalty_off(serve):
    # The penalty is sent at 1.0: a server may default to one (smollm3 serve: 1.1), and a greedy
    # answer would then differ from the local one.
    peer, engine = connect(serve, "vllm")
    list(engine.chat(HELLO, max_tokens=5, sampling=GREEDY))
    body = peer.requests[-1]
    assert body["temperature"] == 0.0 and body["repetition_penalty"] == 1.0 and "top_p" not in body
    peer, engine = connect(serve, "smollm3")
    list(engine.chat(HELLO, max_tokens=5, sampling=GREEDY))
    assert (peer.requests[-1]["repeat_penalty"], peer.requests[-1]["repeat_last_n"]) == (1.0, 64)


def test_thinking_budget_where_the_server_takes_one(serve):
    peer, engine = connect(serve, "vllm")
    answer(engine, thinking=True, thinking_budget=256)
    assert peer.requests[-1]["thinking_token_budget"] == 256 and engine.supports_thinking_budget
    answer(engine, thinking=False, thinking_budget=256)
    assert "thinking_token_budget" not in peer.requests[-1]
    peer, engine = connect(serve, "llama-server")
    answer(engine, thinking=True, thinking_budget=256)
    assert not engine.supports_thinking_budget
    assert not any("budget" in key for key in peer.requests[-1])


STOPPED = [*HELLO, {"role": "assistant", "content": "Hello, wor"}]


@pytest.mark.parametrize("kind, fields", [("vllm", {"continue_final_message": True, "add_generation_prompt": False}),
                                          ("sglang", {"continue_final_message": True, "add_generation_prompt": False}),
                                          ("llama-server", {}), ("ollama", {})])
def test_continue_a_stopped_answer(serve, kind, fields):
    peer, engine = connect(serve, kind)
    assert engine.supports_continue
    list(engine.chat(STOPPED, max_tokens=8, continue_last=True))
    body = peer.requests[-1]
    assert body["messages"][-1] == STOPPED[-1]
    assert {key: body[key] for key in fields} == fields
    assert "continue_final_message" not in body or fields


def test_smollm3_serve_gets_reasoning_back_in_its_field(serve):
    # It strips the newlines around the reasoning it streams and restores them around the
    # reasoning_content it is sent: the resent turn renders as the model wrote it.
    peer, engine = connect(serve, "smollm3", Script(reasoning=REASONING, content=ANSWER))
    shown = answer(engine, thinking=True)
    history = [*HELLO, {"role": "assistant", "content": shown}, {"role": "user", "content": "More"}]
    list(engine.chat(history, max_tokens=8, thinking=True))
    assert peer.requests[-1]["messages"][2] == {"role": "assistant", "content": "Hello, world!",
                                                "reasoning_content": "Let me think."}
    peer, engine = connect(serve, "vllm")
    list(engine.chat(history, max_tokens=8, thinking=True))
    assert peer.requests[-1]["messages"][2] == {"role": "assistant", "content": shown}


def test_continue_inside_a_think_block_does_not_open_another(serve):
    peer, engine = connect(serve, "vllm", Script(reasoning=[" more", "."], content=["Done"]))
    stopped = [*HELLO, {"role": "assistant", "content": "<think>Let me"}]
    text = "".join(engine.chat(stopped, max_tokens=8, continue_last=True))
    assert text == " more.</think>Done"
    assert split_thinking("<think>Let me" + text) == ("Let me more.", "Done")


def test_continue_where_the_server_cannot(serve):
    peer, engine = connect(serve, "mlx-lm")
    assert not engine.supports_continue
    with pytest.raises(RemoteError, match="^the mlx-lm dialect cannot continue a stopped answer$"):
        engine.chat(STOPPED, max_tokens=8, continue_last=True)
    assert peer.requests == []


# --- statistics ---


def test_llama_server_timings_are_the_stats(serve):
    peer, engine = connect(serve, "llama-server", Script(prompt_tokens=21, cached_tokens=5))
    answer(engine)
    s = engine.stats
    counts = (s.counted_by, s.prompt_tokens, s.prefilled_tokens, s.generated_tokens, s.decode_steps)
    assert counts == ("server", 21, 16, 4, 4)
    assert s.prefill_s == pytest.approx(0.032) and s.decode_s == pytest.approx(0.25)
    assert s.prefill_tok_s == pytest.approx(500.0) and s.decode_tok_s == pytest.approx(16.0)


def test_smollm3_serve_rates_are_its_own(serve):
    peer, engine = connect(serve, "smollm3", Script(prompt_tokens=21, cached_tokens=5))
    answer(engine)
    s = engine.stats
    assert (s.counted_by, s.prompt_tokens, s.prefilled_tokens, s.generated_tokens) == ("server", 21, 16, 4)
    assert s.prefill_tok_s == pytest.approx(16 / 0.04) and s.decode_tok_s == pytest.approx(3 / 0.3)


def test_ollama_durations_are_the_stats(serve):
    peer, engine = connect(serve, "ollama", Script(prompt_tokens=26))
    answer(engine)
    s = engine.stats
    assert (s.counted_by, s.prompt_tokens, s.generated_tokens, s.decode_steps) == ("server", 26, 4, 4)
    assert s.prefill_tok_s == pytest.approx(26 / 0.042) and s.decode_tok_s == pytest.approx(4 / 0.5)
    assert s.stop_reason == "eos"


def test_usage_counts_with_client_side_times(serve):
    peer, engine = connect(serve, "vllm", Script(reasoning=REASONING, prompt_tokens=30, cached_tokens=10,
                                                 delay_s=0.02))
    answer(engine)
    s = engine.stats
    counts = (s.counted_by, s.prompt_tokens, s.prefilled_tokens, s.generated_tokens, s.decode_steps)
    assert counts == ("server", 30, 20, 7, 6)
    assert s.prefill_s > 0.015 and s.decode_s > 6 * 0.015


def test_without_usage_tokens_are_counted_here(serve):
    peer, engine = connect(serve, "openai", Script(send_usage=False))
    answer(engine)
    s = engine.stats
    assert (s.counted_by, s.prompt_tokens, s.generated_tokens, s.decode_steps) == ("client", 0, 4, 3)


def test_length_stop_reason(serve):
    for kind in ("vllm", "ollama"):
        peer, engine = connect(serve, kind, Script(finish_reason="length"))
        answer(engine)
        assert engine.stats.stop_reason == "length"


# --- errors ---


@pytest.mark.parametrize("kind", ["openai", "llama-server", "vllm"])
def test_401_without_and_with_a_wrong_key(serve, kind):
    refused = r"refused the request \(401\): Invalid API Key \(set --api-key or OPENAI_API_KEY\)$"
    with pytest.raises(RemoteAuthError, match=refused):
        connect(serve, kind, server_key="right")
    with pytest.raises(RemoteAuthError):
        connect(serve, kind, server_key="right", api_key="wrong")
    peer, engine = connect(serve, kind, server_key="right", api_key="right")
    assert answer(engine) == "Hello, world!"


def test_api_key_from_the_environment(serve, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "right")
    peer, engine = connect(serve, "vllm", server_key="right")
    assert answer(engine) == "Hello, world!"


@pytest.mark.parametrize(
    "kind, message",
    [
        ("vllm", "The model `nope` does not exist."),
        ("ollama", 'model "nope" not found, try pulling it first'),
        ("openai", "The model `nope` does not exist."),
    ],
)
def test_404_unknown_model(serve, kind, message):
    peer, engine = connect(serve, kind, served_model="nope")
    with pytest.raises(RemoteModelNotFound) as caught:
        answer(engine)
    assert str(caught.value) == f"{engine.info.device} does not serve the model 'nope' (404): {message}"


def test_429_says_when_to_retry(serve):
    peer, engine = connect(serve, "openai", Script(status=429))
    with pytest.raises(RemoteRateLimited, match=r"\(429\): Rate limit reached for requests; retry after 20 s$"):
        answer(engine)


@pytest.mark.parametrize("kind, status, message", [("llama-server", 503, "Loading model"),
                                                   ("ollama", 500, "the model failed to generate a response")])
def test_5xx(serve, kind, status, message):
    peer, engine = connect(serve, kind, Script(status=status))
    with pytest.raises(RemoteServerError, match=rf"failed with a server error \({status}\): {message}$"):
        answer(engine)


def test_unreachable_host():
    port = free_port()
    started = time.perf_counter()
    with pytest.raises(RemoteUnreachable, match=rf"^cannot reach 127.0.0.1:{port}: "):
        RemoteEngine(f"http://127.0.0.1:{port}/v1")
    assert time.perf_counter() - started < 5


def test_connection_setup_is_retried():
    # The port refuses connections until the server listens, 0.2 s after the first attempt;
    # httpx's transport tries again at 0, 0.5 and 1.5 s, so the request gets through.
    peer = FakePeer("vllm")
    server = ServerThread(peer.app())
    client = RemoteClient(server.url + "/v1")
    threading.Timer(0.2, lambda: (server.sock.listen(), server.start())).start()
    try:
        status, models, _ = client.request_json("GET", client.api + "/models")
        assert status == 200 and models["data"][0]["owned_by"] == "vllm"
    finally:
        time.sleep(0.3)
        server.stop()


def test_tls_failure(serve):
    url = serve(FakePeer("vllm").app())
    with pytest.raises(RemoteTLSError, match=r"^TLS with 127.0.0.1:\d+ failed: "):
        RemoteEngine(url.replace("http://", "https://") + "/v1")


def test_not_openai_compatible(serve):
    url = serve(html_site())
    not_openai = r"is not an OpenAI-compatible endpoint \(GET /models answered 404 without JSON\)"
    with pytest.raises(NotOpenAICompatible, match=not_openai):
        RemoteEngine(url + "/v1")
    with pytest.raises(NotOpenAICompatible, match=r"answered 200 without JSON"):
        RemoteEngine(url + "/site/v1")


def test_a_chat_answer_that_is_not_a_stream(serve):
    peer, engine = connect(serve, "vllm", Script(no_stream=True))
    not_sse = r"answered a streaming request with 'application/json', not server-sent events$"
    with pytest.raises(NotOpenAICompatible, match=not_sse):
        answer(engine)


def test_read_timeout_before_any_answer(serve):
    peer, engine = connect(serve, "vllm", Script(first_byte_delay_s=3), read_timeout=0.5)
    with pytest.raises(RemoteTimeout, match=r"sent no answer within 0.5 s$"):
        answer(engine)


def test_read_timeout_mid_answer_is_a_cut(serve):
    peer, engine = connect(serve, "vllm", Script(content=["a", "b"], delay_s=2), read_timeout=0.5)
    with pytest.raises(RemoteStreamCut, match=r"stopped sending mid-answer \(nothing for 0.5 s\)$"):
        answer(engine)


@pytest.mark.parametrize("kind", ["vllm", "llama-server", "ollama"])
def test_stream_cut_mid_answer_keeps_the_partial_text(serve, kind):
    peer, engine = connect(serve, kind, Script(cut_after=2))
    received = []
    with pytest.raises(RemoteStreamCut, match="mid-answer|before the answer was complete"):
        for piece in engine.chat(HELLO, max_tokens=8):
            received.append(piece)
    assert "".join(received) == "Hello,"
    assert len(peer.requests) == 1  # a request that reached the server is never sent again


@pytest.mark.parametrize("kind, message", [("ollama", "an error was encountered while running the model"),
                                           ("vllm", "the engine died")])
def test_error_reported_mid_stream(serve, kind, message):
    peer, engine = connect(serve, kind, Script(error_after=3))
    received = []
    with pytest.raises(RemoteStreamCut, match=f"reported an error mid-answer: {message}$"):
        for piece in engine.chat(HELLO, max_tokens=8):
            received.append(piece)
    assert "".join(received) == "Hello, world"


def test_server_text_becomes_one_bounded_printable_line():
    traceback = b'{"error": "Traceback (most recent call last):\\n  File \\"x.py\\"\\n\\u001b[31mKeyError\\u001b[0m"}'
    assert server_message(traceback) == 'Traceback (most recent call last): File "x.py" \\x1b[31mKeyError\\x1b[0m'
    assert server_message(b"<html>\n<body>Bad Gateway</body>\n</html>") == "<html> <body>Bad Gateway</body> </html>"
    long = server_message(b'{"detail": "' + b"x" * 500 + b'"}')
    assert len(long) == 200 and long.endswith("...")
    assert server_message(b'{"object": "error", "message": "m", "code": 400}') == "m"
    assert server_message(b'{"error": {"message": "n", "type": "t"}}') == "n"


# --- stopping ---


def test_should_stop_closes_the_connection_and_the_server_stops(serve):
    peer, engine = connect(serve, "vllm", Script(content=["tok "] * 500, delay_s=0.01))
    received = []
    for piece in engine.chat(HELLO, max_tokens=500, should_stop=lambda: len(received) >= 3):
        received.append(piece)
    assert received == ["tok "] * 3 and engine.stats.stop_reason == "stopped"
    assert peer.disconnected.wait(5)
    sent = peer.pieces_sent
    time.sleep(0.2)
    assert peer.pieces_sent == sent < 50  # the server generates nothing more


@pytest.mark.parametrize("kind", ["ollama", "llama-server"])
def test_closing_the_generator_closes_the_connection(serve, kind):
    peer, engine = connect(serve, kind, Script(content=["tok "] * 500, delay_s=0.01))
    stream = engine.chat(HELLO, max_tokens=500)
    assert next(stream) == "tok "
    stream.close()
    assert peer.disconnected.wait(5) and peer.pieces_sent < 50
    assert engine.stats.stop_reason == "stopped" and engine.stats.generated_tokens == 1


def test_stop_from_another_thread(serve):
    peer, engine = connect(serve, "mlx-lm", Script(content=["tok "] * 500, delay_s=0.01))
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    received = list(engine.chat(HELLO, max_tokens=500, should_stop=stop.is_set))
    assert 3 <= len(received) < 100 and peer.disconnected.wait(5)


def test_a_second_request_after_a_stop_works(serve):
    peer, engine = connect(serve, "vllm", Script(content=["tok "] * 50, delay_s=0.01))
    for _ in engine.chat(HELLO, max_tokens=50, should_stop=lambda: True):
        pass
    peer.script = Script()
    assert answer(engine) == "Hello, world!"


@pytest.mark.parametrize("kind", ["vllm", "ollama"])
def test_cancel_from_another_thread_ends_a_wait_for_the_first_piece(serve, kind):
    # The server is still "reading the prompt": nothing arrives for 5 s, so should_stop is never asked.
    peer, engine = connect(serve, kind, Script(first_byte_delay_s=5))
    threading.Timer(0.3, engine.cancel).start()
    started = time.perf_counter()
    assert list(engine.chat(HELLO, max_tokens=8)) == []
    assert time.perf_counter() - started < 2
    assert engine.stats.stop_reason == "stopped"
    peer.script = Script()
    assert answer(engine) == "Hello, world!"  # the next request is not cancelled


def test_cancel_mid_answer(serve):
    peer, engine = connect(serve, "llama-server", Script(content=["tok "] * 500, delay_s=0.01))
    threading.Timer(0.3, engine.cancel).start()
    received = list(engine.chat(HELLO, max_tokens=500))
    assert 3 <= len(received) < 100 and engine.stats.stop_reason == "stopped"
    assert peer.disconnected.wait(5)
