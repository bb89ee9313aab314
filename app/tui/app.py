"""The chat TUI: one screen of messages over an input box, a status line and the key bindings.

Generation runs in a thread worker (`_generate`) that owns the engine while it runs: it feeds
the session's text stream through a ThinkingSplitter, posts the pieces in merged bursts
(`Pieces`, at most every BURST_S), checks `worker.is_cancelled` after every token, and ends
with one `Finished`. Everything else (widgets, the SQLite store) happens on the UI thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Static
from textual.worker import get_current_worker

from backends import Engine, GenerationStats, SamplingParams, SmolLMError
from backends.errors import ContextOverflow

from ..session import ChatSession, ThinkingSplitter, split_thinking
from .export import chat_markdown
from .screens import (
    ChoiceScreen,
    CodeBlockScreen,
    HistoryScreen,
    InputScreen,
    Settings,
    SettingsScreen,
    SystemPromptScreen,
    error_hint,
)
from .store import ChatStore, StoreError
from .widgets import (
    CONTINUABLE,
    AssistantMessage,
    ChatFooter,
    LoadingPanel,
    PromptInput,
    StatusLine,
    SystemPromptView,
    UserMessage,
    code_blocks,
)

BURST_S = 1 / 30  # tokens are posted to the UI at most this often, merged
SAVE_EVERY_S = 1.0  # a streaming answer is checkpointed to the store this often
QUIT_WINDOW_S = 3.0  # a second Ctrl+C within this many seconds of the first quits
# Messages on screen, the newest: each one costs memory and layout time, so a long chat would
# grow and slow down; older ones stay in the stored chat (/export writes it whole).
MAX_SHOWN_MESSAGES = 100

EngineFactory = Callable[[Callable[[str], None]], "Engine | tuple[Engine, bool]"]

HELP = """Commands: /think, /no_think (thinking for the next answers), /new, /system [text],
/settings, /chats, /export [file.md], /continue, /drop (oldest turn), /help, /quit
Keys: Esc or Ctrl+C stops an answer; Ctrl+C twice (or Ctrl+Q) quits"""


# --- messages from the worker threads ---


class EngineReady(Message):
    def __init__(self, engine: Engine, use_template: bool):
        super().__init__()
        self.engine, self.use_template = engine, use_template


class EngineFailed(Message):
    def __init__(self, error: str, hint: str):
        super().__init__()
        self.error, self.hint = error, hint


class Pieces(Message):
    """A burst of ("think" | "answer", text) pieces of the message being generated."""

    def __init__(self, message: dict, pieces: list[tuple[str, str]]):
        super().__init__()
        self.message, self.pieces = message, pieces


class Finished(Message):
    def __init__(self, message: dict | None, reason: str, stats: GenerationStats, error: str | None = None):
        super().__init__()
        self.message, self.reason, self.stats, self.error = message, reason, stats, error


class ContextFull(Message):
    def __init__(self, text: str):
        super().__init__()
        self.text = text


def merge_pieces(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for kind, text in pieces:
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


def status_text(engine: Engine | None, context_used: int | None, stats: GenerationStats | None) -> str:
    """Model, backend, context use, and the last turn's prefill and generation (count and speed)."""
    if engine is None:
        return "loading the model…"
    i = engine.info
    name = i.checkpoint.removesuffix(".gguf")
    model = name if i.weight_type.lower() in name.lower() else f"{name} {i.weight_type}"
    used = "?" if context_used is None else str(context_used)
    parts = [f"ctx {used}/{engine.config.context_length}"]
    if stats is not None and stats.prompt_tokens:
        parts.append(f"prefilled {stats.prefilled_tokens} of {stats.prompt_tokens} tok, {stats.prefill_tok_s:.0f} tok/s")
        parts.append(f"generated {stats.generated_tokens}, {stats.decode_tok_s:.1f} tok/s")
    parts += [model, f"{i.backend} {i.device}"]
    return " · ".join(parts)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-")


def chat_title(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "New chat")
    return line if len(line) <= 60 else line[:59] + "…"


class ChatApp(App[int]):
    CSS_PATH = "chat.tcss"
    TITLE = "smollm3"
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+t", "toggle_thinking", "Thinking"),
        Binding("ctrl+r", "continue", "Continue"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+o", "history", "Chats"),
        Binding("ctrl+s", "settings", "Settings"),
        Binding("ctrl+g", "system_prompt", "System"),
        Binding("ctrl+b", "copy_code", "Copy code", show=False),
        # Priority: above the input's own Ctrl+C (copy), which action_interrupt still does.
        Binding("ctrl+c", "interrupt", "Quit", priority=True),
    ]
    QUIT_WINDOW_S = QUIT_WINDOW_S
    MAX_SHOWN_MESSAGES = MAX_SHOWN_MESSAGES

    def __init__(
        self,
        engine_factory: EngineFactory,
        *,
        thinking: bool = False,
        sampling: SamplingParams = SamplingParams(),
        max_new_tokens: int = 1000,
        resume: bool = False,
        model_label: str = "the model",
        store: ChatStore | None = None,
        use_template: bool = True,
        catch_sigint: bool = False,
    ):
        super().__init__()
        self.catch_sigint = catch_sigint  # run_tui: a SIGINT from outside quits cleanly (tests keep pytest's)
        self.engine_factory = engine_factory
        self.settings = Settings(sampling, max_new_tokens)
        self.resume = resume
        self.model_label = model_label
        self.use_template = use_template
        self.store = store
        self.engine: Engine | None = None
        # The engine arrives later; until then the session holds the conversation only.
        self.session = ChatSession(engine=None, thinking=thinking, use_template=use_template)  # type: ignore[arg-type]
        self.chat_id: int | None = None
        self.title_text = "New chat"
        self.generating = False
        self.current: AssistantMessage | None = None
        self.engine_lock = threading.Lock()  # one generation at a time, even while a stopped one winds down
        self.last_stats: GenerationStats | None = None
        self.context_used: int | None = 0
        self.load_failed = False
        self.waiting_for_engine = False  # a message was sent while the model loaded
        self.widgets_by_id: dict[int, UserMessage | AssistantMessage] = {}  # by message id in the store
        self.hidden_messages = 0  # older messages of this chat taken off the screen
        self._last_save = 0.0
        self._interrupted_at: float | None = None  # the last Ctrl+C that did not quit

    def compose(self) -> ComposeResult:
        yield LoadingPanel(self.model_label, id="loading")
        with VerticalScroll(id="chat-log"):
            yield SystemPromptView("", id="system-view", markup=False)
            yield Static("", id="hidden-note", markup=False)
        yield PromptInput(
            id="prompt",
            placeholder="Message SmolLM (Enter sends, Shift+Enter or Ctrl+J: new line, /help: commands)",
        )
        with Horizontal(id="bar"):
            yield Static("", id="mode")
            yield StatusLine("loading the model…", id="status", markup=False)
        yield ChatFooter()

    # --- start-up ---

    def on_mount(self) -> None:
        if self.store is None:
            try:
                self.store = ChatStore()
            except StoreError as e:
                self.store = ChatStore(":memory:")
                self.notify(f"{e}; this session's chats will not be kept", severity="error", timeout=10)
        self.query_prompt().set_inputs(self.store.recent_inputs())
        if self.resume and (last := self.store.last_chat_id()) is not None:
            self.call_after_refresh(self.open_chat, last)
        # From now on, so that nothing the loader prints (download progress bars) is missed.
        self.begin_capture_print(self.query_one(LoadingPanel), stdout=True, stderr=True)
        self.update_mode()
        self.query_prompt().focus()
        if self.catch_sigint:
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._sigint)
            except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
                pass
        self._load_engine()

    @work(thread=True, group="load", exit_on_error=False)
    def _load_engine(self) -> None:
        panel = self.query_one(LoadingPanel)

        def progress(text: str) -> None:
            panel.post_message(LoadingPanel.Progress(text))

        progress("opening the checkpoint (a download shows its progress here)…")
        try:
            result = self.engine_factory(progress)
        except SmolLMError as e:
            self.post_message(EngineFailed(str(e), error_hint(e)))
            return
        except Exception as e:  # a bug of ours: one line, not a traceback over the UI
            self.post_message(EngineFailed(f"internal error: {type(e).__name__}: {e}", error_hint(e)))
            return
        engine, use_template = result if isinstance(result, tuple) else (result, self.use_template)
        self.post_message(EngineReady(engine, use_template))

    def _end_loading(self) -> LoadingPanel:
        panel = self.query_one(LoadingPanel)
        if panel in self._capture_print:
            self.end_capture_print(panel)
        return panel

    @on(EngineFailed)
    def _engine_failed(self, event: EngineFailed) -> None:
        self.load_failed = True
        self._end_loading().show_error(event.error, event.hint)
        self.update_status()

    @on(EngineReady)
    async def _engine_ready(self, event: EngineReady) -> None:
        self.engine = event.engine
        self.session.engine = event.engine
        self.session.use_template = event.use_template
        self._end_loading().done()
        self.context_used = self.session.context_tokens()
        self.update_mode()
        self.update_status()
        self.refresh_bindings()
        if self._unanswered() and self.waiting_for_engine:
            # Sent while the model loaded: answer it now.
            self.waiting_for_engine = False
            await self._start(None)

    # --- helpers ---

    def query_prompt(self) -> PromptInput:
        return self.chat_screen.query_one("#prompt", PromptInput)

    @property
    def chat_screen(self) -> Screen:
        return self.screen_stack[0]

    @property
    def log_view(self) -> VerticalScroll:
        return self.chat_screen.query_one("#chat-log", VerticalScroll)

    def update_status(self) -> None:
        text = "the model did not load" if self.load_failed else status_text(self.engine, self.context_used, self.last_stats)
        self.chat_screen.query_one("#status", StatusLine).update(text)

    def update_mode(self) -> None:
        mode = self.chat_screen.query_one("#mode", Static)
        if self.session.thinking:
            mode.update("THINK ON")
        else:
            mode.update("think off")
        mode.set_class(self.session.thinking, "-on")

    def set_generating(self, value: bool) -> None:
        self.generating = value
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "stop":
            return self.generating
        if action == "continue":
            can = self._continuable() is not None or self._unanswered()
            return True if can and not self.generating else None
        return True

    def _unanswered(self) -> bool:
        """The last message is the user's, without a reply (the app died before the first token)."""
        return bool(self.session.messages) and self.session.messages[-1]["role"] == "user"

    def _continuable(self) -> dict | None:
        messages = self.session.messages
        if messages and messages[-1]["role"] == "assistant" and messages[-1].get("status") in CONTINUABLE:
            return messages[-1]
        return None

    def _busy(self) -> bool:
        if self.generating:
            self.notify("An answer is being generated: press Esc or Ctrl+C to stop it first", severity="warning", timeout=3)
            return True
        if self.load_failed:
            self.notify("The model did not load (see above): Ctrl+Q quits", severity="error", timeout=5)
            return True
        if self.engine is None:
            self.notify("The model is still loading", severity="warning", timeout=3)
            return True
        return False

    # --- sending ---

    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if not text.strip():
            return
        prompt = self.query_prompt()
        if text.startswith("/") and await self.run_command(text.strip()):
            prompt.remember(text)
            prompt.clear()
            return
        if self.generating or self.load_failed or self.waiting_for_engine:
            self._busy()
            return
        prompt.remember(text)
        prompt.clear()
        await self.send(text)

    async def send(self, text: str) -> None:
        self._ensure_chat(text)
        message = {"role": "user", "content": text, "status": "done"}
        message["id"] = self.store.add_message(self.chat_id, "user", text)
        self.session.messages.append(message)
        widget = UserMessage(text, message)
        self.widgets_by_id[message["id"]] = widget
        await self.log_view.mount(widget)
        await self._trim_log()
        self.log_view.anchor()
        if self.engine is None:
            self.waiting_for_engine = True  # stored and shown; answered once the model is loaded
            self.refresh_bindings()
            return
        await self._start(None)

    def _ensure_chat(self, first_text: str) -> None:
        if self.chat_id is None:
            self.title_text = chat_title(first_text)
            model = self.engine.info.checkpoint if self.engine else ""
            self.chat_id = self.store.create_chat(self.title_text, self.session.system_prompt, self.session.thinking, model)

    async def _start(self, continuing: AssistantMessage | None) -> None:
        if continuing is None:
            self.current = AssistantMessage(streaming=True)
            await self.log_view.mount(self.current)
            await self._trim_log()
        else:
            self.current = continuing
            continuing.resume_streaming()
        self.log_view.anchor()
        self.set_generating(True)
        self._last_save = time.monotonic()
        self._generate(continuing is not None)

    @work(thread=True, group="generate", exit_on_error=False)
    def _generate(self, continuing: bool) -> None:
        worker = get_current_worker()
        session, settings = self.session, self.settings
        message: dict | None = session.messages[-1] if continuing else None
        with self.engine_lock:
            splitter = ThinkingSplitter()
            pending: list[tuple[str, str]] = []
            error, overflow = None, False
            try:
                if continuing:
                    stream = session.continue_reply(settings.max_new_tokens, settings.sampling, should_stop=lambda: worker.is_cancelled)
                    splitter.feed(message["content"])  # only to know whether it stopped mid-thought
                    splitter.pending = ""
                else:
                    stream = session.generate(settings.max_new_tokens, settings.sampling, should_stop=lambda: worker.is_cancelled)
                last_post = 0.0
                for text in stream:
                    if message is None:
                        message = session.messages[-1]  # the session adds the turn at its first token
                    pending += splitter.feed(text)
                    now = time.monotonic()
                    if pending and now - last_post >= BURST_S:
                        self.post_message(Pieces(message, merge_pieces(pending)))
                        pending, last_post = [], now
                pending += splitter.flush()
                if message is None and session.messages and session.messages[-1]["role"] == "assistant":
                    message = session.messages[-1]  # an empty answer (EOS first)
            except ContextOverflow as e:
                self.post_message(ContextFull(str(e)))
                overflow = True
            except SmolLMError as e:
                error = str(e)
            except Exception as e:  # a bug of ours, shown on the message rather than as a traceback
                error = f"internal error: {type(e).__name__}: {e}"
            if pending and message is not None:
                self.post_message(Pieces(message, merge_pieces(pending)))
            reason = "overflow" if overflow else "error" if error else session.last_stop_reason
            self.post_message(Finished(message, reason, dataclasses.replace(session.engine.stats), error))

    @on(Pieces)
    async def _pieces(self, event: Pieces) -> None:
        widget = self.current
        if widget is None:
            return
        message = event.message
        if widget.message is None:
            widget.message = message
        if "id" not in message:
            message["status"] = "streaming"
            message["id"] = self.store.add_message(self.chat_id, "assistant", message["content"], "streaming")
            self.widgets_by_id[message["id"]] = widget
        await widget.add_pieces(event.pieces)
        now = time.monotonic()
        if now - self._last_save >= SAVE_EVERY_S:
            self.store.update_message(message["id"], message["content"], "streaming")
            self._last_save = now

    @on(Finished)
    async def _finished(self, event: Finished) -> None:
        widget, self.current = self.current, None
        message = event.message
        status = {"eos": "done", "length": "length", "context": "context"}.get(event.reason, "stopped")
        if message is None:
            # Nothing was generated (a prompt too long, an error before the first token).
            if widget is not None:
                await widget.remove()
            if event.error:
                self.notify(event.error, title="Generation failed", severity="error", timeout=8)
        else:
            message["status"] = status
            if "id" in message:
                self.store.update_message(message["id"], message["content"], status)
            else:
                message["id"] = self.store.add_message(self.chat_id, "assistant", message["content"], status)
            if widget is not None:
                self.widgets_by_id[message["id"]] = widget
                widget.message = message
                await widget.finish(message["content"], status, event.error)
        self.last_stats = event.stats
        if event.stats.prompt_tokens:
            self.context_used = event.stats.prompt_tokens + event.stats.generated_tokens
        self.set_generating(False)
        self.update_status()
        if event.reason == "context":
            self.offer_context_relief("The context is full: the answer was stopped.")

    @on(ContextFull)
    def _context_full(self, event: ContextFull) -> None:
        self.offer_context_relief(f"The conversation does not fit the model's context ({event.text}).")

    async def _trim_log(self, unmounted: int = 0) -> None:
        """Take the oldest messages off the screen beyond MAX_SHOWN_MESSAGES (`unmounted`: more of
        them that were never put on it), and say how many are not shown."""
        shown = list(self.log_view.query_children("UserMessage, AssistantMessage"))
        old = shown[: max(len(shown) - self.MAX_SHOWN_MESSAGES, 0)]
        if not old and not unmounted:
            return
        for widget in old:
            self.widgets_by_id.pop((widget.message or {}).get("id"), None)
        self.hidden_messages += len(old) + unmounted
        await self.log_view.remove_children(old)
        note = self.chat_screen.query_one("#hidden-note", Static)
        n = self.hidden_messages
        note.update(f"{n} earlier message{'s' * (n != 1)} not shown: the chat keeps them (/export writes it whole)")
        note.display = True

    # --- context ---

    def offer_context_relief(self, text: str) -> None:
        def chosen(choice: str | None) -> None:
            if choice == "drop":
                self.run_worker(self.drop_to_fit(), group="ui", exclusive=True)
            elif choice == "new":
                pending = self.session.messages[-1]["content"] if self.session.messages[-1]["role"] == "user" else ""
                self.run_worker(self.new_chat(), group="ui")
                if pending:
                    self.query_prompt().load_text(pending)

        self.push_screen(
            ChoiceScreen(
                "Context full",
                f"{text}\nDrop the oldest turns (they stay in the history, dimmed) or start a new chat.",
                [("drop", "Drop oldest turns", "d"), ("new", "New chat", "n"), ("keep", "Cancel", "c")],
            ),
            chosen,
        )

    async def drop_to_fit(self, at_least_one: bool = False) -> None:
        """Drop the oldest turns until the prompt leaves room for an answer, then go on."""
        size = self.engine.config.context_length
        room = min(self.settings.max_new_tokens, size // 4)
        dropped: list[dict] = []
        while (at_least_one and not dropped) or len(self.session.prompt_ids()) + room > size:
            removed = self.session.drop_oldest_turn()
            if not removed:
                break
            dropped += removed
        if not dropped:
            self.notify("Nothing left to drop: only the last message is in the context", severity="warning")
            return
        self.store.drop_from_context([m["id"] for m in dropped if "id" in m])
        for m in dropped:
            if widget := self.widgets_by_id.get(m.get("id")):
                widget.add_class("dropped")
                widget.border_subtitle = "not in context"
        self.context_used = self.session.context_tokens()
        self.update_status()
        self.notify(f"Dropped {len(dropped)} message{'s' * (len(dropped) != 1)} from the context", timeout=3)
        if self.session.messages and self.session.messages[-1]["role"] == "user" and not self.generating:
            await self._start(None)

    # --- actions ---

    def action_stop(self) -> None:
        if self.generating:
            self.workers.cancel_group(self, "generate")

    async def action_interrupt(self) -> None:
        """Ctrl+C: stop the answer being generated (or copy the selected text); quit when it is the
        second press within QUIT_WINDOW_S. The chat is in the store already: only a draft is lost."""
        now = time.monotonic()
        if self._interrupted_at is not None and now - self._interrupted_at <= self.QUIT_WINDOW_S:
            await self.action_quit()
            return
        self._interrupted_at = now
        title = None
        if self.generating:
            self.action_stop()
            title = "Stopped"
        elif selection := self._selected_text():
            self.copy_to_clipboard(selection)
            title = "Copied"
        draft = " (the unsent text in the input box is not kept)" if self.query_prompt().text.strip() else ""
        self.notify(f"Press Ctrl+C again to quit{draft}", title=title or "", timeout=self.QUIT_WINDOW_S, markup=False)

    def _selected_text(self) -> str | None:
        focused = self.focused
        return getattr(focused, "selected_text", None) or self.screen.get_selected_text()

    def _sigint(self) -> None:
        """SIGINT from outside (in the TUI, the terminal delivers Ctrl+C as a key): quit like
        Ctrl+Q, keeping a partial answer, with the shell's status for an interrupt."""
        self._keep_partial_answer()
        self.exit(130)

    def action_toggle_thinking(self) -> None:
        self.set_thinking(not self.session.thinking)

    def set_thinking(self, on_: bool) -> None:
        if self.engine is not None and not self.session.supports_thinking:
            self.notify("This model's chat template has no thinking mode", severity="warning", timeout=3)
        changed = on_ != self.session.thinking
        self.session.thinking = on_
        if self.chat_id is not None:
            self.store.set_thinking(self.chat_id, on_)
        self.update_mode()
        if changed:
            when = "the next answer" + (" prefills the conversation again" if self.session.messages else "")
            self.notify(f"Thinking {'on' if on_ else 'off'}: {when}", timeout=3)

    async def action_continue(self) -> None:
        if self._busy():
            return
        if self._unanswered():
            await self._start(None)
            return
        message = self._continuable()
        widget = self.widgets_by_id.get(message.get("id")) if message else None
        if message is None or not isinstance(widget, AssistantMessage):
            self.notify("There is no stopped answer to continue", timeout=3)
            return
        await self._start(widget)

    async def new_chat(self) -> None:
        self.session.clear()
        self.session.system_prompt = None
        self.chat_id, self.title_text = None, "New chat"
        self.widgets_by_id.clear()
        await self.log_view.remove_children(UserMessage)
        await self.log_view.remove_children(AssistantMessage)
        self.hidden_messages = 0
        self.chat_screen.query_one("#hidden-note", Static).display = False
        self.chat_screen.query_one(SystemPromptView).show(None)
        self.context_used, self.last_stats = 0, None
        self.update_status()
        self.refresh_bindings()

    async def action_new_chat(self) -> None:
        if not self.generating:
            await self.new_chat()
            self.query_prompt().focus()
        else:
            self._busy()

    async def open_chat(self, chat_id: int) -> None:
        chat = self.store.load_chat(chat_id)
        for m in chat.messages:
            if m.role == "assistant" and m.status == "streaming" and not m.content:
                self.store.delete_message(m.id)  # killed before its first token: nothing to keep
        chat = self.store.load_chat(chat_id)
        await self.new_chat()
        self.chat_id, self.title_text = chat.id, chat.title
        self.session.system_prompt = chat.system_prompt
        self.chat_screen.query_one(SystemPromptView).show(chat.system_prompt)
        widgets = []
        for m in chat.messages:
            message = {"role": m.role, "content": m.content, "status": m.status, "id": m.id}
            widget = UserMessage(m.content, message) if m.role == "user" else AssistantMessage(message)
            if not m.in_context:
                widget.add_class("dropped")
                widget.border_subtitle = "not in context"
            else:
                self.session.messages.append(message)
            widgets.append(widget)
        shown = widgets[-self.MAX_SHOWN_MESSAGES :]
        self.widgets_by_id.update((w.message["id"], w) for w in shown)
        await self.log_view.mount_all(shown)
        await self._trim_log(unmounted=len(widgets) - len(shown))
        self.log_view.anchor()
        self.context_used = self.session.context_tokens() if self.engine else None
        self.update_status()
        self.refresh_bindings()

    def action_history(self) -> None:
        def chosen(chat_id: int | None) -> None:
            if chat_id is None:
                return
            if self.generating:
                self._busy()
                return
            self.run_worker(self.open_chat(chat_id), group="ui")

        self.push_screen(HistoryScreen(self.store, self.chat_id), chosen)

    def chat_renamed(self, chat_id: int, title: str) -> None:
        if chat_id == self.chat_id:
            self.title_text = title

    def chat_deleted(self, chat_id: int) -> None:
        if chat_id == self.chat_id:
            self.run_worker(self.new_chat(), group="ui")

    def action_settings(self) -> None:
        def saved(settings: Settings | None) -> None:
            if settings is not None:
                self.settings = settings
                self.notify("Settings saved: they apply from the next answer", timeout=3)

        self.push_screen(SettingsScreen(self.settings), saved)

    def action_system_prompt(self) -> None:
        def saved(text: str | None) -> None:
            if text is not None:
                self.set_system_prompt(text or None)

        self.push_screen(SystemPromptScreen(self.session.system_prompt), saved)

    def set_system_prompt(self, text: str | None) -> None:
        if text == self.session.system_prompt:
            return
        self.session.system_prompt = text
        if self.chat_id is not None:
            self.store.set_system_prompt(self.chat_id, text)
        self.chat_screen.query_one(SystemPromptView).show(text)
        self.notify("System prompt " + ("set" if text else "cleared") + ": the next answer prefills the conversation again", timeout=3)

    def action_copy_code(self) -> None:
        last = next((m for m in reversed(self.session.messages) if m["role"] == "assistant"), None)
        self.copy_code_from(last["content"] if last else "")

    def copy_code_from(self, text: str) -> None:
        blocks = code_blocks(split_thinking(text)[1])
        if not blocks:
            self.notify("No code block in that answer", timeout=2)
        elif len(blocks) == 1:
            self.copy_to_clipboard(blocks[0])
            self.notify("Code block copied", timeout=2)
        else:

            def chosen(block: str | None) -> None:
                if block is not None:
                    self.copy_to_clipboard(block)
                    self.notify("Code block copied", timeout=2)

            self.push_screen(CodeBlockScreen(blocks), chosen)

    def action_copy_answer(self) -> None:
        last = next((m for m in reversed(self.session.messages) if m["role"] == "assistant"), None)
        if last is None:
            self.notify("No answer to copy yet", timeout=2)
            return
        self.copy_to_clipboard(split_thinking(last["content"])[1].strip())
        self.notify("Answer copied", timeout=2)

    def action_export(self) -> None:
        if self.chat_id is None:
            self.notify("Nothing to export yet", timeout=2)
            return
        self.export_chat(self.chat_id)

    def export_chat(self, chat_id: int, path: str | None = None) -> None:
        chat = self.store.load_chat(chat_id)

        def write(target: str | None) -> None:
            if not target:
                return
            file = Path(target).expanduser()
            try:
                file.write_text(chat_markdown(chat), encoding="utf-8")
            except OSError as e:
                self.notify(f"Cannot write {file}: {e.strerror or e}", severity="error")
                return
            self.notify(f"Exported to {file}", timeout=4)

        if path is not None:
            write(path)
        else:
            default = str(Path.cwd() / f"{slug(chat.title) or f'chat-{chat.id}'}.md")
            self.push_screen(InputScreen("Export chat as Markdown to", default), write)

    async def action_drop_oldest(self) -> None:
        if not self._busy():
            await self.drop_to_fit(at_least_one=True)

    async def action_quit(self) -> None:
        self._keep_partial_answer()
        self.exit(2 if self.load_failed else 0)

    def _keep_partial_answer(self) -> None:
        if self.generating and self.current is not None and (message := self.current.message) is not None:
            # Keep what was generated: the worker may not get to post its Finished before exit.
            self.workers.cancel_group(self, "generate")
            if "id" in message:
                self.store.update_message(message["id"], message["content"], "stopped")

    # --- slash commands and the command palette ---

    async def run_command(self, text: str) -> bool:
        """Run a /command; False when it is not one (the text is then sent as a message)."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name == "/think":
            self.set_thinking(True)
        elif name == "/no_think":
            self.set_thinking(False)
        elif name in ("/new", "/clear"):
            await self.action_new_chat()
        elif name == "/system":
            if arg:
                self.set_system_prompt(arg)
            else:
                self.action_system_prompt()
        elif name == "/settings":
            self.action_settings()
        elif name in ("/chats", "/history"):
            self.action_history()
        elif name == "/export":
            if self.chat_id is None:
                self.notify("Nothing to export yet", timeout=2)
            else:
                self.export_chat(self.chat_id, arg or None)
        elif name == "/continue":
            await self.action_continue()
        elif name == "/drop":
            await self.action_drop_oldest()
        elif name == "/help":
            self.notify(HELP, title="Commands", timeout=10)
        elif name == "/quit":
            await self.action_quit()
        else:
            return False
        return True

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Toggle thinking", "Reason before answering, from the next answer (ctrl+t)", self.action_toggle_thinking)
        yield SystemCommand("New chat", "Start an empty conversation (ctrl+n)", self.action_new_chat)
        yield SystemCommand("Continue the answer", "Go on with a stopped answer (ctrl+r)", self.action_continue)
        yield SystemCommand("Stop generating", "Keep what was generated so far (esc, ctrl+c)", self.action_stop)
        yield SystemCommand("Chats", "Browse, resume, rename and delete stored chats (ctrl+o)", self.action_history)
        yield SystemCommand("Settings", "Temperature, top-p, top-k, max tokens (ctrl+s)", self.action_settings)
        yield SystemCommand("Edit system prompt", "Instructions for this chat (ctrl+g)", self.action_system_prompt)
        yield SystemCommand("Export chat as Markdown", "Write this chat to a .md file", self.action_export)
        yield SystemCommand("Copy last answer", "To the clipboard", self.action_copy_answer)
        yield SystemCommand("Copy code block", "From the last answer (ctrl+b)", self.action_copy_code)
        yield SystemCommand("Drop oldest turn", "Free context: the turn stays in the history", self.action_drop_oldest)
