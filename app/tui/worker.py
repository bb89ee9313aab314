"""The generation worker: runs in a thread that owns the engine while it generates.

It feeds the session's text stream through a ThinkingSplitter, posts the pieces in merged
bursts (at most every BURST_S), checks `is_cancelled` after every token, and ends with one
`Finished`. It never touches widgets or the store: those belong to the UI thread.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

from textual.message import Message

from backends import GenerationStats, SamplingParams, SmolLMError
from backends.errors import ContextOverflow

from ..session import ChatMessage, ChatSession, ThinkingSplitter
from .messages import ContextFull, Finished, Piece, Pieces, PrefillProgress, merge_pieces

BURST_S = 1 / 30  # tokens are posted to the UI at most this often, merged
PROGRESS_S = 0.1  # prefill progress is posted at most this often


@dataclass(frozen=True)
class Settings:
    sampling: SamplingParams
    max_new_tokens: int

    def to_dict(self) -> dict:
        s = self.sampling
        return {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "max_new_tokens": self.max_new_tokens}

    def updated(self, stored: dict | None) -> Settings:
        """These settings with the stored ones over them; unchanged when those are not valid."""
        if not stored:
            return self
        try:
            sampling = dataclasses.replace(
                self.sampling, temperature=float(stored["temperature"]), top_p=stored["top_p"], top_k=stored["top_k"]
            ).validate()
            max_new_tokens = int(stored["max_new_tokens"])
        except (KeyError, TypeError, ValueError):
            return self
        ok = math.isfinite(sampling.temperature) and sampling.temperature >= 0 and max_new_tokens >= 1
        return Settings(sampling, max_new_tokens) if ok else self


def pieces_message(message: ChatMessage, pending: list[Piece], stats: GenerationStats) -> Pieces:
    generated = stats.generated_tokens
    return Pieces(message, merge_pieces(pending), generated, stats.decode_tok_s, stats.prompt_tokens + generated)


def generate_reply(
    session: ChatSession,
    settings: Settings,
    continuing: bool,
    post: Callable[[Message], object],
    is_cancelled: Callable[[], bool],
) -> None:
    """Stream a new answer (or more of the last one) to `post`, ending with one Finished."""
    message: ChatMessage | None = session.messages[-1] if continuing else None
    splitter = ThinkingSplitter()
    pending: list[Piece] = []
    error, overflow = None, False
    last_progress = 0.0

    def prefill_progress(done: int, total: int) -> None:
        nonlocal last_progress
        now = time.monotonic()
        if done == total or now - last_progress >= PROGRESS_S:
            post(PrefillProgress(done, total))
            last_progress = now

    kwargs = dict(should_stop=is_cancelled, prefill_progress=prefill_progress)
    try:
        if continuing:
            stream = session.continue_reply(settings.max_new_tokens, settings.sampling, **kwargs)
            splitter.feed(message.content)  # only to know whether it stopped mid-thought
            splitter.pending = ""
        else:
            stream = session.generate(settings.max_new_tokens, settings.sampling, **kwargs)
        last_post = 0.0
        for text in stream:
            if message is None:
                message = session.messages[-1]  # the session adds the turn at its first token
            pending += splitter.feed(text)
            now = time.monotonic()
            if pending and now - last_post >= BURST_S:
                post(pieces_message(message, pending, session.engine.stats))
                pending, last_post = [], now
        pending += splitter.flush()
        if message is None and session.messages and session.messages[-1].role == "assistant":
            message = session.messages[-1]  # an empty answer (EOS first)
    except ContextOverflow as e:
        post(ContextFull(str(e)))
        overflow = True
    except SmolLMError as e:
        error = str(e)
    except Exception as e:  # a bug of ours, shown on the message rather than as a traceback
        error = f"internal error: {type(e).__name__}: {e}"
    stats = session.engine.stats
    if pending and message is not None:
        post(pieces_message(message, pending, stats))
    reason = "overflow" if overflow else "error" if error else session.last_stop_reason
    # An overflow is found before the engine starts: its stats are still the last prompt's.
    post(Finished(message, reason, None if overflow else dataclasses.replace(stats), error))
