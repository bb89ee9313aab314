"""The messages worker threads post to the UI: small, typed, and merged where they come in bursts."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from backends import Engine, GenerationStats

from ..session import ChatMessage

Piece = tuple[str, str]  # ("think" | "answer", text)


@dataclass
class EngineReady(Message):
    engine: Engine
    use_template: bool


@dataclass
class EngineFailed(Message):
    error: str
    hint: str


@dataclass
class PrefillProgress(Message):
    """Prompt tokens computed so far out of those to compute (the rest come from the KV cache)."""

    done: int
    total: int


@dataclass
class Pieces(Message):
    """A burst of pieces of the message being generated, with the tokens so far, their speed,
    and the context they fill with the prompt."""

    message: ChatMessage
    pieces: list[Piece]
    generated: int = 0
    tok_s: float = 0.0
    context: int = 0


@dataclass
class Finished(Message):
    """The answer ended. message is None when nothing was generated; stats is None when the
    engine did not start on this prompt (its stats are then another prompt's)."""

    message: ChatMessage | None
    reason: str  # the session's stop reason, "overflow" or "error"
    stats: GenerationStats | None
    error: str | None = None


@dataclass
class ContextFull(Message):
    text: str


def merge_pieces(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for kind, text in pieces:
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out
