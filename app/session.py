"""A chat session: the conversation, how it becomes prompt tokens, and reply streaming.

One-shot mode and the TUI both drive an engine through this, so prompt building and
thinking handling live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from backends import Engine, SamplingParams

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class ChatSession:
    engine: Engine
    thinking: bool = False
    use_template: bool = True
    system_prompt: str | None = None
    messages: list[dict] = field(default_factory=list)

    def render(self, add_generation_prompt: bool = True) -> str:
        if not self.use_template or self.engine.chat_template is None:
            # Raw mode: the conversation is the concatenated text, as a base model expects.
            return "".join(m["content"] for m in self.messages)
        messages = list(self.messages)
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.engine.chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, enable_thinking=self.thinking
        )

    def prompt_ids(self) -> list[int]:
        return self.engine.tokenizer.encode(self.render())

    def reply(self, user_text: str, max_new_tokens: int, sampling: SamplingParams, split_prompt: bool = False) -> Iterator[str]:
        """Add a user turn and stream the assistant's text; the finished reply is added as a turn."""
        self.messages.append({"role": "user", "content": user_text})
        ids = self.prompt_ids()
        detok = self.engine.tokenizer.detokenizer()
        parts: list[str] = []
        try:
            for token in self.engine.generate(ids, max_new_tokens, sampling, split_prompt=split_prompt):
                if text := detok.add(token):
                    parts.append(text)
                    yield text
            if text := detok.flush():
                parts.append(text)
                yield text
        finally:
            self.messages.append({"role": "assistant", "content": "".join(parts)})


class ThinkingSplitter:
    """Splits streamed text into ("think", text) and ("answer", text) pieces, tags removed.

    A tag may arrive split over chunks, so a trailing prefix of a tag is held back.
    """

    def __init__(self, thinking_first: bool = False):
        self.in_think = thinking_first
        self.pending = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.pending += text
        out: list[tuple[str, str]] = []
        while True:
            tag = THINK_CLOSE if self.in_think else THINK_OPEN
            at = self.pending.find(tag)
            if at >= 0:
                if at:
                    out.append(self._piece(self.pending[:at]))
                self.pending = self.pending[at + len(tag) :]
                self.in_think = not self.in_think
                continue
            keep = _partial_suffix(self.pending, tag)
            if len(self.pending) > keep:
                out.append(self._piece(self.pending[: len(self.pending) - keep]))
                self.pending = self.pending[len(self.pending) - keep :]
            return out

    def flush(self) -> list[tuple[str, str]]:
        rest, self.pending = self.pending, ""
        return [self._piece(rest)] if rest else []

    def _piece(self, text: str) -> tuple[str, str]:
        return ("think" if self.in_think else "answer", text)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
