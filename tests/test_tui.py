"""The chat TUI driven headless with Pilot: against the tiny random SmolLM3 (real generation,
gibberish text), a scripted engine where the text must be known, and SmolLM2-135M once."""

import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import backends
from app.session import ChatMessage
from app.tui.app import ChatApp
from app.tui.chat_log import ChatLog
from app.tui.dialogs import ChoiceScreen, InputScreen
from app.tui.screens import HistoryScreen, SettingsScreen, SystemPromptScreen
from app.tui.status import status_text
from app.tui.store import ChatStore
from app.tui.worker import Settings
from app.tui.widgets import AssistantMessage, LoadingPanel, PromptInput, UserMessage
from backends import SamplingParams
from backends.errors import ResolutionError
from backends.sampling import GREEDY
from test_tui_support import (GenerateSpy, ScriptedEngine, answers, ready, send, settle,
                              thinking_folds_when_the_answer_starts, tiny_engine, wait_for)

SIZE = (100, 32)
THOUGHT_AND_CODE = (
    "<think>\nThe user wants a loop.\n</think>\nHere is **one**:\n\n```python\nfor i in range(3):\n    print(i)\n```\n\nDone."
)


def make_app(tmp_path, engine=None, **kwargs) -> ChatApp:
    engine = engine or tiny_engine()
    kwargs.setdefault("sampling", GREEDY)
    kwargs.setdefault("max_new_tokens", 6)
    kwargs.setdefault("model_label", "tiny")
    return ChatApp(lambda progress: engine, store=ChatStore(tmp_path / "chats.sqlite3"), **kwargs)


def rows(tmp_path, sql="SELECT role, content, status, in_context FROM messages ORDER BY id"):
    with sqlite3.connect(tmp_path / "chats.sqlite3") as db:
        return db.execute(sql).fetchall()


def full_status(app) -> str:
    """The status line as wide as it gets (the one on screen is fitted to the terminal)."""
    chat = app.chat
    return "the model did not load" if chat.load_failed else status_text(chat.engine, chat.context_used, chat.stats, chat.settings, chat.live)



async def test_send_streams_the_reply_and_stores_both_messages(tmp_path, monkeypatch):
    bursts = []
    real_add = AssistantMessage.add_pieces

    async def add_pieces(self, pieces):
        bursts.append(pieces)
        await real_add(self, pieces)

    monkeypatch.setattr(AssistantMessage, "add_pieces", add_pieces)
    app = make_app(tmp_path, max_new_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Hello")
        (widget,) = answers(app)
        content = app.chat.session.messages[-1].content
        assert len(bursts) >= 2, "the reply arrived in one piece, not streamed"
        assert "".join(text for burst in bursts for _, text in burst) == content
        assert widget.answer_text == content and widget.answer.source == content.strip()
        assert [w.text for w in app.query(UserMessage)] == ["Hello"]
        assert rows(tmp_path) == [("user", "Hello", "done", 1), ("assistant", content, "length", 1)]
        status = full_status(app)
        stats = app.chat.engine.stats
        assert f"prefilled {stats.prefilled_tokens} of {stats.prompt_tokens} tok" in status
        assert f"ctx {stats.prompt_tokens + 8}/4096" in status and "tiny-smollm3-F16 · torch cpu" in status


async def test_thinking_toggle_changes_the_next_prompt_and_costs_one_fresh_prefill(tmp_path, monkeypatch):
    engine = tiny_engine()
    spy = GenerateSpy(engine, monkeypatch)
    app = make_app(tmp_path, max_new_tokens=3, thinking=False)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert str(app.query_one("#mode").render()) == "think off"
        await send(pilot, "Hi")
        assert "Reasoning Mode: /no_think" in spy.prompt_text()
        assert spy.prompt_text().endswith("<|im_start|>assistant\n<think>\n\n</think>\n")

        await pilot.press("ctrl+t")
        assert str(app.query_one("#mode").render()) == "THINK ON" and app.chat.session.thinking
        await send(pilot, "Again")
        think = spy.prompt_text()
        assert "Reasoning Mode: /think" in think and think.endswith("<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n")
        mode_at = len(engine.tokenizer.encode(think[: think.index("Reasoning Mode: /") + 17]))
        assert engine.stats.prefilled_tokens >= engine.stats.prompt_tokens - mode_at  # from the metadata on
        assert f"prefilled {engine.stats.prefilled_tokens} of {engine.stats.prompt_tokens}" in full_status(app)

        await send(pilot, "/no_think", wait=False)
        await pilot.pause()
        assert not app.chat.session.thinking and app.chat.query_prompt().text == "" and len(spy.calls) == 2
        await send(pilot, "Third")
        assert "Reasoning Mode: /no_think" in spy.prompt_text()
        first_tokens = len(spy.calls[0][0])
        await send(pilot, "Fourth")  # same mode: a normal turn reuses the cache
        assert engine.stats.prefilled_tokens < engine.stats.prompt_tokens - first_tokens


async def test_escape_stops_mid_answer_and_ctrl_r_continues_it(tmp_path):
    app = make_app(tmp_path, max_new_tokens=3000)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Tell me a long story", wait=False)
        await wait_for(pilot, lambda: answers(app) and len(answers(app)[0].answer_text) > 20, what="some answer text")
        await pilot.press("escape")
        await settle(pilot)
        (widget,) = answers(app)
        message = app.chat.session.messages[-1]
        partial = message.content
        assert message.status == "stopped" and widget.has_class("-stopped")
        assert "stopped" in str(widget.note.render()) and app.chat.engine.stats.generated_tokens < 3000
        assert rows(tmp_path)[-1] == ("assistant", partial, "stopped", 1)
        first_prompt = app.chat.engine.stats.prompt_tokens

        app.chat.settings = Settings(GREEDY, 4)
        await pilot.press("ctrl+r")
        await settle(pilot)
        assert len(answers(app)) == 1 and len(app.chat.session.messages) == 2
        assert message.content.startswith(partial) and len(message.content) > len(partial)
        assert message.status == "length" and widget.answer_text == message.content
        assert rows(tmp_path)[-1] == ("assistant", message.content, "length", 1)
        # The cache held the prompt and the answer so far (a random model's text may tokenize back
        # differently, so some of the answer may be prefilled again).
        assert app.chat.engine.stats.prefilled_tokens <= app.chat.engine.stats.prompt_tokens - first_prompt


async def test_new_chat_starts_empty_and_is_stored_apart(tmp_path):
    app = make_app(tmp_path, max_new_tokens=2)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "First chat")
        first = app.chat.chat_id
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.chat.session.messages == [] and app.chat.chat_id is None
        assert not answers(app) and not list(app.query(UserMessage))
        assert "ctx 0/4096" in full_status(app)
        await send(pilot, "Second chat")
        assert app.chat.chat_id != first and len(answers(app)) == 1
    assert rows(tmp_path, "SELECT title FROM chats ORDER BY id") == [("First chat",), ("Second chat",)]


KILLED_APP = """
import sys
sys.path.insert(0, {tests!r})
from app.tui.app import ChatApp
from app.tui.store import ChatStore
from backends.sampling import GREEDY
from test_tui_support import tiny_engine

async def auto_pilot(pilot):
    while pilot.app.chat.engine is None:
        await pilot.pause(0.05)
    await pilot.pause(0.2)
    prompt = pilot.app.chat.query_prompt()
    prompt.load_text("Remember this question")
    await pilot.press("enter")
    while True:
        await pilot.pause(0.1)

engine = tiny_engine()
app = ChatApp(lambda progress: engine, store=ChatStore({db!r}), sampling=GREEDY, max_new_tokens=2000)
app.run(headless=True, auto_pilot=auto_pilot)
"""


async def test_resume_after_the_app_is_killed_mid_answer(tmp_path):
    db = tmp_path / "chats.sqlite3"
    script = KILLED_APP.format(tests=str(Path(__file__).parent), db=str(db))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 120
        saved = []
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if db.exists():
                try:
                    saved = rows(tmp_path, "SELECT content FROM messages WHERE role = 'assistant' AND content != ''")
                except sqlite3.OperationalError:
                    saved = []  # the schema is being created
            if saved:
                break
        assert saved, f"no partial answer was saved (exit code {proc.poll()})"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    (user,), (assistant,) = rows(tmp_path, "SELECT content, status FROM messages WHERE role = 'user'"), rows(
        tmp_path, "SELECT content, status FROM messages WHERE role = 'assistant'"
    )
    assert user == ("Remember this question", "done") and assistant[1] == "streaming" and assistant[0]

    app = make_app(tmp_path, resume=True, max_new_tokens=3)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: answers(app), what="the resumed chat")
        assert [w.text for w in app.query(UserMessage)] == ["Remember this question"]
        (widget,) = answers(app)
        assert widget.answer_text == assistant[0] and "interrupted" in str(widget.note.render())
        assert [m.content for m in app.chat.session.messages] == ["Remember this question", assistant[0]]
        assert app.chat.query_prompt().inputs[-1] == "Remember this question"  # Up recalls it
        await pilot.press("ctrl+r")
        await settle(pilot)
        assert app.chat.session.messages[-1].content.startswith(assistant[0])
        assert rows(tmp_path)[-1][2] == "length"


async def test_auto_scroll_follows_the_answer_only_while_the_view_is_at_the_bottom(tmp_path):
    engine = ScriptedEngine(["line\n\n" * 60], delay=0.03)
    app = make_app(tmp_path, engine, max_new_tokens=500)
    async with app.run_test(size=(80, 20)) as pilot:
        await ready(pilot)
        await send(pilot, "Lines", wait=False)
        log = app.chat.log_view
        await wait_for(pilot, lambda: log.max_scroll_y > 5, what="an answer taller than the view")
        await pilot.pause(0.1)
        assert log.scroll_y == log.max_scroll_y  # following
        log.scroll_home(animate=False)  # the reader scrolls up
        height = log.max_scroll_y
        await wait_for(pilot, lambda: log.max_scroll_y > height + 5, what="more lines")
        assert log.scroll_y == 0  # left where the reader put it
        log.scroll_end(animate=False)  # back at the bottom: following again
        await settle(pilot)
        await pilot.pause(0.1)
        assert log.max_scroll_y > height + 10 and log.scroll_y == log.max_scroll_y


async def test_an_unanswered_message_in_a_resumed_chat_is_answered_on_ctrl_r(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    chat = store.create_chat("Dangling")
    store.add_message(chat, ChatMessage("user", "Sent, then the app died"))
    store.add_message(chat, ChatMessage("assistant", "", "streaming"))  # killed before its first token
    store.close()
    app = make_app(tmp_path, ScriptedEngine(["Answered."]), resume=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: list(app.query(UserMessage)), what="the resumed chat")
        assert not answers(app) and app.chat.session.messages[-1].role == "user"
        await pilot.press("ctrl+r")
        await settle(pilot)
        assert [m.content for m in app.chat.session.messages] == ["Sent, then the app died", "Answered."]
    assert rows(tmp_path) == [("user", "Sent, then the app died", "done", 1), ("assistant", "Answered.", "done", 1)]


async def test_markdown_export_of_a_chat(tmp_path):
    engine = ScriptedEngine([THOUGHT_AND_CODE])
    app = make_app(tmp_path, engine, thinking=True, max_new_tokens=100)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        app.chat.set_system_prompt("Be brief.")
        await send(pilot, "Show me a loop")
        out = tmp_path / "loop.md"
        await send(pilot, f"/export {out}")
    assert out.read_text() == textwrap.dedent(
        """\
        # Show me a loop

        **System prompt:**

        > Be brief.

        ## You

        Show me a loop

        ## SmolLM

        <details><summary>Thinking</summary>

        The user wants a loop.

        </details>

        Here is **one**:

        ```python
        for i in range(3):
            print(i)
        ```

        Done.
        """
    )


async def test_thinking_streams_into_its_own_block_folded_when_the_answer_starts(tmp_path):
    engine = ScriptedEngine([THOUGHT_AND_CODE, "<think>\n\n</think>\nNo thought."], delay=0.05)
    app = make_app(tmp_path, engine, thinking=True, max_new_tokens=100)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Show me a loop", wait=False)
        widget = await thinking_folds_when_the_answer_starts(pilot, app)
        assert widget.thinking_block.body.source == "The user wants a loop."
        # The fence is whole after the final render.
        assert widget.answer.source.endswith("```python\nfor i in range(3):\n    print(i)\n```\n\nDone.")
        assert widget.query("MarkdownFence")

        await send(pilot, "Again")  # an empty think block is not shown
        assert answers(app)[1].thinking_block is None and answers(app)[1].answer_text.strip() == "No thought."


async def test_copy_message_and_code_blocks(tmp_path):
    two = "Two blocks:\n\n```sh\nls\n```\n\nand\n\n```python\nprint(2)\n```\n"
    engine = ScriptedEngine([THOUGHT_AND_CODE, two])
    app = make_app(tmp_path, engine, max_new_tokens=100)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Loop?")
        answers(app)[0].focus()
        await pilot.press("b")
        assert app.clipboard == "for i in range(3):\n    print(i)\n"
        await pilot.press("c")
        assert app.clipboard.startswith("Here is **one**:") and "<think>" not in app.clipboard
        await send(pilot, "More")
        await pilot.press("ctrl+b")
        await pilot.pause()
        assert app.screen.__class__.__name__ == "CodeBlockScreen"
        await pilot.press("down", "enter")
        await pilot.pause()
        assert app.clipboard == "print(2)\n"


async def test_context_full_offers_to_drop_the_oldest_turns(tmp_path):
    engine = ScriptedEngine(["Short answer."])
    app = make_app(tmp_path, engine, max_new_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "One")
        await send(pilot, "Two")
        engine.config = type(engine.config)(**{**engine.config.__dict__, "context_length": len(app.chat.session.prompt_ids()) + 4})
        await send(pilot, "Three is a longer message than the room left")
        await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen), what="the context-full dialog")
        assert "Context full" in str(app.screen.query_one(".dialog-title").render())
        assert len(answers(app)) == 2  # the empty answer was removed, the user's message kept
        await pilot.pause(ChoiceScreen.ARM_S)
        await pilot.press("d")
        await settle(pilot)
        assert [m.content for m in app.chat.session.messages][-2:] == ["Three is a longer message than the room left", "Short answer."]
        dropped = [w for w in app.query(".dropped")]
        assert dropped and all(w.border_subtitle == "not in context" for w in dropped)
        assert ("user", "One", "done", 0) in rows(tmp_path)
        assert rows(tmp_path)[-1] == ("assistant", "Short answer.", "done", 1)


async def test_context_full_mid_answer_stops_it_and_says_so(tmp_path):
    engine = ScriptedEngine(["word " * 50])
    app = make_app(tmp_path, engine, max_new_tokens=100)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        prompt = engine.tokenizer.encode(app.chat.session.render(messages=[ChatMessage("user", "Hi")]))
        engine.config = type(engine.config)(**{**engine.config.__dict__, "context_length": len(prompt) + 10})
        await send(pilot, "Hi")
        assert app.chat.stats.generated_tokens == 10
        assert app.chat.session.messages[-1].status == "context"
        assert "context is full" in str(answers(app)[0].note.render())
        assert isinstance(app.screen, ChoiceScreen)
        await pilot.pause(ChoiceScreen.ARM_S)
        await pilot.press("c")
        await pilot.pause()
        assert not isinstance(app.screen, ChoiceScreen)


async def test_drop_command_takes_the_oldest_turn_out_of_the_prompt(tmp_path):
    engine = ScriptedEngine(["First answer.", "Second answer.", "Third answer."])
    app = make_app(tmp_path, engine, max_new_tokens=20)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Turn one")
        await send(pilot, "Turn two")
        await send(pilot, "/drop")
        assert [m.content for m in app.chat.session.messages] == ["Turn two", "Second answer."]
        assert len(app.query(".dropped")) == 2
        await send(pilot, "Turn three")
        assert "Turn one" not in engine.prompt_text() and "Turn two" in engine.prompt_text()
    assert [r[3] for r in rows(tmp_path)] == [0, 0, 1, 1, 1, 1]


async def test_quitting_mid_answer_keeps_what_was_generated(tmp_path):
    engine = ScriptedEngine(["word " * 200], delay=0.05)
    app = make_app(tmp_path, engine, max_new_tokens=500)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Go on and on", wait=False)
        await wait_for(pilot, lambda: answers(app) and len(answers(app)[0].answer_text) > 20, what="some answer text")
        await pilot.press("ctrl+q")
    content, status = rows(tmp_path, "SELECT content, status FROM messages WHERE role = 'assistant'")[0]
    assert status == "stopped" and content.startswith("word word word") and app.return_value == 0


def notices(app) -> list[str]:
    return [f"{n.title}: {n.message}" for n in app._notifications]


async def test_ctrl_c_stops_the_answer_first_and_keeps_it(tmp_path):
    engine = ScriptedEngine(["word " * 200], delay=0.05)
    app = make_app(tmp_path, engine, max_new_tokens=500)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Go on and on", wait=False)
        await wait_for(pilot, lambda: answers(app) and len(answers(app)[0].answer_text) > 20, what="some answer text")
        await pilot.press("ctrl+c")
        await settle(pilot)
        message = app.chat.session.messages[-1]
        assert message.status == "stopped" and message.content.startswith("word word word")
        assert app.chat.engine.stats.generated_tokens < 200 and answers(app)[0].has_class("-stopped")
        assert rows(tmp_path)[-1] == ("assistant", message.content, "stopped", 1)
        assert app.return_value is None and "Stopped: Press Ctrl+C again to quit" in notices(app)
        app.clear_notifications()
        await pilot.press("ctrl+r")  # still running: the answer goes on
        await wait_for(pilot, lambda: app.chat.generating, what="the continued answer")
        await pilot.press("escape")
        await settle(pilot)
    assert app.return_value is None


async def test_ctrl_c_when_idle_quits_on_the_second_press(tmp_path):
    app = make_app(tmp_path, ScriptedEngine(["Sent and answered."]), max_new_tokens=20)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Keep this")
        app.chat.query_prompt().load_text("a draft")
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert app.return_value is None and app.is_running
        assert notices(app) == [": Press Ctrl+C again to quit (the unsent text in the input box is not kept)"]
        await pilot.press("ctrl+c")
    assert app.return_value == 0
    assert rows(tmp_path) == [("user", "Keep this", "done", 1), ("assistant", "Sent and answered.", "done", 1)]


async def test_ctrl_c_after_the_window_is_a_first_press_again_and_copies_a_selection(tmp_path):
    app = make_app(tmp_path, ScriptedEngine(["x"]))
    app.QUIT_WINDOW_S = 0.3
    said = []
    real_notify = app.notify
    app.notify = lambda message, **kw: said.append(message) or real_notify(message, **kw)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+c")
        await pilot.pause(0.5)  # past the window
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert app.return_value is None and app.is_running and said == ["Press Ctrl+C again to quit"] * 2
        await pilot.pause(0.5)
        prompt = app.chat.query_prompt()
        prompt.load_text("copy me")
        prompt.select_all()
        await pilot.press("ctrl+c")  # a selection is copied, as the input's own Ctrl+C did
        assert app.clipboard == "copy me" and app.return_value is None
        await pilot.press("ctrl+c")
    assert app.return_value == 0


async def test_only_the_newest_messages_stay_on_screen_and_the_chat_keeps_them_all(tmp_path, monkeypatch):
    monkeypatch.setattr(ChatLog, "MAX_SHOWN_MESSAGES", 4)
    app = make_app(tmp_path, ScriptedEngine(["Answer."]))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        for turn in range(4):
            await send(pilot, f"Question {turn}")
        note = app.query_one("#hidden-note")
        assert [w.text for w in app.query(UserMessage)] == ["Question 2", "Question 3"] and len(answers(app)) == 2
        assert note.display and str(note.render()).startswith("4 earlier messages not shown")
        assert len(app.chat.log_view.widgets_by_id) == 4 and len(app.chat.session.messages) == 8
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert not note.display
    assert len(rows(tmp_path)) == 8

    monkeypatch.setattr(ChatLog, "MAX_SHOWN_MESSAGES", 3)
    app = make_app(tmp_path, ScriptedEngine(["Answer."]), resume=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: answers(app), what="the resumed chat")
        assert [w.text for w in app.query(UserMessage)] == ["Question 3"] and len(answers(app)) == 2
        assert str(app.query_one("#hidden-note").render()).startswith("5 earlier messages not shown")
        assert len(app.chat.session.messages) == 8  # all of them still in the context


async def test_the_footer_does_not_keep_the_keys_it_replaces(tmp_path):
    import gc

    from textual.widgets._footer import FooterKey

    app = make_app(tmp_path, ScriptedEngine(["x"]))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        for _ in range(20):  # as every answer does, twice
            app.refresh_bindings()
            await pilot.pause()
        gc.collect()
        alive = [o for o in gc.get_objects() if type(o) is FooterKey]
        assert len(alive) == len(app.query(FooterKey))


async def test_loading_shows_progress_lines_and_printed_download_bars_and_a_message_can_wait(tmp_path):
    import threading

    go = threading.Event()
    engine = ScriptedEngine(["Loaded and answered."])

    def factory(progress):
        progress("loading SmolLM 3b...")
        print("model.gguf:  10%|#         | 0.3G/3.2G\rmodel.gguf:  42%|####2     | 1.4G/3.2G\x1b[A", file=sys.stderr)
        go.wait(30)
        return engine

    app = ChatApp(factory, store=ChatStore(tmp_path / "chats.sqlite3"), model_label="SmolLM 3b")
    async with app.run_test(size=SIZE) as pilot:
        panel = app.query_one(LoadingPanel)
        step = lambda: str(panel.query_one("#loading-step").render())  # noqa: E731
        await wait_for(pilot, lambda: "42%" in step(), what="the bar")
        assert step() == "model.gguf:  42%|####2     | 1.4G/3.2G"
        assert "Loading SmolLM 3b" in str(panel.query_one("#loading-title").render())
        await send(pilot, "Typed while loading", wait=False)  # kept, answered once loaded
        await pilot.pause()
        assert [w.text for w in app.query(UserMessage)] == ["Typed while loading"] and not answers(app)
        assert rows(tmp_path) == [("user", "Typed while loading", "done", 1)]
        go.set()
        await ready(pilot)
        await settle(pilot)
        assert app.chat.session.messages[-1].content == "Loaded and answered."
        assert "ctx " in full_status(app)


async def test_load_errors_are_shown_with_what_to_do(tmp_path):
    def fail(progress):
        progress("downloading…")
        raise ResolutionError("unsloth/SmolLM3-3B-GGUF/SmolLM3-3B-Q8_0.gguf is not in the Hugging Face cache and the Hub cannot be reached (offline?)")

    app = ChatApp(fail, store=ChatStore(tmp_path / "chats.sqlite3"), model_label="3b q8_0")
    async with app.run_test(size=SIZE) as pilot:
        panel = app.query_one(LoadingPanel)
        await wait_for(pilot, lambda: panel.failed, what="the error")
        assert "Could not load 3b q8_0" in str(panel.query_one("#loading-title").render())
        assert "Hub cannot be reached" in str(panel.query_one("#loading-error").render())
        assert "--model-path" in str(panel.query_one("#loading-hint").render())
        assert full_status(app) == "the model did not load"
        await pilot.press("ctrl+q")
    assert app.return_value == 2

    app = ChatApp(lambda p: 1 / 0, store=ChatStore(tmp_path / "chats.sqlite3"))
    async with app.run_test(size=SIZE) as pilot:
        panel = app.query_one(LoadingPanel)
        await wait_for(pilot, lambda: panel.failed, what="the error")
        assert "internal error: ZeroDivisionError" in str(panel.query_one("#loading-error").render())


async def test_settings_screen_validates_and_applies_to_the_next_answer(tmp_path, monkeypatch):
    spy = GenerateSpy(tiny_engine(), monkeypatch)
    app = make_app(tmp_path, sampling=SamplingParams(temperature=0.8, seed=5), max_new_tokens=3)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#temperature").value = "hot"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "Temperature: 'hot' is not a number" in str(app.screen.query_one("#settings-error").render())
        app.screen.query_one("#temperature").value = "0.3"
        app.screen.query_one("#top_p").value = "1.5"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "Top-p must be in (0, 1]" in str(app.screen.query_one("#settings-error").render())
        app.screen.query_one("#top_p").value = "0.9"
        app.screen.query_one("#top_k").value = "40"
        app.screen.query_one("#max_new_tokens").value = "2"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert not isinstance(app.screen, SettingsScreen)
        await send(pilot, "Hi")
        _, max_new_tokens, sampling = spy.calls[-1]
        assert max_new_tokens == 2 and sampling == SamplingParams(temperature=0.3, top_p=0.9, top_k=40, seed=5)


async def test_system_prompt_can_be_edited_at_any_time(tmp_path, monkeypatch):
    spy = GenerateSpy(tiny_engine(), monkeypatch)
    app = make_app(tmp_path, max_new_tokens=2)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Hi")
        await pilot.press("ctrl+g")
        await pilot.pause()
        assert isinstance(app.screen, SystemPromptScreen)
        app.screen.query_one("#system-text").load_text("Answer in French.")
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert str(app.query_one("#system-view").render()) == "Answer in French."
        await send(pilot, "Again")
        assert "## Custom Instructions\n\nAnswer in French." in spy.prompt_text()
        # The system block changed: the conversation is prefilled again from the change on.
        text = spy.prompt_text()
        unchanged = len(app.chat.engine.tokenizer.encode(text[: text.index("Answer in French.")]))
        # (+1: cutting the text there may split what is one token in the whole prompt)
        assert app.chat.engine.stats.prefilled_tokens + 1 >= app.chat.engine.stats.prompt_tokens - unchanged
    assert rows(tmp_path, "SELECT system_prompt FROM chats") == [("Answer in French.",)]


async def test_history_screen_opens_renames_and_deletes_chats(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    a = store.create_chat("About cats")
    store.add_message(a, ChatMessage("user", "Cats?"))
    store.add_message(a, ChatMessage("assistant", "Cats are **great**."))
    b = store.create_chat("About [b]dogs[/b]")
    store.add_message(b, ChatMessage("user", "Dogs?"))
    store.close()
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("ctrl+o")
        await pilot.pause()
        assert isinstance(app.screen, HistoryScreen)
        table = app.screen.query_one("#chats")
        assert table.row_count == 2 and str(table.get_row_at(0)[0]) == "About [b]dogs[/b]"
        assert "[b]dogs[/b]" in app.export_screenshot()  # shown as typed, not taken for markup
        await pilot.press("r")
        await pilot.pause()
        assert isinstance(app.screen, InputScreen)
        app.screen.query_one("#value").value = "Dogs, renamed"
        await pilot.press("enter")
        await pilot.pause()
        assert str(table.get_row_at(0)[0]) == "Dogs, renamed"
        await pilot.press("d")
        await pilot.pause(ChoiceScreen.ARM_S)
        await pilot.press("y")
        await pilot.pause()
        assert table.row_count == 1
        await pilot.press("enter")
        await wait_for(pilot, lambda: answers(app), what="the opened chat")
        assert app.chat.chat_id == a and [m.content for m in app.chat.session.messages] == ["Cats?", "Cats are **great**."]
        assert answers(app)[0].answer.source == "Cats are **great**."
    assert rows(tmp_path, "SELECT title FROM chats") == [("About cats",)]


async def test_multiline_input_and_input_history(tmp_path):
    app = make_app(tmp_path, max_new_tokens=1)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        prompt = app.query_one(PromptInput)
        await pilot.press("a", "shift+enter", "b", "ctrl+j", "c")
        assert prompt.text == "a\nb\nc" and not app.chat.session.messages
        await pilot.press("enter")
        await settle(pilot)
        assert app.chat.session.messages[0].content == "a\nb\nc" and prompt.text == ""
        await send(pilot, "second")
        await pilot.press("x")
        await pilot.press("up")
        assert prompt.text == "second"
        await pilot.press("up")
        assert prompt.text == "a\nb\nc" and prompt.cursor_location[0] == 0
        await pilot.press("down")  # from the first line of three: moves the cursor, not the history
        assert prompt.text == "a\nb\nc"
        await pilot.press("down", "down")
        assert prompt.text == "second"
        await pilot.press("down")
        assert prompt.text == "x"  # the draft is back


async def test_command_palette_toggles_thinking(tmp_path):
    app = make_app(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert not app.chat.session.thinking
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Toggle thinking")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.session.thinking, what="thinking on")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for title in ("New chat", "Continue the answer", "Chats", "Settings", "Edit system prompt", "Export chat as Markdown", "Copy code block"):
            assert title in titles


def test_status_text_names_model_backend_context_and_speeds():
    engine = ScriptedEngine(["x"])
    stats = backends.GenerationStats(prompt_tokens=400, prefilled_tokens=12, prefill_s=0.1, generated_tokens=30, decode_steps=29, decode_s=2.0)
    assert status_text(engine, 430, stats) == (
        "ctx 430/4096 · prefilled 12 of 400 tok, 120 tok/s · generated 30, 14.5 tok/s · SmolLM3-3B-Q4_K_M · torch cpu"
    )
    assert status_text(None, 0, None) == "loading the model…"


async def test_smollm2_answers_and_the_second_turn_prefills_only_the_new_turn(tmp_path, smollm2_gguf):
    engine = backends.load(smollm2_gguf)
    app = make_app(tmp_path, engine, max_new_tokens=12)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Name the capital of France.", timeout=300)
        assert "Paris" in answers(app)[0].answer.source
        first = app.chat.stats
        assert first.stop_reason == "eos" and app.chat.session.messages[-1].status == "done"
        app.chat.settings = Settings(GREEDY, 3)
        await send(pilot, "And of Italy?", timeout=300)
        second = app.chat.stats
        new_turn = engine.tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")
        assert second.prefilled_tokens == len(new_turn) == second.prompt_tokens - first.prompt_tokens - first.generated_tokens
        assert f"prefilled {len(new_turn)} of {second.prompt_tokens} tok" in full_status(app)


# --- issue 10's defects ---

POEM = "The sea is wide,\nthe sea is deep,\nit sings by day\nand rocks to sleep."


def shown_lines(markdown) -> list[str]:
    """The lines the Markdown widget's paragraphs show."""
    return [line for p in markdown.query("MarkdownParagraph") for line in str(p.render()).splitlines()]


async def test_line_breaks_are_kept_while_streaming_and_after(tmp_path):
    engine = ScriptedEngine([POEM + "\n\n```\nkeep\n  as is\n```"], delay=0.1)
    app = make_app(tmp_path, engine, max_new_tokens=100)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Write a short poem about the sea, four lines.", wait=False)
        await wait_for(pilot, lambda: answers(app) and "it sings" in answers(app)[0].answer_text, what="three lines")
        await pilot.pause(0.2)
        assert shown_lines(answers(app)[0].answer)[:2] == ["The sea is wide,", "the sea is deep,"]
        await settle(pilot)
        widget = answers(app)[0]
        assert shown_lines(widget.answer) == POEM.splitlines()
        assert widget.query_one("MarkdownFence")._highlighted_code.plain == "keep\n  as is"


async def test_an_answer_stopped_inside_a_code_fence_is_closed_on_screen_and_in_the_export(tmp_path):
    engine = ScriptedEngine(["Here:\n\n```python\nprint(1)\n"])
    app = make_app(tmp_path, engine, max_new_tokens=100)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Code?")
        assert answers(app)[0].answer.source == "Here:\n\n```python\nprint(1)\n```"
        out = tmp_path / "[chat].md"
        await send(pilot, f"/export {out}")
        assert f": Exported to {out}" in notices(app)  # the brackets shown, not taken for markup
    assert "```python\nprint(1)\n```\n" in out.read_text()


async def test_a_dialog_that_opens_while_the_user_types_keeps_the_keys_for_the_input(tmp_path, monkeypatch):
    monkeypatch.setattr(ChoiceScreen, "ARM_S", 3.0)  # a loaded test machine types slower than a person
    engine = ScriptedEngine(["Short answer."])
    app = make_app(tmp_path, engine, max_new_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "One")
        chat = app.chat.chat_id
        engine.config = type(engine.config)(**{**engine.config.__dict__, "context_length": len(app.chat.session.prompt_ids()) + 4})
        await send(pilot, "A longer message than the room left", wait=False)
        await pilot.press(*"Hello again")  # typing on as the dialog opens
        await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen), what="the context-full dialog")
        await pilot.press(*" and more", "enter")
        await settle(pilot)
        assert isinstance(app.screen, ChoiceScreen) and app.chat.chat_id == chat
        labels = [str(b.label) for b in app.screen.query("Button")]
        assert labels == ["Drop oldest turns [d]", "New chat [n]", "Cancel [c]"]
        assert app.chat.query_prompt().text == "Hello again and more"
        await pilot.pause(ChoiceScreen.ARM_S)
        await pilot.press("n")  # now it is a choice: the message that did not fit moves to a new chat
        await wait_for(pilot, lambda: app.chat.chat_id is None, what="the new chat")
        assert app.chat.query_prompt().text == "A longer message than the room left\nHello again and more"
    assert [r[1] for r in rows(tmp_path)] == ["One", "Short answer.", "A longer message than the room left"]


async def test_the_status_line_never_shows_another_chats_numbers(tmp_path):
    engine = ScriptedEngine(["Short answer."])
    app = make_app(tmp_path, engine, max_new_tokens=8)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "One")
        await pilot.press("ctrl+n")
        engine.config = type(engine.config)(**{**engine.config.__dict__, "context_length": 40})
        await send(pilot, "A message that does not fit the tiny context of forty tokens at all")
        await wait_for(pilot, lambda: isinstance(app.screen, ChoiceScreen), what="the context-full dialog")
        assert app.chat.stats is None and "prefilled" not in full_status(app)
        assert app.chat.context_used == app.chat.session.context_tokens() > 40
        assert f"ctx {app.chat.context_used}/40" in full_status(app)


async def test_help_is_a_screen_that_stays_until_closed(tmp_path):
    from app.tui.dialogs import HelpScreen

    app = make_app(tmp_path, ScriptedEngine(["x"]))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "/help")
        assert isinstance(app.screen, HelpScreen)
        import io

        from rich.console import Console

        console = Console(width=80, record=True, file=io.StringIO())
        console.print(app.screen.table())
        text = console.export_text()
        for shown in ("/system [text]", "/export [file.md]", "Ctrl+T", "thinking on or off", "Ctrl+O", "Shift+Enter"):
            assert shown in text
        await pilot.pause(0.5)
        assert isinstance(app.screen, HelpScreen) and not app._notifications
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_thinking_on_a_model_without_thinking_mode_says_so_once(tmp_path):
    app = make_app(tmp_path, ScriptedEngine(["x"]), use_template=False, thinking=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert notices(app) == [": This model has no thinking mode (its chat template has none): it answers directly"]
        assert not app.chat.thinking and str(app.query_one("#mode").render()) == "no thinking mode"
        app.clear_notifications()
        await pilot.press("ctrl+t")
        await pilot.pause()
        assert len(notices(app)) == 1 and "no thinking mode" in notices(app)[0]
        assert not app.chat.thinking and "THINK ON" not in str(app.query_one("#mode").render())


# --- issue 10's friction ---


def test_the_worker_posts_prefill_progress_per_chunk_and_live_speeds(tmp_path):
    from app.session import ChatSession
    from app.tui.messages import Finished, Pieces, PrefillProgress
    from app.tui.worker import generate_reply
    engine = ScriptedEngine(["one two three four five"])
    session = ChatSession(engine)
    session.messages.append(ChatMessage("user", "word " * 1200))
    prompt = session.prompt_ids()
    total = len(prompt)
    posted = []
    generate_reply(session, Settings(GREEDY, 50), False, posted.append, lambda: False)
    progress = [(m.done, m.total) for m in posted if isinstance(m, PrefillProgress)]
    assert progress[0] == (0, total) and progress[-1] == (total, total) and total > 2 * engine.prefill_chunk
    calls = []
    engine.prefill(prompt, progress=lambda done, todo: calls.append((done, todo)))
    assert calls == [(0, 1), (1, 1)]  # all but the last token from the cache
    pieces = [m for m in posted if isinstance(m, Pieces)]
    assert pieces[-1].generated == engine.stats.generated_tokens and pieces[-1].tok_s == engine.stats.decode_tok_s
    assert pieces[-1].context == total + engine.stats.generated_tokens
    assert isinstance(posted[-1], Finished) and posted[-1].stats.prompt_tokens == total


async def test_prefill_progress_and_live_speed_show_while_answering(tmp_path):
    engine = ScriptedEngine(["word " * 30], delay=0.15)
    app = make_app(tmp_path, engine, max_new_tokens=100)
    seen = []
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "long " * 1100, wait=False)
        await wait_for(pilot, lambda: seen.append(app.chat.live) or (app.chat.generating and "tok/s" in app.chat.live), what="a live speed")
        assert app.chat.context_used > 1100  # the prompt and the answer so far
        await settle(pilot)
    assert any(re.fullmatch(r"prefill \d+/\d+ tok", s) for s in seen)
    assert app.chat.live == ""


async def test_welcome_line_until_the_first_message(tmp_path):
    app = make_app(tmp_path, ScriptedEngine(["Hi."]))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        welcome = app.query_one("#welcome")
        assert welcome.display and "SmolLM3-3B-Q4_K_M on torch cpu" in str(welcome.render()) and "/help" in str(welcome.render())
        await send(pilot, "Hello")
        assert not welcome.display
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert welcome.display


def test_the_status_line_fits_by_priority_at_every_width():
    from app.tui.status import device_name

    engine = ScriptedEngine(["x"])
    stats = backends.GenerationStats(prompt_tokens=4000, prefilled_tokens=3012, prefill_s=10, generated_tokens=300, decode_steps=299, decode_s=20.0)
    settings = Settings(SamplingParams(temperature=0.6, top_p=0.95, top_k=40), 1000)
    for width in range(60, 160):
        line = status_text(engine, 4312, stats, settings, width=width)
        assert len(line) <= width and line.startswith("ctx 4312/4096 · ") and "…" not in line
        assert "14.9 tok/s" in line  # the generation speed goes last
    assert status_text(engine, 4312, stats, settings, width=160).endswith("torch cpu · temp 0.6, top-p 0.95, top-k 40, max 1000")
    assert status_text(engine, 4312, stats, settings, width=80) == "ctx 4312/4096 · 300 tok 14.9 tok/s · SmolLM3-3B-Q4_K_M"
    assert status_text(engine, 4312, stats, settings, width=50) == "ctx 4312/4096 · 300 tok 14.9 tok/s"
    engine.info = backends.engine.EngineInfo("mlx", "Device(gpu, 0)", "bf16", "m.gguf", "Q4_0")
    assert device_name(engine) == "mlx gpu"


async def test_the_footer_labels_ctrl_c_as_it_acts(tmp_path):
    engine = ScriptedEngine(["word " * 100], delay=0.05)
    app = make_app(tmp_path, engine, max_new_tokens=200)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        label = lambda: app.screen.active_bindings["ctrl+c"].binding.description  # noqa: E731
        assert label() == "Quit"
        await send(pilot, "Go", wait=False)
        await wait_for(pilot, lambda: app.chat.generating, what="the answer")
        assert label() == "Stop"
        await pilot.press("ctrl+c")
        await settle(pilot)
        assert label() == "Quit" and app.return_value is None


async def test_the_chat_list_starts_on_the_previous_chat(tmp_path):
    app = make_app(tmp_path, ScriptedEngine(["Answer."]))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "First chat")
        first = app.chat.chat_id
        await pilot.press("ctrl+n")
        await send(pilot, "Second chat")
        await pilot.press("ctrl+o")
        await pilot.pause()
        table = app.screen.query_one("#chats")
        assert str(table.get_row_at(table.cursor_row)[0]) == "First chat"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.chat_id == first, what="the first chat")


async def test_settings_are_stored_per_chat_and_as_defaults(tmp_path):
    app = make_app(tmp_path, ScriptedEngine(["Answer."]), max_new_tokens=6)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "A chat")
        app.chat.set_system_prompt("Be terse.")
        await pilot.press("ctrl+s")
        await pilot.pause()
        app.screen.query_one("#temperature").value = "0.7"
        app.screen.query_one("#top_k").value = "20"
        app.screen.query_one("#max_new_tokens").value = "9"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert "temp 0.7, top-k 20, max 9" in full_status(app)
    saved = Settings(SamplingParams(temperature=0.7, top_k=20, repeat_penalty=GREEDY.repeat_penalty), 9)
    app = make_app(tmp_path, ScriptedEngine(["Answer."]), max_new_tokens=6)  # a new start: the defaults are back
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.chat.settings == saved and app.chat.session.system_prompt == "Be terse."
    store = ChatStore(tmp_path / "chats.sqlite3")
    store.set_default("settings", None)
    store.set_default("system_prompt", None)
    store.close()
    app = make_app(tmp_path, ScriptedEngine(["Answer."]), max_new_tokens=6)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert app.chat.settings.max_new_tokens == 6  # the command line's, with no defaults stored
    app = make_app(tmp_path, ScriptedEngine(["Answer."]), max_new_tokens=6, resume=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: app.chat.chat_id is not None, what="the resumed chat")
        assert app.chat.settings == saved  # the chat's own


async def test_flags_given_on_the_command_line_win_over_saved_settings(tmp_path):
    store = ChatStore(tmp_path / "chats.sqlite3")
    store.set_default("settings", {"temperature": 0.7, "top_p": None, "top_k": 20, "max_new_tokens": 9})
    store.set_default("system_prompt", "Be terse.")
    chat_id = store.create_chat("Old", "Be terse.", False, "tiny")
    store.set_settings(chat_id, {"temperature": 0.5, "top_p": None, "top_k": 20, "max_new_tokens": 9})
    store.close()
    flags = {"temperature": 0.0, "max_new_tokens": 4}
    app = make_app(tmp_path, ScriptedEngine(["Answer."]), flag_settings=flags, system_prompt="Answer in French.")
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        s = app.chat.settings
        assert (s.sampling.temperature, s.sampling.top_k, s.max_new_tokens) == (0.0, 20, 4)  # top-k: saved
        assert app.chat.session.system_prompt == "Answer in French."
        await app.chat.open_chat(chat_id)
        s = app.chat.settings
        assert (s.sampling.temperature, s.max_new_tokens) == (0.0, 4)  # over the stored chat's own too
        assert app.chat.session.system_prompt == "Be terse."  # a stored chat keeps its own


async def test_regenerate_and_edit_reuse_the_cache_up_to_the_change(tmp_path):
    engine = ScriptedEngine(["First answer.", "Second answer.", "Third answer."])
    app = make_app(tmp_path, engine, max_new_tokens=20)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await send(pilot, "Tell me something")
        await send(pilot, "/retry")
        assert [m.content for m in app.chat.session.messages] == ["Tell me something", "Second answer."]
        assert len(answers(app)) == 1 and answers(app)[0].answer.source == "Second answer."
        assert engine.prompts[1] == engine.prompts[0] and engine.stats.prefilled_tokens == 1  # all from the cache
        await send(pilot, "/edit")
        assert app.chat.query_prompt().text == "Tell me something" and app.chat.session.messages == []
        assert not answers(app) and not list(app.query(UserMessage))
        await send(pilot, "Tell me something else")
        assert app.chat.session.messages[-1].content == "Third answer."
        common = next(i for i, (a, b) in enumerate(zip(engine.prompts[1], engine.prompts[2])) if a != b)
        assert engine.stats.prefilled_tokens == engine.stats.prompt_tokens - common
    assert [r[1] for r in rows(tmp_path)] == ["Tell me something else", "Third answer."]
