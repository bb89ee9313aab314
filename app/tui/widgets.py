"""The chat's widgets: the input box, the messages, the thinking block and the status line."""

from __future__ import annotations

import re
import time

from textual import events
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Collapsible, Label, LoadingIndicator, Markdown, Static, TextArea
from textual.widgets.markdown import MarkdownStream

from ..session import ChatMessage, has_open_think, split_thinking
from .markdown import chat_parser, close_open_fence, visible
from .dialogs import copy_code_block

# What a stored status means to the reader, and whether ctrl+r can go on from it.
STATUS_NOTES = {
    "stopped": "stopped · ctrl+r continues",
    "length": "reached the token limit · ctrl+r continues",
    "context": "stopped: the context is full",
    "streaming": "interrupted (the app was closed while answering) · ctrl+r continues",
}
CONTINUABLE = {"stopped", "length", "context", "streaming"}


class PromptInput(TextArea):
    """Multi-line input: Enter sends, Shift+Enter or Ctrl+J adds a line; Up on the first line and
    Down on the last walk through earlier inputs."""

    BINDINGS = [Binding("ctrl+j", "newline", "Newline", show=False)]

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, inputs: list[str] | None = None, **kwargs):
        super().__init__(soft_wrap=True, show_line_numbers=False, compact=True, **kwargs)
        self.inputs: list[str] = list(inputs or [])
        self._index = len(self.inputs)  # == len(history): editing a new draft
        self._draft = ""

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.action_newline()
            return
        await super()._on_key(event)

    def action_newline(self) -> None:
        self.insert("\n")

    def set_inputs(self, inputs: list[str]) -> None:
        self.inputs = list(inputs)
        self._index = len(self.inputs)

    def remember(self, text: str) -> None:
        if text.strip() and (not self.inputs or self.inputs[-1] != text):
            self.inputs.append(text)
        self._index = len(self.inputs)
        self._draft = ""

    def action_cursor_up(self, select: bool = False) -> None:
        if select or self.cursor_location[0] > 0 or self._index == 0:
            return super().action_cursor_up(select)
        if self._index == len(self.inputs):
            self._draft = self.text
        self._index -= 1
        self.load_text(self.inputs[self._index])
        self.move_cursor((0, len(self.document.get_line(0))))

    def action_cursor_down(self, select: bool = False) -> None:
        last_row = self.document.line_count - 1
        if select or self.cursor_location[0] < last_row or self._index >= len(self.inputs):
            return super().action_cursor_down(select)
        self._index += 1
        self.load_text(self._draft if self._index == len(self.inputs) else self.inputs[self._index])
        self.move_cursor(self.document.end)


class SystemPromptView(Static):
    """The chat's system prompt, shown above the messages while one is set."""

    def on_mount(self) -> None:
        self.border_title = "System prompt"
        self.display = False

    def show(self, text: str | None) -> None:
        self.update(text or "")
        self.display = bool(text)


class UserMessage(Static, can_focus=True):
    BINDINGS = [Binding("c", "copy", "Copy message")]

    def __init__(self, message: ChatMessage, **kwargs):
        super().__init__(visible(message.content), markup=False, **kwargs)
        self.message = message
        self.border_title = "You"

    @property
    def text(self) -> str:
        return self.message.content

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.text)
        self.notify("Message copied", timeout=2)


class ThinkingBlock(Collapsible):
    """The model's reasoning: dimmed, open while it streams, folded once the answer starts."""

    def __init__(self, text: str = "", collapsed: bool = False):
        self.body = Markdown(text, classes="thinking-text", parser_factory=chat_parser)
        super().__init__(self.body, title="Thinking…", collapsed=collapsed)


class AssistantMessage(Vertical, can_focus=True):
    """One answer: an optional thinking block, the answer as Markdown, and a status note.

    While streaming, text is appended to the Markdown widgets through `MarkdownStream`, which
    parses only the last block again and merges fragments the UI cannot keep up with; `finish`
    renders the whole text once, so a code fence opened mid-stream closes properly.
    """

    BINDINGS = [
        Binding("c", "copy", "Copy answer"),
        Binding("b", "copy_code", "Copy code block"),
    ]

    def __init__(self, message: ChatMessage | None = None, streaming: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.message = message  # None until the first token: the session adds the turn then
        self.status = message.status if message else "done"
        self.think_text, self.answer_text = split_thinking(message.content if message else "")
        self.streaming = streaming
        self.thinking_block: ThinkingBlock | None = None
        self.answer = Markdown(visible(close_open_fence(self.answer_text.strip())), classes="answer", parser_factory=chat_parser)
        self.note = Static("", classes="note", markup=False)
        self._think_stream: MarkdownStream | None = None
        self._answer_stream: MarkdownStream | None = None
        self.border_title = "SmolLM"

    def compose(self):
        if self.think_text.strip():
            self.thinking_block = ThinkingBlock(visible(close_open_fence(self.think_text.strip())), collapsed=True)
            self.thinking_block.title = "Thought"
            yield self.thinking_block
        yield self.answer
        yield self.note

    def on_mount(self) -> None:
        self.set_status(self.status if not self.streaming else "streaming-live")

    def set_status(self, status: str, error: str | None = None) -> None:
        self.status = status
        if error:
            text = f"error: {error}"
        elif status == "streaming-live":
            text = "…"
        else:
            text = STATUS_NOTES.get(status, "")
        self.note.update(text)
        self.note.display = bool(text)
        self.set_class(status in CONTINUABLE or bool(error), "-stopped")

    async def add_pieces(self, pieces: list[tuple[str, str]]) -> None:
        """Append streamed ("think" | "answer", text) pieces."""
        for kind, text in pieces:
            if kind == "think":
                await self._add_thinking(text)
            else:
                await self._add_answer(text)

    async def _add_thinking(self, text: str) -> None:
        self.think_text += text
        if self.thinking_block is None:
            if not self.think_text.strip():
                return  # an empty think block is never shown
            self.thinking_block = ThinkingBlock()
            await self.mount(self.thinking_block, before=self.answer)
            text = self.think_text.lstrip()
        if self._think_stream is None:
            self._think_stream = Markdown.get_stream(self.thinking_block.body)
        await self._think_stream.write(visible(text))

    async def _add_answer(self, text: str) -> None:
        if not self.answer_text and not text.strip():
            self.answer_text += text
            return  # the newlines after </think>: nothing to show yet
        if self.thinking_block is not None and not self.thinking_block.collapsed and self._answer_stream is None:
            self.thinking_block.collapsed = True
            self.thinking_block.title = "Thought"
        first = not self.answer_text.strip()
        self.answer_text += text
        if self._answer_stream is None:
            self._answer_stream = Markdown.get_stream(self.answer)
        await self._answer_stream.write(visible(self.answer_text.lstrip() if first else text))

    async def finish(self, content: str, status: str, error: str | None = None) -> None:
        """The stream ended: one full render of the final text."""
        for stream in (self._think_stream, self._answer_stream):
            if stream is not None:
                await stream.stop()
        self._think_stream = self._answer_stream = None
        self.streaming = False
        self.think_text, self.answer_text = split_thinking(content)
        if self.thinking_block is not None:
            await self.thinking_block.body.update(visible(close_open_fence(self.think_text.strip())))
            if self.answer_text.strip():
                self.thinking_block.collapsed = True
            self.thinking_block.title = "Thought"
        await self.answer.update(visible(close_open_fence(self.answer_text.strip())))
        self.set_status(status, error)

    def resume_streaming(self) -> None:
        """Continue: later pieces extend this message (a thought stopped midway opens again)."""
        self.streaming = True
        self.set_status("streaming-live")
        if self.thinking_block is not None and self.message and has_open_think(self.message.content):
            self.thinking_block.collapsed = False
            self.thinking_block.title = "Thinking…"

    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.answer_text.strip())
        self.notify("Answer copied", timeout=2)

    def action_copy_code(self) -> None:
        copy_code_block(self, self.answer_text)


_ANSI_CSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


class LoadingPanel(Vertical):
    """Shown above the chat while the engine loads: the latest progress line (including the
    download bars the Hub client prints, captured by the app) and the time spent; on failure,
    the error and what to do. The input box stays usable: a message sent now waits for the model."""

    class Progress(Message):
        """A line from the loader (posted here, so that it keeps its order with printed output)."""

        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def __init__(self, model_label: str, **kwargs):
        super().__init__(**kwargs)
        self.model_label = model_label
        self.started = time.monotonic()
        self.failed = False
        self.capturing = False  # the app sends what is printed here while it loads

    def compose(self):
        yield Label(f"Loading {self.model_label}", id="loading-title", markup=False)
        yield LoadingIndicator(id="loading-indicator")
        yield Static("", id="loading-step", markup=False)
        yield Static("", id="loading-error", markup=False)
        yield Static("", id="loading-hint", markup=False)

    def on_mount(self) -> None:
        self.query_one("#loading-error").display = False
        self.query_one("#loading-hint").display = False
        self._ticker = self.set_interval(0.5, self._tick)
        # From now on, so that nothing the loader prints (download progress bars) is missed.
        self.app.begin_capture_print(self, stdout=True, stderr=True)
        self.capturing = True

    def _end_capture(self) -> None:
        if self.capturing:
            self.app.end_capture_print(self)
            self.capturing = False

    def on_print(self, event: events.Print) -> None:
        # tqdm redraws its bar with "\r" (and moves the cursor for nested bars): the last
        # non-empty segment, without escape sequences, is the current state.
        text = _ANSI_CSI.sub("", event.text).replace("\r", "\n").strip()
        if text:
            self.progress(text.splitlines()[-1])

    def on_loading_panel_progress(self, event: Progress) -> None:
        self.progress(event.text)

    def progress(self, text: str) -> None:
        if not self.failed:
            self.query_one("#loading-step", Static).update(text)

    def _tick(self) -> None:
        if not self.failed:
            self.query_one("#loading-title", Label).update(
                f"Loading {self.model_label} ({time.monotonic() - self.started:.0f} s)"
            )

    def show_error(self, message: str, hint: str) -> None:
        self._end_capture()
        self.failed = True
        self._ticker.stop()
        self.add_class("-failed")
        self.query_one("#loading-title", Label).update(f"Could not load {self.model_label}")
        self.query_one(LoadingIndicator).display = False
        self.query_one("#loading-step").display = False
        error = self.query_one("#loading-error", Static)
        error.update(message)
        error.display = True
        hint_widget = self.query_one("#loading-hint", Static)
        hint_widget.update(f"{hint}\n\nCtrl+Q quits.")
        hint_widget.display = True

    def done(self) -> None:
        self._end_capture()
        self._ticker.stop()
        self.display = False
