"""A chat as a Markdown document."""

from __future__ import annotations

from ..session import split_thinking
from .markdown import close_open_fence
from .store import StoredChat

STATUS_SUFFIX = {
    "stopped": "*(stopped)*",
    "length": "*(stopped at the token limit)*",
    "context": "*(stopped: the context was full)*",
    "streaming": "*(interrupted)*",
}


def chat_markdown(chat: StoredChat) -> str:
    out = [f"# {chat.title}", ""]
    if chat.system_prompt:
        out += ["**System prompt:**", "", *(f"> {line}" for line in chat.system_prompt.splitlines()), ""]
    for m in chat.messages:
        if m.role == "user":
            out += ["## You", "", close_open_fence(m.content.strip()), ""]
            continue
        thinking, answer = split_thinking(m.content)
        out += ["## SmolLM", ""]
        if thinking.strip():
            out += ["<details><summary>Thinking</summary>", "", close_open_fence(thinking.strip()), "", "</details>", ""]
        if answer.strip():
            out += [close_open_fence(answer.strip()), ""]
        if suffix := STATUS_SUFFIX.get(m.status):
            out += [suffix, ""]
    return "\n".join(out).rstrip("\n") + "\n"
