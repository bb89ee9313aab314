"""One reply, generated on the engine's thread: tokens become reasoning, answer text and tool
calls, with stop strings and the thinking budget applied as the tokens come.

`run_job` is blocking and drives `Engine.generate`; it hands each event to `emit` and checks
`cancelled()` after every token, so a client that leaves costs at most one more token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from backends import Engine, SamplingParams
from backends.errors import ContextOverflow

from ..session import THINK_CLOSE, ThinkingSplitter
from .toolcalls import ToolCallParser, partial_suffix

# Written when the thinking budget is spent: the model reads its reasoning as closed and answers.
CLOSE_THINKING = "\n" + THINK_CLOSE + "\n"
FINISH_REASONS = {"eos": "stop", "length": "length", "context": "length", "stopped": "stop"}

Event = tuple  # ("reasoning" | "content", str) | ("tool_call", ToolCall) | ("done", Outcome) | ("error", str)


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    tool_names: set[str] | None = None  # None: tool calls are not parsed
    split_thinking: bool = True  # False for raw completions
    thinking_first: bool = False  # the prompt leaves a <think> block open
    thinking_budget: int | None = None
    forced_text: str = ""  # the start of the answer, already in the prompt (tool_choice)


@dataclass
class Outcome:
    finish_reason: str  # "stop" | "length" | "tool_calls" | "cancelled"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the previous request
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    thinking_closed: bool = False  # the budget ran out and the server closed the block

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def timings(self) -> dict:
        """llama-server's `timings` object."""
        prefilled = self.prompt_tokens - self.cached_tokens
        return {
            "cache_n": self.cached_tokens,
            "prompt_n": prefilled, "prompt_ms": self.prefill_s * 1e3,
            "prompt_per_second": prefilled / self.prefill_s if self.prefill_s else 0.0,
            "predicted_n": self.completion_tokens, "predicted_ms": self.decode_s * 1e3,
            "predicted_per_second": self.decode_steps / self.decode_s if self.decode_s else 0.0,
        }


class StopFilter:
    """Cuts streamed text at the first stop string, holding back what may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if self.hit or not self.stops:
            return "" if self.hit else text
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.pending, self.hit = self.pending[: min(found)], "", True
            return out
        keep = max(partial_suffix(self.pending, s) for s in self.stops)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ReplyText:
    """Generated text -> events: reasoning apart from the answer (the tags and the newlines
    around the reasoning removed), stop strings on the answer, tool calls out of the answer."""

    def __init__(self, stop: list[str] = (), tool_names: set[str] | None = None,
                 split_thinking: bool = True, thinking_first: bool = False):
        self.splitter = ThinkingSplitter(thinking_first) if split_thinking else None
        self.stop = StopFilter(list(stop))
        self.tools = ToolCallParser(tool_names) if tool_names is not None else None
        self.tool_calls = 0
        self._held_newlines = ""  # a reasoning's trailing newlines are dropped if the block closes
        self._reasoning_open = False
        self._answer_started = not split_thinking

    @property
    def in_think(self) -> bool:
        return self.splitter is not None and self.splitter.in_think

    @property
    def stopped(self) -> bool:
        return self.stop.hit

    def feed(self, text: str) -> list[Event]:
        if self.stop.hit or not text:
            return []
        pieces = self.splitter.feed(text) if self.splitter else [("answer", text)]
        return self._route(pieces)

    def flush(self) -> list[Event]:
        events = self._route(self.splitter.flush()) if self.splitter and not self.stop.hit else []
        events += self._answer(self.stop.flush(), final=True)
        return events

    def _route(self, pieces) -> list[Event]:
        events: list[Event] = []
        for kind, text in pieces:
            if kind == "think":
                events += self._reasoning(text)
            else:
                self._held_newlines, self._reasoning_open = "", False
                events += self._answer(self.stop.feed(text))
        return events

    def _reasoning(self, text: str) -> list[Event]:
        if not self._reasoning_open:
            text = text.lstrip("\n")
        body = text.rstrip("\n")
        if not body:
            self._held_newlines += text
            return []
        self._reasoning_open = True
        out, self._held_newlines = self._held_newlines + body, text[len(body) :]
        return [("reasoning", out)]

    def _answer(self, text: str, final: bool = False) -> list[Event]:
        if not self._answer_started:
            text = text.lstrip("\n")
            self._answer_started = bool(text)
        pieces = [("content", text)] if text else []
        if self.tools is not None:
            pieces = self.tools.feed(text) + (self.tools.flush() if final else [])
        self.tool_calls += sum(kind == "tool_call" for kind, _ in pieces)
        return [p for p in pieces if p[1]]


def encode_continuation(engine: Engine, text: str) -> list[int]:
    """Tokens of text that continues a sequence: no BOS."""
    ids = engine.tokenizer.encode(text)
    return ids[1:] if ids and engine.tokenizer.add_bos and ids[0] == engine.tokenizer.bos_id else ids


def run_job(engine: Engine, job: Job, emit: Callable[[Event], None], cancelled: Callable[[], bool]) -> Outcome:
    text = ReplyText(job.stop, job.tool_names, job.split_thinking, job.thinking_first)
    outcome = Outcome("length", prompt_tokens=len(job.prompt_ids))
    for event in text.feed(job.forced_text):
        emit(event)
    ids, left, budget, think_tokens, first = list(job.prompt_ids), job.max_tokens, job.thinking_budget, 0, True
    finish = None
    while finish is None:
        tokens = engine.generate(ids, left, job.sampling)
        detok = engine.tokenizer.detokenizer()
        produced: list[int] = []
        close_thinking = False
        try:
            for token in tokens:
                produced.append(token)
                was_thinking = text.in_think
                for event in text.feed(detok.add(token)):
                    emit(event)
                think_tokens += was_thinking
                if cancelled():
                    finish = "cancelled"
                    break
                if text.stopped:
                    finish = "stop"
                    break
                if budget is not None and text.in_think and think_tokens >= budget:
                    close_thinking = True
                    break
            else:
                finish = FINISH_REASONS[engine.stats.stop_reason]
        except ContextOverflow:  # the closing tokens did not fit
            finish = "length"
        finally:
            tokens.close()
        stats = engine.stats
        if first:
            outcome.cached_tokens = stats.prompt_tokens - stats.prefilled_tokens
            outcome.prefill_s, first = stats.prefill_s, False
        outcome.completion_tokens += len(produced)
        outcome.decode_s += stats.decode_s
        outcome.decode_steps += stats.decode_steps
        if finish == "cancelled":
            outcome.finish_reason = finish
            return outcome
        for event in text.feed(detok.flush()):
            emit(event)
        if close_thinking:
            closing = encode_continuation(engine, CLOSE_THINKING)
            for event in text.feed(CLOSE_THINKING):
                emit(event)
            ids += produced + closing
            left -= len(produced) + len(closing)
            outcome.completion_tokens += len(closing)
            outcome.thinking_closed, budget = True, None
            if left <= 0:
                finish = "length"
    for event in text.flush():
        emit(event)
    outcome.finish_reason = "tool_calls" if text.tool_calls and finish == "stop" else finish
    return outcome
