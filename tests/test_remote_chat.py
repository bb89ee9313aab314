"""The chat (session and TUI) on a remote engine, against the fake servers of tests/fake_servers.py."""

from __future__ import annotations

import importlib.util
import sqlite3
import time
from pathlib import Path

import pytest

from app.session import ChatSession
from app.tui.app import ChatApp
from app.tui.status import status_text
from app.tui.store import ChatStore
from app.tui.worker import Settings
from app.tui.widgets import LoadingPanel, UserMessage
from backends.remote import RemoteEngine, RemoteServerError, RemoteStreamCut
from backends.sampling import GREEDY, SamplingParams
from test_remote_serve import serve_url  # noqa: F401 (a fixture: smollm3 serve on 127.0.0.1, once per module)
from test_tui_support import answers, ready, send, settle, thinking_folds_when_the_answer_starts, wait_for
from tests.fake_servers import FakePeer, Script, ServerThread, free_port

SIZE = (100, 32)
MODEL = "HuggingFaceTB/SmolLM3-3B"


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    servers: list[ServerThread] = []

    def start(kind: str = "vllm", script: Script | None = None, model: str = MODEL) -> tuple[FakePeer, RemoteEngine]:
        peer = FakePeer(kind, model=model, script=script)
        servers.append(ServerThread(peer.app()).start())
        return peer, RemoteEngine(servers[-1].url + "/v1")

    yield start
    for server in servers:
        server.stop()


def make_app(tmp_path, engine, **kwargs) -> ChatApp:
    kwargs.setdefault("sampling", GREEDY)
    kwargs.setdefault("max_new_tokens", 64)
    return ChatApp(lambda progress: engine, store=ChatStore(tmp_path / "chats.sqlite3"), model_label="remote", **kwargs)


def rows(tmp_path, sql="SELECT role, content, status FROM messages ORDER BY id"):
    with sqlite3.connect(tmp_path / "chats.sqlite3") as db:
        return db.execute(sql).fetchall()



# --- the session ---


def test_the_session_sends_what_the_local_template_would_render(serve):
    peer, engine = serve("vllm", Script(reasoning=["Hmm."], content=["Paris", "."]))
    session = ChatSession(engine, thinking=True, system_prompt="Be brief.")
    assert "".join(session.reply("Capital of France?", 32, GREEDY)) == "<think>Hmm.</think>Paris."
    assert session.last_stop_reason == "eos" and session.messages[-1].status == "done"
    assert session.context_tokens() == 21 + 3  # the server's usage: no tokenizer here
    session.thinking = False
    "".join(session.reply("And of Italy?", 32, GREEDY))
    first, second = peer.requests
    assert first["chat_template_kwargs"] == {"enable_thinking": True}
    assert second["chat_template_kwargs"] == {"enable_thinking": False}
    # Without thinking the earlier reasoning is left out, as the local template leaves it out;
    # the SmolLM3 system prompt carries the portable flag too.
    assert second["messages"] == [
        {"role": "system", "content": "/no_think Be brief."} if second["messages"][0]["content"].startswith("/")
        else {"role": "system", "content": "Be brief. /no_think"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]


def test_a_stream_cut_keeps_the_partial_answer_with_reason_error(serve):
    _, engine = serve("sglang", Script(cut_after=2))
    session = ChatSession(engine)
    got = []
    with pytest.raises(RemoteStreamCut):
        for text in session.reply("Hi", 32, GREEDY):
            got.append(text)
    assert "".join(got) == "Hello," and session.messages[-1].content == "Hello,"
    assert session.last_stop_reason == "error" and session.messages[-1].status == "stopped"
    assert [m.role for m in session.messages] == ["user", "assistant"]


def test_a_server_error_before_any_text_keeps_only_the_user_turn(serve):
    _, engine = serve("vllm", Script(status=500))
    session = ChatSession(engine)
    with pytest.raises(RemoteServerError, match=r"\(500\)"):
        list(session.reply("Hi", 32, GREEDY))
    assert [(m.role, m.content) for m in session.messages] == [("user", "Hi")]


def test_continue_extends_the_stopped_answer_where_the_server_can(serve):
    peer, engine = serve("vllm", Script(content=["one", " two", " three"]))
    session = ChatSession(engine)
    stream = session.reply("Count", 32, GREEDY)
    assert next(stream) == "one"
    stream.close()
    assert session.last_stop_reason == "stopped" and session.messages[-1].content == "one"
    assert "".join(session.continue_reply(32, GREEDY)) == "one two three"
    body = peer.requests[-1]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["messages"][-1] == {"role": "assistant", "content": "one"}
    assert session.messages[-1].content == "one" + "one two three"  # (the fake replays its whole script)


# --- the TUI ---


async def test_reasoning_folds_as_with_a_local_engine_and_the_chat_records_the_endpoint(serve, tmp_path):
    peer, engine = serve("vllm", Script(reasoning=["Let me", " think", " about it."], content=["Hello", ",", " world", "!"],
                                        delay_s=0.3))
    app = make_app(tmp_path, engine, thinking=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Hi", wait=False)
        widget = await thinking_folds_when_the_answer_starts(pilot, app)
        assert widget.thinking_block.body.source == "Let me think about it."
        assert widget.answer.source == "Hello, world!"
        assert rows(tmp_path) == [("user", "Hi", "done"), ("assistant", "<think>Let me think about it.</think>Hello, world!", "done")]
        (model,) = rows(tmp_path, "SELECT model FROM chats")[0]
        assert model == f"{MODEL} at {engine.endpoint}"
        chat = app.chat
        status = status_text(chat.engine, chat.context_used, chat.stats, chat.settings)
        host = engine.endpoint.split("//")[1].split("/")[0]
        assert f"ctx {21 + 7} · " in status and f"{MODEL} · {host} vllm" in status, status
        assert peer.requests[0]["chat_template_kwargs"] == {"enable_thinking": True}
        assert peer.requests[0]["temperature"] == 0 and peer.requests[0]["max_tokens"] == 64


async def test_escape_stops_the_answer_and_the_server_sees_the_disconnect(serve, tmp_path):
    peer, engine = serve("vllm", Script(content=["word "] * 400, delay_s=0.02))
    app = make_app(tmp_path, engine, max_new_tokens=1000)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Talk", wait=False)
        await wait_for(pilot, lambda: answers(app) and len(answers(app)[0].answer_text) > 20, what="some answer text")
        await pilot.press("escape")
        await settle(pilot, timeout=10)
        assert peer.disconnected.wait(5), "the server went on generating"
        message = app.chat.session.messages[-1]
        assert message.status == "stopped" and 4 <= message.content.count("word") < 400
        assert rows(tmp_path)[-1] == ("assistant", message.content, "stopped")
        sent = peer.pieces_sent
        time.sleep(0.3)
        assert peer.pieces_sent == sent


async def test_escape_while_waiting_for_the_first_byte_ends_the_request(serve, tmp_path):
    # Nothing streams for 30 s: only the engine's cancel() (not the per-piece stop check) ends this.
    peer, engine = serve("vllm", Script(first_byte_delay_s=30))
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Hi", wait=False)
        await wait_for(pilot, lambda: peer.requests, what="the request")
        t0 = time.monotonic()
        await pilot.press("escape")
        await settle(pilot, timeout=10)
        assert time.monotonic() - t0 < 5
        assert [(m.role, m.content) for m in app.chat.session.messages] == [("user", "Hi")]
        assert not app._notifications, [n.message for n in app._notifications]


async def test_a_server_error_keeps_the_user_message_and_says_so_once(serve, tmp_path):
    peer, engine = serve("vllm", Script(status=503))
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Hi")
        assert [w.text for w in app.query(UserMessage)] == ["Hi"] and not answers(app)
        assert rows(tmp_path) == [("user", "Hi", "done")]
        (note,) = app._notifications
        assert "server error (503)" in note.message and "Loading model" in note.message
        peer.script.status = None  # the server is back: Ctrl+R answers the waiting message
        app.clear_notifications()
        await pilot.press("ctrl+r")
        await settle(pilot)
        assert rows(tmp_path) == [("user", "Hi", "done"), ("assistant", "Hello, world!", "done")]


async def test_a_stream_cut_keeps_the_partial_answer_with_the_error_on_it(serve, tmp_path):
    _, engine = serve("llama-server", Script(cut_after=2))
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Hi")
        (widget,) = answers(app)
        assert widget.answer_text == "Hello," and "mid-answer" in str(widget.note.render())
        assert rows(tmp_path) == [("user", "Hi", "done"), ("assistant", "Hello,", "stopped")]


async def test_settings_retry_and_edit_reach_the_server_per_request(serve, tmp_path):
    peer, engine = serve("vllm", Script(content=["Sure", "."]), model="some-model")
    app = make_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Tell me something")
        app.chat.settings = Settings(SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=1), 33)
        await send(pilot, "/retry")
        await send(pilot, "/edit")
        assert app.chat.query_prompt().text == "Tell me something"
        await send(pilot, "Tell me something else")
    first, retry, edited = peer.requests
    assert [first["temperature"], first["max_tokens"], "top_p" in first] == [0.0, 64, False]
    assert (retry["temperature"], retry["top_p"], retry["max_tokens"], retry["seed"]) == (0.7, 0.9, 33, 1)
    assert retry["top_k"] == 40
    # The retried answer is not sent back; the edited message replaces the first.
    assert retry["messages"] == first["messages"] == [{"role": "user", "content": "Tell me something"}]
    assert edited["messages"] == [{"role": "user", "content": "Tell me something else"}]
    assert [r[1] for r in rows(tmp_path)] == ["Tell me something else", "Sure."]


async def test_an_unreachable_endpoint_is_shown_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    url = f"http://127.0.0.1:{free_port()}/v1"
    app = ChatApp(lambda progress: RemoteEngine(url), store=ChatStore(tmp_path / "chats.sqlite3"), model_label=url)
    async with app.run_test(size=SIZE) as pilot:
        panel = app.query_one(LoadingPanel)
        await wait_for(pilot, lambda: panel.failed, what="the error")
        assert "cannot reach 127.0.0.1" in str(panel.query_one("#loading-error").render())
        assert "--endpoint, --api-key and --served-model" in str(panel.query_one("#loading-hint").render())
        await pilot.press("ctrl+q")
    assert app.return_value == 2


# --- against `smollm3 serve` on 127.0.0.1 with the SmolLM2 GGUF ---

GGUF = Path(__file__).resolve().parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_serve = pytest.mark.skipif(
    importlib.util.find_spec("app.server") is None or not GGUF.exists(),
    reason="needs smollm3 serve (app.server) and models/SmolLM2-135M-Instruct.Q4_1.gguf",
)


@pytest.fixture(scope="module")
def local_engine():
    import backends

    return backends.load(str(GGUF), backend="torch")


def recording(engine: RemoteEngine) -> list[dict]:
    """The request bodies the engine sends, as sent."""
    bodies: list[dict] = []
    stream = engine.client.stream

    def recorded(url, body, model, sse):
        bodies.append(body)
        return stream(url, body, model, sse)

    engine.client.stream = recorded
    return bodies


@needs_serve
def test_remote_and_local_chat_agree_token_for_token_over_turns(serve_url, local_engine):
    remote_engine = RemoteEngine(serve_url)
    bodies = recording(remote_engine)
    local = ChatSession(local_engine, system_prompt="You are a geography teacher.")
    remote = ChatSession(remote_engine, system_prompt="You are a geography teacher.")
    turns = [("What is the capital of France?", False), ("And of Italy?", True), ("Which one is bigger?", False)]
    for question, thinking in turns:
        local.thinking = remote.thinking = thinking
        expected = "".join(local.reply(question, 20, GREEDY))
        answer = "".join(remote.reply(question, 20, GREEDY))
        assert answer == expected, question
        assert (remote_engine.stats.prompt_tokens, remote_engine.stats.generated_tokens) == (
            local_engine.stats.prompt_tokens, local_engine.stats.generated_tokens)
        assert remote.last_stop_reason == local.last_stop_reason
        assert remote.context_tokens() == local_engine.stats.prompt_tokens + local_engine.stats.generated_tokens
    assert [b["chat_template_kwargs"] for b in bodies] == [{"enable_thinking": t} for _, t in turns]
    # The resent conversation is the server's cached prefix: only the new turn is prefilled.
    assert remote_engine.stats.prefilled_tokens < remote_engine.stats.prompt_tokens / 2


@needs_serve
async def test_the_chat_on_smollm3_serve_stops_mid_answer_and_the_server_is_free(serve_url, local_engine, tmp_path):
    engine = RemoteEngine(serve_url, read_timeout=60)  # a server still writing the story fails, not hangs
    app = make_app(tmp_path, engine, max_new_tokens=4000)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Write a long story about a dragon.", wait=False)
        await wait_for(pilot, lambda: answers(app) and len(answers(app)[0].answer_text) > 20, what="some answer text")
        await pilot.press("escape")
        await settle(pilot, timeout=10)
        stopped = app.chat.session.messages[-1]
        assert stopped.status == "stopped" and engine.stats.generated_tokens < 4000
        app.chat.settings = Settings(GREEDY, 12)
        t0 = time.monotonic()
        await send(pilot, "Thanks. What is 2+2?", timeout=60)
        # The server works on one request at a time: had it kept writing the story, this would wait for it.
        assert time.monotonic() - t0 < 30
        answer = app.chat.session.messages[-1]
        assert answer.status in ("done", "length") and answer.content
    # Token-for-token parity with the local chat is the three-turn test's, where both caches hold the
    # same history. Here the server's cache holds the stopped story as decoded rows while a local
    # session would prefill it in one chunk: the two paths agree to ~1e-6, and where the stop lands
    # decides whether a near-tie of the 135M model flips ("2+2 = ", "2+2 is a", "two and two").
