"""app/server/app.py over real HTTP, on the tiny SmolLM3 fixture with a scripted sampler:
reasoning fields, thinking switches and budget, tool calls, KV reuse, queueing, disconnects,
errors. The SmolLM2 model through the openai SDK is in test_server_openai.py."""

import asyncio
import json
import time

import httpx
import openai
import pytest

from server_helpers import scripted_engine, serve_engine

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def engine():
    return scripted_engine()


@pytest.fixture(scope="module")
def server(engine):
    lines = []
    with serve_engine(engine, log=lines.append) as url:
        yield url, lines


@pytest.fixture
def url(server, engine):
    engine.scripts, engine.delay_s = [], 0.0
    return server[0]


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def chat(url, timeout=60, **body):
    body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)


# --- reasoning ---

def test_reasoning_comes_apart_from_the_answer(url, engine):
    engine.say("<think>\nThe user says hi.\n</think>\nHello!")
    r = chat(url).json()
    message = r["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hello!", "reasoning_content": "The user says hi."}
    assert r["choices"][0]["finish_reason"] == "stop"
    assert engine.prompt_text().endswith("<|im_start|>assistant\n")  # the template's default: /think


def test_streamed_reasoning_is_never_in_content(client, engine):
    engine.say("<think>\nStep one.\nStep two.\n</think>\nDone.")
    stream = client.chat.completions.create(model="tiny-smollm3", messages=[{"role": "user", "content": "Go"}],
                                            stream=True, stream_options={"include_usage": True})
    reasoning, content, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert (reasoning, content, finish) == ("Step one.\nStep two.", "Done.", "stop")
    assert usage.completion_tokens == len(engine.tokenizer.encode("<think>\nStep one.\nStep two.\n</think>\nDone."))


@pytest.mark.parametrize("switch", [
    {"chat_template_kwargs": {"enable_thinking": False}},
    {"reasoning_effort": "none"},
    {"messages": [{"role": "system", "content": "Be brief. /no_think"}, {"role": "user", "content": "Hi"}]},
])
def test_thinking_switches_off(url, engine, switch):
    engine.say("Hi.")
    assert chat(url, **switch).json()["choices"][0]["message"]["content"] == "Hi."
    assert engine.prompt_text().endswith("<|im_start|>assistant\n<think>\n\n</think>\n")


def test_earlier_reasoning_is_rendered_back_and_its_tokens_reused(url, engine):
    generated = "<think>\nThey greet.\n</think>\nHello!"
    engine.say(generated)
    first = chat(url, messages=[{"role": "user", "content": "Hi"}]).json()
    reply = first["choices"][0]["message"]
    engine.say("Fine.")
    turns = [{"role": "user", "content": "Hi"}, reply, {"role": "user", "content": "How are you?"}]
    second = chat(url, messages=turns).json()
    assert f"<|im_start|>assistant\n{generated}<|im_end|>" in engine.prompt_text()
    # the resent conversation starts with exactly the tokens the cache holds: only the new turn is prefilled
    u1, u2 = first["usage"], second["usage"]
    assert u2["prompt_tokens_details"]["cached_tokens"] == u1["prompt_tokens"] + u1["completion_tokens"]
    assert second["timings"]["cache_n"] == u2["prompt_tokens_details"]["cached_tokens"]
    assert second["timings"]["prompt_n"] == u2["prompt_tokens"] - u1["prompt_tokens"] - u1["completion_tokens"]


def test_thinking_budget_closes_the_block_and_the_model_answers(url, engine):
    reasoning = "<think>\none two three four five six seven eight"
    engine.say(reasoning, "The answer.")
    r = chat(url, thinking_budget=4).json()
    ids = engine.tokenizer.encode(reasoning)
    opened = len(engine.tokenizer.encode("<think>"))  # the budget counts from the newline on
    message = r["choices"][0]["message"]
    assert message["reasoning_content"] == engine.tokenizer.decode(ids[opened : opened + 4]).strip("\n")
    assert message["content"] == "The answer."
    closing = engine.tokenizer.encode("\n</think>\n")
    answer = engine.prompts[-1]
    assert answer[-len(closing) :] == closing  # the second pass continues after the closed block
    assert answer == engine.prompts[-2] + ids[: opened + 4] + closing
    assert r["usage"]["completion_tokens"] == opened + 4 + len(closing) + len(engine.tokenizer.encode("The answer."))


def test_continue_final_message_continues_the_reasoning_then_answers(url, engine):
    partial = "<think>\nThe user says hi."
    engine.say(" They want a greeting.\n</think>\nHello!")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": partial}]
    r = chat(url, messages=messages, continue_final_message=True).json()
    assert engine.prompt_text().endswith(f"<|im_start|>assistant\n{partial}")  # no <|im_end|>, no new turn
    # the continuation only, as the client appends it to what it sent (its leading space kept)
    assert r["choices"][0]["message"] == {"role": "assistant", "content": "Hello!",
                                          "reasoning_content": " They want a greeting."}


# --- tools ---

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_call_comes_back_as_tool_calls(url, engine):
    engine.say(CALL)
    r = chat(url, tools=[WEATHER], reasoning_effort="none").json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    prompt = engine.prompt_text()
    assert "<tools>\n{'name': 'get_weather', 'description': 'Weather in a city'" in prompt  # SmolLM3's xml_tools


def test_streamed_tool_call_through_the_sdk_then_the_result_goes_back(client, engine):
    engine.say(CALL)
    stream = client.chat.completions.create(model="tiny-smollm3", messages=[{"role": "user", "content": "Weather?"}],
                                            tools=[WEATHER], stream=True, reasoning_effort="none")
    calls, finish = {}, None
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta_call.index, {"id": delta_call.id, "name": "", "arguments": ""})
            entry["name"] += delta_call.function.name or ""
            entry["arguments"] += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [("get_weather", {"city": "Paris"})]
    engine.say("It is sunny in Paris.")
    call = calls[0]
    r = client.chat.completions.create(model="tiny-smollm3", reasoning_effort="none", tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "sunny"}'},
    ])
    assert r.choices[0].message.content == "It is sunny in Paris."
    assert (f"<|im_start|>assistant\n<think>\n\n</think>\n{CALL}<|im_end|>\n"
            '<|im_start|>user\n{"sky": "sunny"}<|im_end|>\n') in engine.prompt_text()


def test_a_call_that_does_not_parse_is_text(url, engine):
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>'
    engine.say(broken)
    choice = chat(url, tools=[WEATHER], reasoning_effort="none").json()["choices"][0]
    assert choice["message"]["content"] == broken and "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "stop"


def test_named_tool_choice_writes_the_start_of_the_call(url, engine):
    engine.say('{"city": "Oslo"}}\n</tool_call>')
    choice = chat(url, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}
                  ).json()["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    assert engine.prompt_text().endswith('<think>\n\n</think>\n<tool_call>\n{"name": "get_weather", "arguments": ')


def test_tool_choice_none_leaves_tools_out(url, engine):
    engine.say(CALL)
    choice = chat(url, tools=[WEATHER], tool_choice="none").json()["choices"][0]
    assert "<tools>" not in engine.prompt_text() and choice["message"]["content"] == CALL


# --- completions, stop, models, logs ---

def test_raw_completion_and_stop_strings(url, engine):
    engine.say("one two three")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Count:", "max_tokens": 50, "stop": [" three"]}).json()
    assert r["object"] == "text_completion" and r["choices"][0]["text"] == "one two"
    assert r["choices"][0]["finish_reason"] == "stop"
    assert engine.prompts[-1] == engine.tokenizer.encode("Count:")


def test_max_tokens_is_length(url, engine):
    engine.say("one two three four five")
    r = chat(url, max_tokens=2, reasoning_effort="none").json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 2


def test_models_health_and_one_log_line_per_request(server, url):
    lines = server[1]
    before = len(lines)
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny-smollm3"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    deadline = time.monotonic() + 5  # a request's line is written as its response ends, after the client has it
    while not any(" GET /health 200 " in line for line in lines[before:]) and time.monotonic() < deadline:
        time.sleep(0.01)
    gets = [line for line in lines[before:] if " GET " in line]  # (a slow earlier POST may log late)
    assert len(gets) == 2 and " GET /v1/models 200 " in gets[0] and " GET /health 200 " in gets[1]


# --- errors ---

def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_error_statuses(url):
    post = lambda content, **kw: httpx.post(f"{url}/v1/chat/completions", content=content, **kw)  # noqa: E731
    assert error_of(post(b'{"messages": ['), 400)["code"] == "invalid_json"
    assert error_of(chat(url, n=3), 400)["param"] == "n"
    assert error_of(chat(url, continue_final_message=True), 400)["param"] == "continue_final_message"
    assert error_of(chat(url, model="gpt-4"), 404)["code"] == "model_not_found"
    assert error_of(post(b"x" * (4 << 20 + 1)), 413)["code"] == "request_too_large"
    assert error_of(httpx.get(f"{url}/v2/nothing"), 404)
    assert error_of(httpx.get(f"{url}/v1/chat/completions"), 405)


def test_prompt_over_the_context_names_both_numbers(engine):
    with serve_engine(engine, ctx_size=64) as url:
        error = error_of(chat(url, messages=[{"role": "user", "content": "word " * 100}]), 400)
    prompt_tokens = int(error["message"].split("the prompt is ")[1].split()[0])
    assert prompt_tokens > 64 and "the context is 64 tokens" in error["message"]


def test_api_key(engine):
    with serve_engine(engine, api_key="s3cret") as url:
        assert error_of(chat(url), 401)["code"] == "invalid_api_key"
        assert error_of(chat(url, headers={"Authorization": "Bearer wrong"}), 401)
        engine.say("ok")
        r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": "Bearer s3cret"},
                       json={"messages": [{"role": "user", "content": "Hi"}], "reasoning_effort": "none"})
        assert r.status_code == 200 and httpx.get(f"{url}/health").status_code == 200


def test_a_failing_engine_is_a_500_and_the_server_goes_on(url, engine):
    engine.compute, engine.fail = False, True
    try:
        error = error_of(chat(url), 500)
        assert error["type"] == "server_error" and "RuntimeError: the backend failed" in error["message"]
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi"}], "stream": True}) as r:
            data = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
        assert "RuntimeError" in data[-1]["error"]["message"]
    finally:
        engine.compute, engine.fail, engine.cached_ids = True, False, []
    engine.say("Fine.")
    assert chat(url, reasoning_effort="none").json()["choices"][0]["message"]["content"] == "Fine."


# --- one engine: queue, disconnects ---

async def test_requests_queue_in_order_and_a_full_queue_is_429(engine):
    engine.say(*["a b c d e f"] * 3)
    engine.delay_s = 0.2  # a reply takes over a second: the first still generates when the third arrives
    with serve_engine(engine, max_queue=1) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            body = {"messages": [{"role": "user", "content": "Hi"}], "reasoning_effort": "none"}
            first = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            await asyncio.sleep(0.3)  # the first is generating
            second = asyncio.create_task(http.post("/v1/chat/completions", json=body))
            await asyncio.sleep(0.1)  # the second waits in the queue
            third = await http.post("/v1/chat/completions", json=body)
            assert third.status_code == 429 and third.headers["retry-after"] == "1"
            assert error_of(third, 429)["code"] == "queue_full"
            assert [(await t).json()["choices"][0]["message"]["content"] for t in (first, second)] == ["a b c d e f"] * 2
    engine.delay_s = 0.0


def test_a_client_that_leaves_before_a_whole_reply_stops_the_engine(url, engine):
    engine.compute, engine.delay_s = False, 0.02  # no prefill to wait for: the 1 s timeout falls mid-reply
    engine.say(" ".join(["word"] * 400))
    start = engine.sampled
    with pytest.raises(httpx.ReadTimeout):
        chat(url, timeout=1.0, reasoning_effort="none")
    time.sleep(0.2)
    at_close = engine.sampled
    time.sleep(0.5)
    assert 10 < at_close - start < 400 and engine.sampled - at_close <= 1
    engine.compute, engine.delay_s, engine.cached_ids = True, 0.0, []  # without compute the cache holds no real keys


def test_a_client_that_leaves_mid_stream_stops_the_engine_within_a_token(url, engine):
    engine.say(" ".join(["word"] * 400), "Next.")
    engine.delay_s = 0.02
    body = {"messages": [{"role": "user", "content": "Talk"}], "stream": True, "reasoning_effort": "none"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(line for line in lines if line.startswith("data:"))
        at_close = engine.sampled
    time.sleep(0.5)  # 25 tokens' time
    assert engine.sampled - at_close <= 2
    engine.delay_s = 0.0
    t0 = time.perf_counter()
    assert chat(url, reasoning_effort="none").json()["choices"][0]["message"]["content"] == "Next."
    assert time.perf_counter() - t0 < 5
