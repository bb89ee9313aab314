"""The scrolling list of a chat's messages: the system prompt, a note for messages taken off
the screen, and one widget per message, found by the message's id in the store."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import Static

from ..session import ChatMessage
from .widgets import AssistantMessage, SystemPromptView, UserMessage

MessageWidget = UserMessage | AssistantMessage


def message_widget(message: ChatMessage) -> MessageWidget:
    widget = UserMessage(message) if message.role == "user" else AssistantMessage(message)
    if not message.in_context:
        mark_dropped(widget)
    return widget


def mark_dropped(widget: MessageWidget) -> None:
    widget.add_class("dropped")
    widget.border_subtitle = "not in context"


class ChatLog(VerticalScroll):
    # Messages on screen, the newest: each one costs memory and layout time, so a long chat
    # would grow and slow down; older ones stay in the stored chat (/export writes it whole).
    MAX_SHOWN_MESSAGES = 100

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.widgets_by_id: dict[int, MessageWidget] = {}
        self.hidden_messages = 0  # older messages of this chat taken off the screen
        self.welcome_text = ""

    def compose(self):
        yield Static("", id="welcome", markup=False)
        yield SystemPromptView("", id="system-view", markup=False)
        yield Static("", id="hidden-note", markup=False)

    def show_welcome(self, text: str) -> None:
        """A line about the model and the keys, shown while the chat is empty."""
        self.welcome_text = text
        self.query_one("#welcome", Static).update(text)
        self._show_welcome_if_empty()

    def _show_welcome_if_empty(self) -> None:
        empty = not self.query_children("UserMessage, AssistantMessage")
        self.query_one("#welcome").display = bool(self.welcome_text) and empty

    def on_mount(self) -> None:
        self._show_welcome_if_empty()

    def show_system_prompt(self, text: str | None) -> None:
        self.query_one(SystemPromptView).show(text)

    def widget_for(self, message: ChatMessage | None) -> MessageWidget | None:
        return self.widgets_by_id.get(message.id) if message is not None and message.id is not None else None

    def track(self, widget: MessageWidget) -> None:
        if widget.message is not None and widget.message.id is not None:
            self.widgets_by_id[widget.message.id] = widget

    async def add(self, widget: MessageWidget) -> None:
        self.query_one("#welcome").display = False
        self.track(widget)
        await self.mount(widget)
        await self._trim()
        self.anchor()

    async def show(self, messages: list[ChatMessage]) -> None:
        """A whole chat: the newest MAX_SHOWN_MESSAGES of it."""
        await self.clear()
        shown = [message_widget(m) for m in messages[-self.MAX_SHOWN_MESSAGES :]]
        for widget in shown:
            self.track(widget)
        await self.mount_all(shown)
        self._show_welcome_if_empty()
        await self._trim(unmounted=len(messages) - len(shown))
        self.anchor()

    async def clear(self) -> None:
        self.widgets_by_id.clear()
        await self.remove_children(UserMessage)
        await self.remove_children(AssistantMessage)
        self.hidden_messages = 0
        self.query_one("#hidden-note", Static).display = False
        self._show_welcome_if_empty()

    async def remove_messages(self, messages: list[ChatMessage]) -> None:
        widgets = [w for m in messages if (w := self.widget_for(m))]
        for m in messages:
            self.widgets_by_id.pop(m.id, None)
        await self.remove_children(widgets)
        self._show_welcome_if_empty()

    def mark_dropped(self, messages: list[ChatMessage]) -> None:
        for m in messages:
            if widget := self.widget_for(m):
                mark_dropped(widget)

    async def _trim(self, unmounted: int = 0) -> None:
        """Take the oldest messages off the screen beyond MAX_SHOWN_MESSAGES (`unmounted`: more of
        them that were never put on it), and say how many are not shown."""
        shown = list(self.query_children("UserMessage, AssistantMessage"))
        old = shown[: max(len(shown) - self.MAX_SHOWN_MESSAGES, 0)]
        if not old and not unmounted:
            return
        for widget in old:
            if widget.message is not None:
                self.widgets_by_id.pop(widget.message.id, None)
        self.hidden_messages += len(old) + unmounted
        await self.remove_children(old)
        note = self.query_one("#hidden-note", Static)
        n = self.hidden_messages
        note.update(f"{n} earlier message{'s' * (n != 1)} not shown: the chat keeps them (/export writes it whole)")
        note.display = True
