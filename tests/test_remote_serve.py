"""backends/remote against `smollm3 serve` on 127.0.0.1 with the SmolLM2 GGUF: the remote chat gives
the local chat's greedy answers token for token, and a stopped answer frees the server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from app.session import ChatSession
from backends.remote import RemoteEngine
from backends.sampling import GREEDY
from tests.fake_servers import free_port, server_process

ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("app.server") is None, reason="smollm3 serve is not in this tree"),
    pytest.mark.skipif(not GGUF.exists(), reason="the SmolLM2 GGUF is not in models/"),
]


@pytest.fixture(scope="module")
def serve_url():
    port = free_port()
    command = [sys.executable, "-m", "app", "serve", "--model-path", str(GGUF), "--port", str(port)]
    with server_process(command, f"http://127.0.0.1:{port}/v1", "smollm3 serve", 180, cwd=ROOT) as url:
        yield url


def test_remote_and_local_chat_give_the_same_greedy_answers(serve_url):
    import backends

    local = ChatSession(backends.load(str(GGUF), backend="torch"))
    remote = RemoteEngine(serve_url)
    assert (remote.dialect.name, remote.model) == ("smollm3", "SmolLM2-135M-Instruct.Q4_1")
    messages: list[dict] = []
    for question in ("Name the capital of France.", "And of Italy?"):
        expected = "".join(local.reply(question, 16, GREEDY))
        messages.append({"role": "user", "content": question})
        answer = "".join(remote.chat(messages, max_tokens=16, sampling=GREEDY))
        messages.append({"role": "assistant", "content": answer})
        assert answer == expected
        assert (remote.stats.prompt_tokens, remote.stats.generated_tokens) == (
            local.engine.stats.prompt_tokens,
            local.engine.stats.generated_tokens,
        )
    # The resent conversation is the server's cached prefix: only the new turn is prefilled.
    assert remote.stats.prefilled_tokens < remote.stats.prompt_tokens


def test_a_stopped_answer_frees_the_server(serve_url):
    remote = RemoteEngine(serve_url, read_timeout=120)  # a server still writing the story fails, not hangs
    pieces: list[str] = []
    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    for piece in remote.chat(story, max_tokens=4000, sampling=GREEDY, should_stop=lambda: len(pieces) >= 2):
        pieces.append(piece)
    assert len(pieces) == 2 and remote.stats.stop_reason == "stopped"
    # The server works on one request at a time: had it kept writing the story, this would wait for it.
    assert "".join(remote.chat([{"role": "user", "content": "Hi"}], max_tokens=4, sampling=GREEDY))
    assert remote.stats.stop_reason == "length"
