"""The slash commands (one table runs them and /help lists them), the command palette's
entries, and the chat's copy and export actions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable

from textual.app import SystemCommand

from ..session import split_thinking
from .export import chat_markdown
from .dialogs import HelpScreen, InputScreen
from .turns import edit_last, regenerate

if TYPE_CHECKING:
    from .chat_screen import ChatScreen

# Keys /help lists besides the chat screen's bindings.
OTHER_KEYS = [
    ("Enter", "send"),
    ("Shift+Enter, Ctrl+J", "new line"),
    ("Up, Down", "earlier inputs (on the first or last line)"),
    ("Ctrl+C", "stop the answer; twice: quit"),
    ("Ctrl+Q", "quit"),
    ("Ctrl+P", "command palette"),
    ("Tab", "to a message: c copies it, b its code"),
]


@dataclass(frozen=True)
class Command:
    usage: str  # as /help shows it
    help: str
    run: Callable[["ChatScreen", str], Awaitable[None] | None]  # given the text after the name
    aliases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.usage.split()[0]


def _system(screen: ChatScreen, arg: str) -> None:
    if arg:
        screen.set_system_prompt(arg)
    else:
        screen.action_system_prompt()


def _export(screen: ChatScreen, arg: str) -> None:
    if screen.chat_id is None:
        screen.notify("Nothing to export yet", timeout=2)
    else:
        export_chat(screen, screen.chat_id, arg or None)


COMMANDS = [
    Command("/think", "thinking on, from the next answer", lambda s, a: s.set_thinking(True)),
    Command("/no_think", "thinking off, from the next answer", lambda s, a: s.set_thinking(False)),
    Command("/new", "start a new chat", lambda s, a: s.action_new_chat(), ("/clear",)),
    Command("/system [text]", "set this chat's system prompt (without text: edit it)", _system),
    Command("/settings", "temperature, top-p, top-k, max tokens", lambda s, a: s.action_settings()),
    Command("/chats", "stored chats: open, rename, delete, export", lambda s, a: s.action_history(), ("/history",)),
    Command("/export [file.md]", "write this chat as Markdown", _export),
    Command("/continue", "go on with a stopped answer", lambda s, a: s.action_continue()),
    Command("/retry", "answer the last message again, in place of the last answer", lambda s, a: regenerate(s), ("/regenerate",)),
    Command("/edit", "put the last message back in the input box to change and send again", lambda s, a: edit_last(s)),
    Command("/drop", "take the oldest turn out of the context", lambda s, a: s.action_drop_oldest()),
    Command("/help", "this list", lambda s, a: show_help(s)),
    Command("/quit", "quit", lambda s, a: s.app.action_quit()),
]


def show_help(screen: ChatScreen) -> None:
    def key(name: str) -> str:
        parts = name.replace("escape", "esc").split("+")
        return "+".join(part.capitalize() if len(part) > 1 else part.upper() for part in parts)

    keys = OTHER_KEYS[:3] + [(key(b.key), b.tooltip or b.description) for b in screen.BINDINGS] + OTHER_KEYS[3:]
    screen.app.push_screen(HelpScreen(keys, [(c.usage, c.help) for c in COMMANDS]))


def find_command(name: str) -> Command | None:
    return next((c for c in COMMANDS if name == c.name or name in c.aliases), None)


async def run_command(screen: ChatScreen, text: str) -> bool:
    """Run a /command; False when it is not one (the text is then sent as a message)."""
    name, _, arg = text.partition(" ")
    command = find_command(name)
    if command is None:
        return False
    result = command.run(screen, arg.strip())
    if result is not None:
        await result
    return True


def system_commands(screen: ChatScreen) -> Iterable[SystemCommand]:
    """The command palette's entries for the chat."""
    yield SystemCommand("Toggle thinking", "Reason before answering, from the next answer (ctrl+t)", screen.action_toggle_thinking)
    yield SystemCommand("New chat", "Start an empty conversation (ctrl+n)", screen.action_new_chat)
    yield SystemCommand("Continue the answer", "Go on with a stopped answer (ctrl+r)", screen.action_continue)
    yield SystemCommand("Regenerate the answer", "Answer the last message again (/retry)", lambda: screen.run_worker(regenerate(screen)))
    yield SystemCommand("Edit the last message", "Change it and send it again (/edit)", lambda: screen.run_worker(edit_last(screen)))
    yield SystemCommand("Stop generating", "Keep what was generated so far (esc, ctrl+c)", screen.action_stop)
    yield SystemCommand("Chats", "Browse, resume, rename and delete stored chats (ctrl+o)", screen.action_history)
    yield SystemCommand("Settings", "Temperature, top-p, top-k, max tokens (ctrl+s)", screen.action_settings)
    yield SystemCommand("Edit system prompt", "Instructions for this chat (ctrl+g)", screen.action_system_prompt)
    yield SystemCommand("Export chat as Markdown", "Write this chat to a .md file", lambda: _export(screen, ""))
    yield SystemCommand("Copy last answer", "To the clipboard", lambda: copy_answer(screen))
    yield SystemCommand("Copy code block", "From the last answer (ctrl+b)", screen.action_copy_code)
    yield SystemCommand("Drop oldest turn", "Free context: the turn stays in the history", screen.action_drop_oldest)


def copy_answer(screen: ChatScreen) -> None:
    last = screen.session.last_answer()
    if last is None:
        screen.notify("No answer to copy yet", timeout=2)
        return
    screen.app.copy_to_clipboard(split_thinking(last.content)[1].strip())
    screen.notify("Answer copied", timeout=2)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-")


def export_chat(screen: ChatScreen, chat_id: int, path: str | None = None) -> None:
    chat = screen.store.load_chat(chat_id)

    def write(target: str | None) -> None:
        if not target:
            return
        file = Path(target).expanduser()
        try:
            file.write_text(chat_markdown(chat), encoding="utf-8")
        except OSError as e:
            screen.notify(f"Cannot write {file}: {e.strerror or e}", severity="error", markup=False)
            return
        screen.notify(f"Exported to {file}", timeout=4, markup=False)

    if path is not None:
        write(path)
    else:
        default = str(Path.cwd() / f"{slug(chat.title) or f'chat-{chat.id}'}.md")
        screen.app.push_screen(InputScreen("Export chat as Markdown to", default), write)
