"""A chat session: the conversation, how it becomes prompt tokens, and reply streaming.

One-shot mode and the TUI both drive an engine through this, so prompt building and
thinking handling live in one place.

Every turn renders the whole conversation and tokenizes it; the engine reuses its KV cache
for the longest common token prefix. An assistant message keeps the text exactly as
generated (in /think mode with its `<think>...</think>` block), so that the next turn's
prompt starts with the tokens the cache already holds and only the new turn is prefilled.

A remote engine (backends.remote) takes the same conversation as messages and renders it on the
server; `_texts` is the one place the two kinds differ.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

from backends import Engine, SamplingParams

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

StopCheck = Callable[[], bool]
PrefillProgress = Callable[[int, int], None]  # (prompt tokens computed so far, to compute)

# done | stopped (by the user) | length (max tokens) | context (the context filled up) |
# streaming (being generated, or the app died while it was)
STATUSES = ("done", "stopped", "length", "context", "streaming")
STATUS_BY_REASON = {"eos": "done", "length": "length", "context": "context"}  # else "stopped"


@dataclass
class ChatMessage:
    """One turn of a chat, as the session, the store, the widgets and the export all see it."""

    role: str  # "user" | "assistant"
    content: str
    status: str = "done"
    id: int | None = None  # the row in the store, once stored
    in_context: bool = True  # False: dropped from the model's context, kept in the history


@dataclass
class ChatSession:
    engine: Engine
    thinking: bool = False
    use_template: bool = True
    system_prompt: str | None = None
    # Only role and content reach the template.
    messages: list[ChatMessage] = field(default_factory=list)
    # Why the last reply ended: the engine's "eos" | "length" | "context", or "stopped" when the
    # caller stopped it (should_stop, or closing the stream early).
    last_stop_reason: str = ""

    # --- prompts ---

    def render(self, add_generation_prompt: bool = True, messages: list[ChatMessage] | None = None) -> str:
        messages = self.messages if messages is None else messages
        if not self.use_template or self.engine.chat_template is None:
            # Raw mode: the conversation is the concatenated text, as a base model expects.
            return "".join(m.content for m in messages)
        turns = [{"role": m.role, "content": self._template_content(m)} for m in messages]
        if self.system_prompt:
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        return self.engine.chat_template.render(
            turns, add_generation_prompt=add_generation_prompt, enable_thinking=self.thinking
        )

    def _template_content(self, message: ChatMessage) -> str:
        if message.role == "assistant" and not self.thinking:
            # A /no_think prompt gives every assistant turn an empty think block of its own; a
            # reasoning kept from a /think turn would sit after it as answer text.
            return split_thinking(message.content)[1]
        return message.content

    def prompt_ids(self) -> list[int]:
        return self.engine.tokenizer.encode(self.render())

    def context_tokens(self) -> int | None:
        """Tokens the conversation takes now, without a generation prompt (0 when empty; None
        when a remote server has not counted them yet)."""
        if not self.messages:
            return 0
        if is_remote(self.engine):
            # No tokenizer here: the server's count of the last prompt and answer.
            stats = self.engine.stats
            return stats.prompt_tokens + stats.generated_tokens if stats.prompt_tokens else None
        return len(self.engine.tokenizer.encode(self.render(add_generation_prompt=False)))

    @property
    def supports_thinking(self) -> bool:
        if is_remote(self.engine):
            return self.engine.supports_thinking
        template = self.engine.chat_template
        return self.use_template and template is not None and "enable_thinking" in template.source

    # --- replies ---

    def reply(
        self,
        user_text: str,
        max_new_tokens: int,
        sampling: SamplingParams,
        split_prompt: bool = False,
        should_stop: StopCheck | None = None,
        prefill_progress: PrefillProgress | None = None,
    ) -> Iterator[str]:
        """Add a user turn and stream the assistant's text; the reply is added as a turn."""
        self.messages.append(ChatMessage("user", user_text))
        return self.generate(max_new_tokens, sampling, split_prompt, should_stop, prefill_progress)

    def generate(
        self,
        max_new_tokens: int,
        sampling: SamplingParams,
        split_prompt: bool = False,
        should_stop: StopCheck | None = None,
        prefill_progress: PrefillProgress | None = None,
    ) -> Iterator[str]:
        """Stream a new assistant turn answering the conversation as it stands.

        The turn is appended to `messages` when the first token is about to be computed and its
        content grows as text streams, so a stopped or failed reply keeps what was generated.
        """
        message = ChatMessage("assistant", "", status="streaming")
        return self._stream(message, max_new_tokens, sampling, split_prompt, should_stop, prefill_progress, continuing=False)

    def continue_reply(
        self,
        max_new_tokens: int,
        sampling: SamplingParams,
        should_stop: StopCheck | None = None,
        prefill_progress: PrefillProgress | None = None,
    ) -> Iterator[str]:
        """Stream more of the last assistant message (one that was stopped), extending its content."""
        if not self.messages or self.messages[-1].role != "assistant":
            raise ValueError("there is no assistant message to continue")
        message = self.messages[-1]
        if not self.thinking and has_open_think(message.content):
            # Stopped while reasoning, continued without: close the block so the rest is an answer.
            message.content += "\n" + THINK_CLOSE + "\n"
        return self._stream(message, max_new_tokens, sampling, False, should_stop, prefill_progress, continuing=True)

    def cancel(self) -> None:
        """Stop the reply being streamed, from another thread. A local engine stops at the next
        token through `should_stop`; a remote one may be waiting on the network, so it is told."""
        if is_remote(self.engine):
            self.engine.cancel()

    # --- where the text comes from: the one place a local and a remote engine differ ---

    def _texts(self, continuing, max_new_tokens, sampling, split_prompt, should_stop, prefill_progress) -> Iterator[str]:
        """The reply's text pieces; an empty piece may mark a token whose text is held back.

        Ends after `should_stop()` turns true, with `engine.stats.stop_reason` "stopped"."""
        if is_remote(self.engine):
            return self.engine.chat(
                self.wire_messages(), max_new_tokens, sampling, thinking=self.thinking,
                should_stop=should_stop, continue_last=continuing,
            )
        if continuing and self.use_template and self.engine.chat_template is not None:
            # The start of the assistant turn as the template writes it, then the text so far.
            text = self.render(messages=self.messages[:-1]) + self._template_content(self.messages[-1]).lstrip("\n")
            ids = self.engine.tokenizer.encode(text)
        else:
            ids = self.prompt_ids()
        return self._token_texts(ids, max_new_tokens, sampling, split_prompt, should_stop, prefill_progress)

    def wire_messages(self) -> list[dict]:
        """The conversation as OpenAI-style messages: what `render` gives the template locally,
        so the server renders the same prompt (and its prefix cache matches the last turn's)."""
        turns = [{"role": m.role, "content": self._template_content(m)} for m in self.messages]
        if self.system_prompt:
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        return turns

    def _token_texts(self, ids, max_new_tokens, sampling, split_prompt, should_stop, prefill_progress) -> Iterator[str]:
        tokens = self.engine.generate(ids, max_new_tokens, sampling, split_prompt=split_prompt, prefill_progress=prefill_progress)
        detok = self.engine.tokenizer.detokenizer()
        try:
            for token in tokens:
                yield detok.add(token)
                if should_stop():
                    self.engine.stats.stop_reason = "stopped"
                    break
            yield detok.flush()
        finally:
            tokens.close()

    def _stream(self, message, max_new_tokens, sampling, split_prompt, should_stop, prefill_progress, continuing) -> Iterator[str]:
        self.last_stop_reason = ""
        closing = False

        def stop() -> bool:
            return closing or (should_stop is not None and should_stop())

        append = not continuing
        reason = "stopped"

        def add(text: str) -> None:
            nonlocal append
            if append:  # on the first piece, or at the end: a failed prefill leaves no empty turn
                self.messages.append(message)
                append = False
            message.content += text

        texts = self._texts(continuing, max_new_tokens, sampling, split_prompt, stop, prefill_progress)
        try:
            for text in texts:
                add(text)
                if text:
                    yield text
            reason = self.engine.stats.stop_reason
            if reason != "stopped":  # an answer of no text (EOS first) is a turn; a stop before any is not
                add("")
        except GeneratorExit:
            # Closed early by the caller: let the source end at its stop check, which keeps the
            # text it holds back (a partial UTF-8 character) and generates nothing more.
            closing = True
            with contextlib.suppress(Exception):  # the caller has stopped listening: nothing to tell it
                for text in texts:
                    add(text)
            raise
        except BaseException:
            reason = "error"
            raise
        finally:
            texts.close()
            if reason == "stopped":
                self.engine.stats.stop_reason = "stopped"
            self.last_stop_reason = reason
            message.status = STATUS_BY_REASON.get(reason, "stopped")

    # --- editing the conversation ---

    def drop_oldest_turn(self) -> list[ChatMessage]:
        """Remove the oldest user turn and the replies to it; never the last user message.

        Returns the removed messages ([] when nothing can go), marked as out of the context.
        """
        users = [i for i, m in enumerate(self.messages) if m.role == "user"]
        if len(users) < 2:
            return []
        removed, self.messages = self.messages[: users[1]], self.messages[users[1] :]
        for m in removed:
            m.in_context = False
        return removed

    def last_answer(self) -> ChatMessage | None:
        return next((m for m in reversed(self.messages) if m.role == "assistant"), None)

    def clear(self) -> None:
        self.messages = []


def is_remote(engine) -> bool:
    """A server answers (backends.remote): it takes messages, not token ids."""
    return engine is not None and engine.info.backend == "remote"


def split_thinking(text: str) -> tuple[str, str]:
    """The reasoning and the answer of an assistant message, tags removed."""
    splitter = ThinkingSplitter()
    parts = {"think": [], "answer": []}
    for kind, piece in splitter.feed(text) + splitter.flush():
        parts[kind].append(piece)
    return "".join(parts["think"]), "".join(parts["answer"])


def has_open_think(text: str) -> bool:
    return text.rfind(THINK_OPEN) > text.rfind(THINK_CLOSE)


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
