"""`smollm3 serve` as a real process on the SmolLM2 GGUF, driven by the official openai SDK (sync
and async, streaming and not): greedy answers equal `smollm3 --prompt` token for token."""

import asyncio
import os
import re
import subprocess
import sys
import threading

import openai
import pytest

from server_helpers import listen

QUESTION = "Name the capital of France."
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def server(smollm2_gguf):
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve", "--model-path", str(smollm2_gguf),
                             "--port", str(port), "--temperature", "0"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ready = []
    reader = threading.Thread(target=lambda: ready.append(proc.stderr.readline()), daemon=True)
    reader.start()
    reader.join(240)
    try:
        assert ready and "smollm3: serving SmolLM2-135M-Instruct.Q4_1 on http://127.0.0.1:" in ready[0], ready
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # request log lines: drain
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def cli_answer(smollm2_gguf):
    r = subprocess.run([sys.executable, "-m", "app", "--model-path", str(smollm2_gguf), "--temperature", "0",
                        "-n", str(MAX_TOKENS), "--prompt", QUESTION], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    generated = int(re.search(r"(\d+) tokens generated", r.stderr).group(1))
    return r.stdout.removesuffix("\n"), generated


def ask(**kw):
    return dict(model="SmolLM2-135M-Instruct.Q4_1", messages=[{"role": "user", "content": QUESTION}],
                max_tokens=MAX_TOKENS, temperature=0, **kw)


def test_sync_answer_equals_the_cli(server, cli_answer):
    client = openai.OpenAI(base_url=server, api_key="x", max_retries=0)
    r = client.chat.completions.create(**ask())
    assert (r.choices[0].message.content, r.usage.completion_tokens) == cli_answer
    assert "Paris" in r.choices[0].message.content
    assert r.usage.prompt_tokens > 0 and r.model_extra["timings"]["predicted_n"] == r.usage.completion_tokens


def test_sync_stream_equals_the_cli(server, cli_answer):
    client = openai.OpenAI(base_url=server, api_key="x", max_retries=0)
    text, usage = "", None
    for chunk in client.chat.completions.create(**ask(stream=True, stream_options={"include_usage": True})):
        usage = chunk.usage or usage
        text += "".join(c.delta.content or "" for c in chunk.choices)
    assert (text, usage.completion_tokens) == cli_answer


async def test_async_clients_at_once_each_get_the_cli_answer(server, cli_answer):
    client = openai.AsyncOpenAI(base_url=server, api_key="x", max_retries=0)

    async def streamed():
        text = ""
        async for chunk in await client.chat.completions.create(**ask(stream=True)):
            text += "".join(c.delta.content or "" for c in chunk.choices)
        return text

    whole, text = await asyncio.gather(client.chat.completions.create(**ask()), streamed())
    assert whole.choices[0].message.content == text == cli_answer[0]


def test_a_resent_conversation_prefills_only_the_new_turn(server):
    client = openai.OpenAI(base_url=server, api_key="x", max_retries=0)
    first = client.chat.completions.create(**ask())
    turns = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And of Italy?"}]
    second = client.chat.completions.create(**{**ask(), "messages": turns})
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == first.usage.prompt_tokens + first.usage.completion_tokens


def test_continue_final_message_resumes_the_answer(server, cli_answer):
    """The start of the CLI's greedy answer, sent back as the assistant's message to continue
    (extra_body, as for vLLM and SGLang): the model writes the rest of that same answer."""
    client = openai.OpenAI(base_url=server, api_key="x", max_retries=0)
    answer = cli_answer[0]
    head = answer[: answer.index(" ", len(answer) // 3)]
    started = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": head}]
    r = client.chat.completions.create(**{**ask(), "messages": started}, extra_body={"continue_final_message": True})
    assert (head + r.choices[0].message.content).startswith(answer)
    with pytest.raises(openai.BadRequestError, match="continue_final_message"):
        client.chat.completions.create(**ask(), extra_body={"continue_final_message": True})


def test_models_and_sdk_errors(server):
    client = openai.OpenAI(base_url=server, api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct.Q4_1"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(**{**ask(), "model": "gpt-4o"})
    with pytest.raises(openai.BadRequestError, match="'n'"):
        client.chat.completions.create(**ask(n=2))


def test_raw_completion(server):
    client = openai.OpenAI(base_url=server, api_key="x", max_retries=0)
    r = client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt="The capital of France is", max_tokens=4,
                                  temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4 and r.choices[0].text
