"""Changing the turns of a chat: making room in a full context, answering again, editing the
last message. Each keeps the KV cache for what did not change: the engine reuses the longest
common token prefix of the new prompt."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..session import ChatMessage, is_remote
from .dialogs import ChoiceScreen

if TYPE_CHECKING:
    from .chat_screen import ChatScreen


def offer_context_relief(screen: ChatScreen, text: str) -> None:
    def chosen(choice: str | None) -> None:
        if choice == "drop":
            screen.run_worker(drop_to_fit(screen), group="ui", exclusive=True)
        elif choice == "new":
            # The message that did not fit goes to the new chat's input box, before anything
            # typed since (it stays in the old chat too).
            prompt = screen.query_prompt()
            pending = screen.session.messages[-1].content if screen.unanswered() else ""
            screen.run_worker(screen.new_chat(), group="ui")
            if pending:
                prompt.load_text(pending + (f"\n{prompt.text}" if prompt.text.strip() else ""))

    screen.app.push_screen(
        ChoiceScreen(
            "Context full",
            f"{text}\nDrop the oldest turns (they stay in the history, dimmed) or start a new chat.",
            [("drop", "Drop oldest turns", "d"), ("new", "New chat", "n"), ("keep", "Cancel", "c")],
            typing_to=screen.query_prompt(),
        ),
        chosen,
    )


def leaves_room(screen: ChatScreen) -> bool:
    """Whether the prompt leaves room for an answer in the context."""
    if is_remote(screen.engine):
        return True  # no tokenizer here to count with: one turn goes per request
    size = screen.engine.config.context_length
    return len(screen.session.prompt_ids()) + min(screen.settings.max_new_tokens, size // 4) <= size


async def drop_to_fit(screen: ChatScreen, at_least_one: bool = False) -> None:
    """Drop the oldest turns until the prompt leaves room for an answer, then go on."""
    dropped: list[ChatMessage] = []
    while (at_least_one and not dropped) or not leaves_room(screen):
        removed = screen.session.drop_oldest_turn()
        if not removed:
            break
        dropped += removed
    if not dropped:
        screen.notify("Nothing left to drop: only the last message is in the context", severity="warning")
        return
    screen.store.drop_from_context(dropped)
    screen.log_view.mark_dropped(dropped)
    screen.context_used = screen.session.context_tokens()
    screen.notify(f"Dropped {len(dropped)} message{'s' * (len(dropped) != 1)} from the context", timeout=3)
    if screen.unanswered() and not screen.generating:
        await screen.start_answer()


async def remove_last(screen: ChatScreen, role: str) -> ChatMessage | None:
    """Take the conversation back to before its last message of `role` (that message and any
    after it: from the session, the store and the screen); the removed message, or None."""
    messages = screen.session.messages
    at = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == role), None)
    if at is None:
        return None
    removed, screen.session.messages = messages[at:], messages[:at]
    for m in removed:
        if m.id is not None:
            screen.store.delete_message(m.id)
    await screen.log_view.remove_messages(removed)
    screen.context_used = screen.session.context_tokens()
    screen.stats = None  # they were the removed answer's
    screen.refresh_bindings()
    return removed[0]


async def regenerate(screen: ChatScreen) -> None:
    """Answer the last user message again, in place of the last answer."""
    if screen.busy():
        return
    if screen.session.messages and screen.session.messages[-1].role == "assistant":
        await remove_last(screen, "assistant")
    if not screen.unanswered():
        screen.notify("There is no answer to regenerate", timeout=3)
        return
    await screen.start_answer()


async def edit_last(screen: ChatScreen) -> None:
    """Put the last user message back in the input box, taking it and its answer out of the
    chat: sending it (changed or not) answers it again."""
    if screen.busy():
        return
    prompt = screen.query_prompt()
    if prompt.text.strip():
        screen.notify("Send or clear the text in the input box first", severity="warning", timeout=3)
        return
    message = await remove_last(screen, "user")
    if message is None:
        screen.notify("There is no message to edit", timeout=3)
        return
    prompt.load_text(message.content)
    prompt.move_cursor(prompt.document.end)
    prompt.focus()
