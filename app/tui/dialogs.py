"""Small dialogs: one line of text, a choice with keys, the help, a code block to copy."""

from __future__ import annotations

import time

from rich.table import Table
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Footer, Input, Label, OptionList, Static, TextArea

from ..session import split_thinking
from .markdown import code_blocks


class InputScreen(ModalScreen[str | None]):
    """One line of text (a chat's new title, a file to export to)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str, value: str = ""):
        super().__init__()
        self.title_text = title
        self.value = value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small"):
            yield Label(self.title_text, classes="dialog-title")
            yield Input(self.value, id="value")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ChoiceScreen(ModalScreen[str | None]):
    """A question with a few answers, each with a key.

    It may open while the user types (the context filled up as a message was sent): keys that
    come before it has been still for ARM_S go on to the input box under it, never to a choice.
    """

    BINDINGS = [Binding("escape", "cancel", "Cancel")]
    AUTO_FOCUS = None  # a focused button would take Enter before the dialog is armed
    ARM_S = 0.6

    def __init__(self, title: str, text: str, choices: list[tuple[str, str, str]], typing_to: TextArea | None = None):
        """choices: (id, label, key); typing_to: where keys typed before the dialog is armed go."""
        super().__init__()
        self.title_text = title
        self.text = text
        self.choices = choices
        self.typing_to = typing_to
        self.armed_at = time.monotonic() + self.ARM_S

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog small"):
            yield Label(self.title_text, classes="dialog-title", markup=False)
            yield Static(self.text, classes="dialog-help", markup=False)
            with Horizontal(classes="buttons"):
                for i, (choice, label, key) in enumerate(self.choices):
                    yield Button(escape(f"{label} [{key}]"), id=f"choice-{choice}", variant="primary" if i == 0 else "default")

    def on_mount(self) -> None:
        self.set_timer(self.ARM_S, self._arm)

    def _arm(self) -> None:
        """Once the keys have been still for ARM_S, Enter presses the first button."""
        if (wait := self.armed_at - time.monotonic()) > 0:
            self.set_timer(wait, self._arm)
        elif self.focused is None:
            self.query(Button).first().focus()

    def on_key(self, event: events.Key) -> None:
        now = time.monotonic()
        if now < self.armed_at:
            # Still typing: nothing here acts on it (not Enter on a button either).
            event.stop()
            event.prevent_default()
            self.armed_at = now + self.ARM_S
            if self.typing_to is not None and event.is_printable and event.character:
                self.typing_to.insert(event.character)
            return
        for choice, _, key in self.choices:
            if event.key == key:
                event.stop()
                self.dismiss(choice)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id.removeprefix("choice-"))

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    """The keys and the slash commands, until closed."""

    BINDINGS = [Binding("escape", "close", "Close"), Binding("q", "close", "Close", show=False)]

    def __init__(self, keys: list[tuple[str, str]], commands: list[tuple[str, str]]):
        super().__init__()
        self.keys = keys
        self.commands = commands

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box", classes="dialog"):
            yield Label("Help", classes="dialog-title")
            with VerticalScroll():
                yield Static(self.table(), id="help-text")
        yield Footer()

    def table(self) -> Table:
        """Keys, then commands, in two columns; the descriptions wrap in theirs (plain Text: a
        `[text]` in a command's usage is shown, not taken for markup)."""
        grid = Table.grid(padding=(0, 2))
        grid.add_column(no_wrap=True)
        grid.add_column()
        for heading, rows in (("Keys", self.keys), ("Commands", self.commands)):
            grid.add_row(Text(heading, style="bold"), "")
            for name, what in rows:
                grid.add_row(Text(name), Text(what))
            grid.add_row("", "")
        return grid

    def action_close(self) -> None:
        self.dismiss(None)


class CodeBlockScreen(ModalScreen[str | None]):
    """Pick one of an answer's code blocks to copy."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, blocks: list[str]):
        super().__init__()
        self.blocks = blocks

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Copy which code block?", classes="dialog-title")
            yield OptionList(*(Text(self._preview(i, b)) for i, b in enumerate(self.blocks)), id="blocks")

    @staticmethod
    def _preview(i: int, block: str) -> str:
        first = block.strip().splitlines()[0] if block.strip() else ""
        lines = block.count("\n")
        return f"{i + 1}. {first[:60]}  ({lines} line{'s' if lines != 1 else ''})"

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.blocks[event.option_index])

    def action_cancel(self) -> None:
        self.dismiss(None)


def copy_code_block(widget: Widget, text: str) -> None:
    """Copy the code block of an answer; with several, ask which."""
    blocks = code_blocks(split_thinking(text)[1])
    if not blocks:
        widget.notify("No code block in that answer", timeout=2)
    elif len(blocks) == 1:
        widget.app.copy_to_clipboard(blocks[0])
        widget.notify("Code block copied", timeout=2)
    else:

        def chosen(block: str | None) -> None:
            if block is not None:
                widget.app.copy_to_clipboard(block)
                widget.notify("Code block copied", timeout=2)

        widget.app.push_screen(CodeBlockScreen(blocks), chosen)
