"""The chat screen: the messages over the input box, the mode and status line, the footer; the
key bindings and slash commands; sending, and the UI side of generation.

State lives in reactive attributes: the status line is bound to them, and bindings refresh
when `generating` changes. The generation itself runs in `worker.generate_reply`, in a thread.
"""

from __future__ import annotations

import threading
import time

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.reactive import var
from textual.screen import Screen
from textual.widgets import Static
from textual.worker import get_current_worker

from backends import Engine, GenerationStats

from ..session import ChatMessage, ChatSession
from .commands import find_command, run_command
from .turns import drop_to_fit, offer_context_relief
from .messages import ContextFull, Finished, Pieces, PrefillProgress
from .chat_log import ChatLog
from .dialogs import copy_code_block
from .screens import HistoryScreen, SettingsScreen, SystemPromptScreen
from .status import StatusLine, device_name, model_name, model_record
from .store import ChatStore
from .textual_compat import ChatFooter
from .widgets import CONTINUABLE, AssistantMessage, LoadingPanel, PromptInput, UserMessage
from .worker import Settings, generate_reply

SAVE_EVERY_S = 1.0  # a streaming answer is checkpointed to the store this often

def chat_title(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "New chat")
    return line if len(line) <= 60 else line[:59] + "…"


class ChatScreen(Screen):
    BINDINGS = [
        # (Esc is left out of the footer: Ctrl+C, labelled Stop while an answer streams, does the same.)
        Binding("escape", "stop", "Stop", show=False, tooltip="stop the answer, keeping it"),
        Binding("ctrl+t", "toggle_thinking", "Thinking", tooltip="thinking on or off, from the next answer"),
        Binding("ctrl+r", "continue", "Continue", tooltip="go on with a stopped answer"),
        Binding("ctrl+n", "new_chat", "New", tooltip="new chat"),
        Binding("ctrl+o", "history", "Chats", tooltip="stored chats"),
        Binding("ctrl+s", "settings", "Settings", tooltip="temperature, top-p, top-k, max tokens"),
        Binding("ctrl+g", "system_prompt", "System", tooltip="this chat's system prompt"),
        Binding("ctrl+b", "copy_code", "Copy code", show=False, tooltip="copy a code block of the last answer"),
    ]

    engine: var[Engine | None] = var(None)
    load_failed = var(False, bindings=True)
    generating = var(False, bindings=True)
    thinking = var(False)
    context_used: var[int | None] = var(0)
    stats: var[GenerationStats | None] = var(None)
    settings: var[Settings | None] = var(None)
    live = var("")  # the answer's progress while it is generated

    def __init__(self, store: ChatStore, settings: Settings, thinking: bool, model_label: str, use_template: bool,
                 flag_settings: dict | None = None, system_prompt: str | None = None):
        super().__init__()
        self.store = store
        self.model_label = model_label
        # The engine arrives later; until then the session holds the conversation only.
        self.session = ChatSession(engine=None, thinking=thinking, use_template=use_template)  # type: ignore[arg-type]
        # Settings saved in the chat are the defaults for new chats, over the command line's own
        # defaults; a flag the user gave wins over both for this run.
        self.flag_settings = flag_settings or {}
        self.flag_system_prompt = system_prompt
        self.default_settings = self.with_flags(settings.updated(store.default("settings")))
        self.set_reactive(ChatScreen.settings, self.default_settings)
        self.session.system_prompt = self.new_chat_system_prompt()
        self.set_reactive(ChatScreen.thinking, thinking)
        self.chat_id: int | None = None
        self.title_text = "New chat"
        self.current: AssistantMessage | None = None  # the answer being generated
        self.engine_lock = threading.Lock()  # one generation at a time, even while a stopped one winds down
        self._last_save = 0.0

    def compose(self) -> ComposeResult:
        yield LoadingPanel(self.model_label, id="loading")
        yield ChatLog(id="chat-log")
        yield PromptInput(
            id="prompt",
            placeholder="Message SmolLM · Enter sends · Shift+Enter: new line · /help",
        )
        with Horizontal(id="bar"):
            yield Static("", id="mode")
            yield StatusLine(id="status", markup=False).data_bind(
                ChatScreen.engine, ChatScreen.load_failed, ChatScreen.context_used,
                ChatScreen.stats, ChatScreen.settings, ChatScreen.live,
            )
        # Compact, and without the palette's key (/help lists Ctrl+P): the keys fit 66 columns.
        yield ChatFooter(compact=True, show_command_palette=False)

    def on_mount(self) -> None:
        self.query_prompt().set_inputs(self.store.recent_inputs())
        self.watch_thinking(self.thinking)
        self.log_view.show_system_prompt(self.session.system_prompt)
        self.query_prompt().focus()
        self.app.chat_mounted()

    # --- state ---

    def query_prompt(self) -> PromptInput:
        return self.query_one("#prompt", PromptInput)

    @property
    def log_view(self) -> ChatLog:
        return self.query_one(ChatLog)

    def engine_ready(self, engine: Engine, use_template: bool) -> None:
        self.session.engine = engine
        self.session.use_template = use_template
        self.query_one(LoadingPanel).done()
        self.context_used = self.session.context_tokens()
        self.engine = engine
        self.log_view.show_welcome(
            f"{model_name(engine)} on {device_name(engine)}. Enter sends · Esc stops · Ctrl+T thinking · "
            "Ctrl+O chats · Ctrl+S settings · /help: all keys and commands"
        )
        if self.thinking and not self.session.supports_thinking:
            self.set_thinking(True)  # says that this model has none
        self.watch_thinking(self.thinking)
        if self.unanswered():
            # Sent while the model loaded: answer it now.
            self.call_later(self.start_answer)

    def engine_failed(self, error: str, hint: str) -> None:
        self.load_failed = True
        self.query_one(LoadingPanel).show_error(error, hint)

    def watch_thinking(self, thinking: bool) -> None:
        self.session.thinking = thinking
        mode = self.query_one("#mode", Static)
        if self.engine is not None and not self.session.supports_thinking:
            mode.update("no thinking mode")
        else:
            mode.update("THINK ON" if thinking else "think off")
        mode.set_class(thinking, "-on")

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "stop":
            return self.generating
        if action == "continue":
            can = self._continuable() is not None or self.unanswered()
            return True if can and not self.generating else None
        return True

    def unanswered(self) -> bool:
        """The last message is the user's, without a reply (sent while the model loaded, or the
        app died before the first token)."""
        return bool(self.session.messages) and self.session.messages[-1].role == "user"

    def _continuable(self) -> ChatMessage | None:
        messages = self.session.messages
        if messages and messages[-1].role == "assistant" and messages[-1].status in CONTINUABLE:
            return messages[-1]
        return None

    def busy(self) -> bool:
        """Whether a new answer cannot start now (and say why)."""
        if self.generating:
            self.notify("An answer is being generated: press Esc or Ctrl+C to stop it first", severity="warning", timeout=3)
        elif self.load_failed:
            self.notify("The model did not load (see above): Ctrl+Q quits", severity="error", timeout=5)
        elif self.engine is None:
            self.notify("The model is still loading", severity="warning", timeout=3)
        else:
            return False
        return True

    # --- sending ---

    @on(PromptInput.Submitted)
    async def _submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if not text.strip():
            return
        prompt = self.query_prompt()
        if find_command(text.strip().partition(" ")[0]):
            prompt.remember(text)
            prompt.clear()  # (before it runs: /edit fills the input box)
            await run_command(self, text.strip())
            return
        if self.generating or self.load_failed or (self.engine is None and self.unanswered()):
            self.busy()
            return
        prompt.remember(text)
        prompt.clear()
        await self.send(text)

    async def send(self, text: str) -> None:
        self._ensure_chat(text)
        message = ChatMessage("user", text)
        self.store.add_message(self.chat_id, message)
        self.session.messages.append(message)
        await self.log_view.add(UserMessage(message))
        self.refresh_bindings()
        if self.engine is not None:  # else stored and shown; answered once the model is loaded
            await self.start_answer()

    def _ensure_chat(self, first_text: str) -> None:
        if self.chat_id is None:
            self.title_text = chat_title(first_text)
            model = model_record(self.engine) if self.engine else ""
            self.chat_id = self.store.create_chat(self.title_text, self.session.system_prompt, self.session.thinking, model)

    async def start_answer(self, continuing: AssistantMessage | None = None) -> None:
        if continuing is None:
            self.current = AssistantMessage(streaming=True)
            await self.log_view.add(self.current)
        else:
            self.current = continuing
            continuing.resume_streaming()
            continuing.message.status = "streaming"
        self.log_view.anchor()
        self.generating = True
        self._last_save = time.monotonic()
        self._generate(continuing is not None)

    @work(thread=True, group="generate", exit_on_error=False)
    def _generate(self, continuing: bool) -> None:
        worker = get_current_worker()
        with self.engine_lock:
            generate_reply(self.session, self.settings, continuing, self.post_message, lambda: worker.is_cancelled)

    @on(PrefillProgress)
    def _prefill_progress(self, event: PrefillProgress) -> None:
        self.live = f"prefill {event.done}/{event.total} tok"
        if self.current is not None and self.current.message is None:
            self.current.note.update(f"reading the prompt: {event.done} of {event.total} tokens…")

    @on(Pieces)
    async def _pieces(self, event: Pieces) -> None:
        self.live = f"{event.generated} tok, {event.tok_s:.1f} tok/s"
        self.context_used = event.context
        widget = self.current
        if widget is None:
            return
        message = event.message
        if widget.message is None:
            widget.message = message
            widget.set_status("streaming-live")  # (the note said how far the prefill was)
        if message.id is None:
            self.store.add_message(self.chat_id, message)
            self.log_view.track(widget)
        await widget.add_pieces(event.pieces)
        now = time.monotonic()
        if now - self._last_save >= SAVE_EVERY_S:
            self.store.update_message(message)
            self._last_save = now

    @on(Finished)
    async def _finished(self, event: Finished) -> None:
        widget, self.current = self.current, None
        self.live = ""
        message = event.message
        if message is None:
            # Nothing was generated (a prompt too long, an error before the first token).
            if widget is not None:
                await widget.remove()
            if event.error:
                self.notify(event.error, title="Generation failed", severity="error", timeout=8, markup=False)
        else:
            if message.status == "streaming":  # the worker ended before the session did
                message.status = "stopped"
            if message.id is None:
                self.store.add_message(self.chat_id, message)
            else:
                self.store.update_message(message)
            if widget is not None:
                widget.message = message
                self.log_view.track(widget)
                await widget.finish(message.content, message.status, event.error)
        self.stats = event.stats
        if event.stats is not None and event.stats.prompt_tokens:
            self.context_used = event.stats.prompt_tokens + event.stats.generated_tokens
        else:
            self.context_used = self.session.context_tokens()
        self.generating = False
        if event.reason == "context":
            offer_context_relief(self, "The context is full: the answer was stopped.")

    @on(ContextFull)
    def _context_full(self, event: ContextFull) -> None:
        offer_context_relief(self, f"The conversation does not fit the model's context ({event.text}).")

    # --- chats ---

    def with_flags(self, settings: Settings) -> Settings:
        return settings.updated({**settings.to_dict(), **self.flag_settings}) if self.flag_settings else settings

    def new_chat_system_prompt(self) -> str | None:
        if self.flag_system_prompt is not None:
            return self.flag_system_prompt
        return self.store.default("system_prompt")

    async def new_chat(self) -> None:
        self.session.clear()
        self.session.system_prompt = self.new_chat_system_prompt()
        self.settings = self.default_settings
        self.chat_id, self.title_text = None, "New chat"
        await self.log_view.clear()
        self.log_view.show_system_prompt(self.session.system_prompt)
        self.context_used, self.stats = 0, None
        self.refresh_bindings()

    async def open_chat(self, chat_id: int) -> None:
        chat = self.store.load_chat(chat_id)
        for m in chat.messages:
            if m.role == "assistant" and m.status == "streaming" and not m.content:
                self.store.delete_message(m.id)  # killed before its first token: nothing to keep
        chat = self.store.load_chat(chat_id)
        await self.new_chat()
        self.chat_id, self.title_text = chat.id, chat.title
        self.settings = self.with_flags(self.default_settings.updated(chat.settings))
        self.session.system_prompt = chat.system_prompt
        self.log_view.show_system_prompt(chat.system_prompt)
        self.session.messages = [m for m in chat.messages if m.in_context]
        await self.log_view.show(chat.messages)
        self.context_used = self.session.context_tokens() if self.engine else None
        self.refresh_bindings()

    def chat_renamed(self, chat_id: int, title: str) -> None:
        if chat_id == self.chat_id:
            self.title_text = title

    def chat_deleted(self, chat_id: int) -> None:
        if chat_id == self.chat_id:
            self.run_worker(self.new_chat(), group="ui")

    def set_thinking(self, on_: bool) -> None:
        if self.engine is not None and not self.session.supports_thinking:
            self.thinking = False
            if on_:
                self.notify("This model has no thinking mode (its chat template has none): it answers directly", severity="warning", timeout=4)
            return
        changed = on_ != self.thinking
        self.thinking = on_
        if self.chat_id is not None:
            self.store.set_thinking(self.chat_id, on_)
        if changed:
            when = "the next answer" + (" prefills the conversation again" if self.session.messages else "")
            self.notify(f"Thinking {'on' if on_ else 'off'}: {when}", timeout=3)

    def set_system_prompt(self, text: str | None) -> None:
        if text == self.session.system_prompt:
            return
        self.session.system_prompt = text
        self.store.set_default("system_prompt", text)
        if self.chat_id is not None:
            self.store.set_system_prompt(self.chat_id, text)
        self.log_view.show_system_prompt(text)
        self.notify("System prompt " + ("set" if text else "cleared") + ": the next answer prefills the conversation again", timeout=3)

    # --- actions ---

    def action_stop(self) -> None:
        if self.generating:
            self.workers.cancel_group(self, "generate")
            self.session.cancel()  # a remote answer may be waiting on the network, not on a token

    def action_toggle_thinking(self) -> None:
        self.set_thinking(not self.thinking)

    async def action_continue(self) -> None:
        if self.busy():
            return
        if self.unanswered():
            await self.start_answer()
            return
        widget = self.log_view.widget_for(self._continuable())
        if not isinstance(widget, AssistantMessage):
            self.notify("There is no stopped answer to continue", timeout=3)
            return
        await self.start_answer(widget)

    async def action_new_chat(self) -> None:
        if not self.generating:
            await self.new_chat()
            self.query_prompt().focus()
        else:
            self.busy()

    def action_history(self) -> None:
        def chosen(chat_id: int | None) -> None:
            if chat_id is None:
                return
            if self.generating:
                self.busy()
                return
            self.run_worker(self.open_chat(chat_id), group="ui")

        self.app.push_screen(HistoryScreen(self), chosen)

    def action_settings(self) -> None:
        def saved(settings: Settings | None) -> None:
            if settings is not None:
                self.settings = self.default_settings = settings
                self.store.set_default("settings", settings.to_dict())
                if self.chat_id is not None:
                    self.store.set_settings(self.chat_id, settings.to_dict())
                self.notify("Settings saved for this chat and new ones: they apply from the next answer", timeout=3)

        self.app.push_screen(SettingsScreen(self.settings), saved)

    def action_system_prompt(self) -> None:
        def saved(text: str | None) -> None:
            if text is not None:
                self.set_system_prompt(text or None)

        self.app.push_screen(SystemPromptScreen(self.session.system_prompt), saved)

    def action_copy_code(self) -> None:
        last = self.session.last_answer()
        copy_code_block(self, last.content if last else "")

    async def action_drop_oldest(self) -> None:
        if not self.busy():
            await drop_to_fit(self, at_least_one=True)

    def keep_partial_answer(self) -> None:
        """Store what was generated: on quitting, the worker may not get to post its Finished."""
        if self.generating and self.current is not None and (message := self.current.message) is not None:
            self.workers.cancel_group(self, "generate")
            self.session.cancel()
            if message.id is not None:
                message.status = "stopped"
                self.store.update_message(message)
