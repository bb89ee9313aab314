"""The chat app: opens the chat store, loads the engine in a worker thread while the chat
screen is already usable, and owns the keys that act on every screen (Ctrl+C, Ctrl+Q)."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Callable, Iterable

from textual import on, work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from backends import Engine, SamplingParams, SmolLMError

from .chat_screen import ChatScreen
from .commands import system_commands
from .messages import EngineFailed, EngineReady
from .screens import error_hint
from .store import ChatStore, StoreError
from .widgets import LoadingPanel
from .worker import Settings

QUIT_WINDOW_S = 3.0  # a second Ctrl+C within this many seconds of the first quits

EngineFactory = Callable[[Callable[[str], None]], "Engine | tuple[Engine, bool]"]


class ChatApp(App[int]):
    CSS_PATH = "chat.tcss"
    TITLE = "smollm3"
    BINDINGS = [
        # Priority: above the input's own Ctrl+C (copy), which action_interrupt still does. One
        # key, two labels: the footer shows the one that says what a press does now.
        Binding("ctrl+c", "interrupt('stop')", "Stop", priority=True),
        Binding("ctrl+c", "interrupt('quit')", "Quit", priority=True),
    ]
    QUIT_WINDOW_S = QUIT_WINDOW_S

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
        flag_settings: dict | None = None,
        system_prompt: str | None = None,
        catch_sigint: bool = False,
    ):
        super().__init__()
        self.catch_sigint = catch_sigint  # run_tui: a SIGINT from outside quits cleanly (tests keep pytest's)
        self.engine_factory = engine_factory
        self.resume = resume
        self.store_error: str | None = None
        if store is None:
            try:
                store = ChatStore()
            except StoreError as e:
                store = ChatStore(":memory:")
                self.store_error = f"{e}; this session's chats will not be kept"
        self.store = store
        self.chat = ChatScreen(store, Settings(sampling, max_new_tokens), thinking, model_label, use_template,
                               flag_settings=flag_settings, system_prompt=system_prompt)
        self.load_failed = False
        self._interrupted_at: float | None = None  # the last Ctrl+C that did not quit

    def get_default_screen(self) -> Screen:
        return self.chat

    def on_mount(self) -> None:
        if self.store_error:
            self.notify(self.store_error, severity="error", timeout=10, markup=False)
        if self.catch_sigint:
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self._sigint)
            except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
                pass

    def chat_mounted(self) -> None:
        """The chat screen is up, with its loading panel: resume the last chat, load the engine."""
        if self.resume and (last := self.store.last_chat_id()) is not None:
            self.call_after_refresh(self.chat.open_chat, last)
        self.load_engine()

    @work(thread=True, group="load", exit_on_error=False)
    def load_engine(self) -> None:
        panel = self.chat.query_one(LoadingPanel)

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
        engine, use_template = result if isinstance(result, tuple) else (result, self.chat.session.use_template)
        self.post_message(EngineReady(engine, use_template))

    @on(EngineFailed)
    def _engine_failed(self, event: EngineFailed) -> None:
        self.load_failed = True
        self.chat.engine_failed(event.error, event.hint)

    @on(EngineReady)
    def _engine_ready(self, event: EngineReady) -> None:
        self.chat.engine_ready(event.engine, event.use_template)

    # --- keys on every screen ---

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "interrupt":
            return (parameters[0] == "stop") == self.chat.generating
        return True

    async def action_interrupt(self, label: str = "") -> None:
        """Ctrl+C: stop the answer being generated (or copy the selected text); quit when it is the
        second press within QUIT_WINDOW_S. The chat is in the store already: only a draft is lost."""
        now = time.monotonic()
        if self._interrupted_at is not None and now - self._interrupted_at <= self.QUIT_WINDOW_S:
            await self.action_quit()
            return
        self._interrupted_at = now
        title = None
        if self.chat.generating:
            self.chat.action_stop()
            title = "Stopped"
        elif selection := self._selected_text():
            self.copy_to_clipboard(selection)
            title = "Copied"
        draft = " (the unsent text in the input box is not kept)" if self.chat.query_prompt().text.strip() else ""
        self.notify(f"Press Ctrl+C again to quit{draft}", title=title or "", timeout=self.QUIT_WINDOW_S, markup=False)

    def _selected_text(self) -> str | None:
        return getattr(self.focused, "selected_text", None) or self.screen.get_selected_text()

    def _sigint(self) -> None:
        """SIGINT from outside (in the TUI, the terminal delivers Ctrl+C as a key): quit like
        Ctrl+Q, keeping a partial answer, with the shell's status for an interrupt."""
        self.chat.keep_partial_answer()
        self.exit(130)

    async def action_quit(self) -> None:
        self.chat.keep_partial_answer()
        self.exit(2 if self.load_failed else 0)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield from system_commands(self.chat)
