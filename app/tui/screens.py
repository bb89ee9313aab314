"""Screens: settings, system prompt, chat history; what to do about a load error."""

from __future__ import annotations

import time

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Input, Label, Static, TextArea

from backends import SamplingParams
from backends.errors import (
    BackendUnavailable,
    CheckpointError,
    ContextOverflow,
    ResolutionError,
    TemplateError,
    TokenizerError,
)

from backends.remote import RemoteError

from .dialogs import ChoiceScreen, InputScreen
from .worker import Settings


def error_hint(error: BaseException) -> str:
    """What the user can do about a load error."""
    if isinstance(error, ResolutionError):
        return (
            "Check the model name or --model-path. Downloads go to the Hugging Face cache "
            "(~/.cache/huggingface); without network, only models already there can be used."
        )
    if isinstance(error, CheckpointError):
        return (
            "The checkpoint could not be used: if it was downloaded, delete it from the Hugging Face "
            "cache and run again; otherwise pick another file with --model-path."
        )
    if isinstance(error, (TokenizerError, TemplateError)):
        return "Pass a working tokenizer with --tokenizer, or --no-chat-template for a raw prompt."
    if isinstance(error, BackendUnavailable):
        return "Pick another --backend or --device (smollm3 --help lists them)."
    if isinstance(error, ContextOverflow):
        return "Start a new chat or drop the oldest turns."
    if isinstance(error, RemoteError):
        return "Check --endpoint, --api-key and --served-model; `smollm3 --endpoint URL --prompt hi` tries them quickly."
    return "Run `smollm3 --prompt ...` with SMOLLM3_DEBUG=1 for a traceback, and report it."


class SettingsScreen(ModalScreen[Settings | None]):
    """Temperature, top-p, top-k and the most tokens per answer; blank top-p/top-k turn them off."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, settings: Settings):
        super().__init__()
        self.settings = settings

    def compose(self) -> ComposeResult:
        s = self.settings.sampling
        with Vertical(id="settings-box", classes="dialog"):
            yield Label("Settings", classes="dialog-title")
            for key, label, value, hint in (
                ("temperature", "Temperature", s.temperature, "0 is greedy"),
                ("top_p", "Top-p", s.top_p, "(0, 1], blank: off"),
                ("top_k", "Top-k", s.top_k, "1 or more, blank: off"),
                ("max_new_tokens", "Max tokens", self.settings.max_new_tokens, "per answer"),
            ):
                with Horizontal(classes="field"):
                    yield Label(label, classes="field-label")
                    yield Input("" if value is None else str(value), id=key, classes="field-input")
                    yield Label(hint, classes="field-hint")
            yield Static("", id="settings-error", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")
        yield Footer()

    def parse(self) -> Settings:
        def value(key: str) -> str:
            return self.query_one(f"#{key}", Input).value.strip()

        def number(key: str, kind, name: str, optional: bool = False):
            text = value(key)
            if not text and optional:
                return None
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"{name}: '{text}' is not a{'n integer' if kind is int else ' number'}") from None

        temperature = number("temperature", float, "Temperature")
        if temperature < 0:
            raise ValueError("Temperature must be 0 or more")
        max_new_tokens = number("max_new_tokens", int, "Max tokens")
        if max_new_tokens < 1:
            raise ValueError("Max tokens must be at least 1")
        sampling = SamplingParams(
            temperature=temperature,
            top_p=number("top_p", float, "Top-p", optional=True),
            top_k=number("top_k", int, "Top-k", optional=True),
            repeat_penalty=self.settings.sampling.repeat_penalty,
            repeat_last_n=self.settings.sampling.repeat_last_n,
            seed=self.settings.sampling.seed,
        ).validate()
        return Settings(sampling, max_new_tokens)

    def action_save(self) -> None:
        try:
            self.dismiss(self.parse())
        except ValueError as e:
            self.query_one("#settings-error", Static).update(str(e).replace("--top-p", "Top-p").replace("--top-k", "Top-k"))

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Input.Submitted)
    def _submitted(self) -> None:
        self.action_save()

    @on(Button.Pressed, "#save")
    def _save(self) -> None:
        self.action_save()

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.action_cancel()


class SystemPromptScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, text: str | None):
        super().__init__()
        self.text = text or ""

    def compose(self) -> ComposeResult:
        with Vertical(id="system-box", classes="dialog"):
            yield Label("System prompt", classes="dialog-title")
            yield Static(
                "Instructions for this chat; empty for the model's default. Changing it changes the start "
                "of the prompt, so the next answer prefills the whole conversation again.",
                classes="dialog-help",
            )
            yield TextArea(self.text, id="system-text", soft_wrap=True)
            with Horizontal(classes="buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")
        yield Footer()

    def action_save(self) -> None:
        self.dismiss(self.query_one("#system-text", TextArea).text.strip())

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#save")
    def _save(self) -> None:
        self.action_save()

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.action_cancel()


class HistoryScreen(ModalScreen[int | None]):
    """Stored chats, newest first: open, rename, delete, export. Dismisses with the chat to open."""

    BINDINGS = [
        Binding("escape", "cancel", "Back"),
        Binding("enter", "open", "Open", show=True, priority=True),
        Binding("r", "rename", "Rename"),
        Binding("d", "delete", "Delete"),
        Binding("e", "export", "Export"),
    ]

    def __init__(self, chat_screen):
        super().__init__()
        self.chat_screen = chat_screen  # the ChatScreen that opened this one
        self.store = chat_screen.store
        self.current = chat_screen.chat_id

    def compose(self) -> ComposeResult:
        with Vertical(id="history-box", classes="dialog"):
            yield Label("Chats", classes="dialog-title")
            yield DataTable(id="chats", cursor_type="row", zebra_stripes=True)
            yield Static("", id="history-empty")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("Title", key="title")
        table.add_column("Messages", key="messages")
        table.add_column("Last used", key="updated")
        self.reload()
        self._start_on_previous_chat()

    def reload(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        chats = self.store.chats()
        for chat in chats:
            marker = "● " if chat.id == self.current else ""
            updated = time.strftime("%Y-%m-%d %H:%M", time.localtime(chat.updated))
            table.add_row(Text(marker + chat.title), str(chat.messages), updated, key=str(chat.id))  # Text: no markup
        self.query_one("#history-empty", Static).update("" if chats else "No stored chats yet.")

    def _start_on_previous_chat(self) -> None:
        """Start on the newest chat that is not the one open (Enter would only reopen that)."""
        table = self.query_one(DataTable)
        others = [i for i, chat in enumerate(self.store.chats()) if chat.id != self.current]
        if others:
            table.move_cursor(row=others[0])

    def selected(self) -> int | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key
        return int(key.value)

    def action_open(self) -> None:
        if (chat := self.selected()) is not None:
            self.dismiss(chat)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_open()

    def action_rename(self) -> None:
        chat = self.selected()
        if chat is None:
            return
        title = self.store.load_chat(chat).title

        def done(new: str | None) -> None:
            if new:
                self.store.rename_chat(chat, new)
                self.chat_screen.chat_renamed(chat, new)
                self.reload()

        self.app.push_screen(InputScreen("Rename chat", title), done)

    def action_delete(self) -> None:
        chat = self.selected()
        if chat is None:
            return
        if chat == self.current and self.chat_screen.generating:
            self.notify("This chat is answering: stop it (Esc) before deleting it", severity="warning")
            return
        title = self.store.load_chat(chat).title

        def done(choice: str | None) -> None:
            if choice == "delete":
                self.store.delete_chat(chat)
                self.chat_screen.chat_deleted(chat)
                self.reload()

        self.app.push_screen(
            ChoiceScreen("Delete chat", f"Delete “{title}” and all its messages?", [("delete", "Delete", "y"), ("keep", "Keep", "n")]),
            done,
        )

    def action_export(self) -> None:
        if (chat := self.selected()) is not None:
            from .commands import export_chat  # (commands opens this screen)

            export_chat(self.chat_screen, chat)

    def action_cancel(self) -> None:
        self.dismiss(None)
