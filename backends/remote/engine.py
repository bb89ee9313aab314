"""The remote engine: a chat against an OpenAI-compatible server (vLLM, SGLang, llama-server,
mlx_lm.server, `smollm3 serve`) or Ollama's native API, streamed as text pieces.

Reasoning the server returns in a separate field is yielded inside `<think>` ... `</think>`
before the answer, so the caller sees the same text a local engine generates for a /think turn
and can fold it the same way.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ..engine import EngineInfo, GenerationStats
from ..sampling import SamplingParams
from .client import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, RemoteClient
from .dialects import (
    DIALECTS,
    Chunk,
    Dialect,
    detect_dialect,
    is_smollm3,
    ollama_request,
    openai_request,
    parse_ollama_event,
    parse_openai_event,
    with_reasoning_flag,
)
from .errors import NotOpenAICompatible, RemoteError, RemoteStreamCut, server_message, status_error

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
STOP_REASONS = {"stop": "eos", "length": "length"}  # the servers' finish_reason -> ours


@dataclass
class RemoteStats(GenerationStats):
    # "server" when the counts and phase times are the server's own; "client" when they were
    # counted here (one streamed piece per token, times include the network).
    counted_by: str = "client"


class RemoteEngine:
    def __init__(
        self,
        endpoint: str,
        api_key: str | None = None,
        served_model: str | None = None,
        dialect: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        read_timeout: float = READ_TIMEOUT_S,
        verify: bool | str = True,
    ):
        if dialect is not None and dialect not in DIALECTS:
            raise RemoteError(f"unknown dialect '{dialect}' (choose from {', '.join(DIALECTS)})")
        api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.client = RemoteClient(endpoint, api_key, connect_timeout, read_timeout, verify)
        self.endpoint = self.client.api
        self.stats = RemoteStats()
        try:
            model, self.dialect = self._probe(served_model, DIALECTS[dialect] if dialect else None)
            self.model = model
            # Ollama refuses `think: true` (400) for a model without the thinking capability.
            self.ollama_thinks = self.dialect.protocol == "ollama" and self._ollama_can_think()
        except BaseException:
            self.client.close()
            raise
        self.info = EngineInfo(
            backend="remote",
            device=self.client.host,
            dtype="",
            checkpoint=model,
            weight_type="",
            extra={"endpoint": self.endpoint, "dialect": self.dialect.name},
        )

    def close(self) -> None:
        self.client.close()

    def cancel(self) -> None:
        """Stop the answer being streamed, from any thread (the TUI's Esc, a Ctrl+C handler).

        Unlike `should_stop`, which is asked between streamed pieces, this also ends a wait for
        the first piece; the connection closes and the server stops generating.
        """
        self.client.interrupt()

    # --- what the server can do ---

    @property
    def supports_thinking(self) -> bool:
        """Whether a thinking on/off switch reaches the model on this server."""
        return self.dialect.template_kwargs or self.ollama_thinks or is_smollm3(self.model)

    @property
    def supports_thinking_budget(self) -> bool:
        return self.dialect.thinking_budget is not None

    @property
    def supports_continue(self) -> bool:
        """Whether the server can extend a stopped answer (`chat(..., continue_last=True)`)."""
        return self.dialect.continue_fields is not None

    # --- probing ---

    def _probe(self, served_model: str | None, dialect: Dialect | None) -> tuple[str, Dialect]:
        """One look at the server: its models (reachability and the API key too) and its kind."""
        status, models, raw = self.client.request_json("GET", self.client.api + "/models")
        if status in (401, 403, 429) or status >= 500:
            raise status_error(status, raw, self.client.host, served_model or "")
        if status != 200 or not isinstance(models, dict) or not isinstance(models.get("data"), list):
            raise NotOpenAICompatible(
                f"{self.endpoint} is not an OpenAI-compatible endpoint (GET /models answered {status}"
                f"{'' if isinstance(models, dict) else ' without JSON'}); give the URL that ends in /v1"
            )
        if dialect is None:
            dialect = detect_dialect(models, self._ollama_version())
        if served_model is None:
            ids = [m["id"] for m in models["data"] if isinstance(m, dict) and m.get("id")]
            if not ids:
                raise RemoteError(f"{self.client.host} serves no models; name one with --served-model")
            served_model = str(ids[0])
        return served_model, dialect

    def _ollama_version(self) -> str | None:
        try:
            status, body, _ = self.client.request_json("GET", self.client.root + "/api/version")
        except RemoteError:
            return None
        if status == 200 and isinstance(body, dict) and "version" in body:
            return str(body["version"])
        return None

    def _ollama_can_think(self) -> bool:
        status, body, _ = self.client.request_json("POST", self.client.root + "/api/show", {"model": self.model})
        return status == 200 and isinstance(body, dict) and "thinking" in (body.get("capabilities") or [])

    # --- chat ---

    def chat(
        self,
        messages: list[dict],
        max_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        thinking: bool | None = None,
        thinking_budget: int | None = None,
        should_stop: Callable[[], bool] | None = None,
        continue_last: bool = False,
    ) -> Iterator[str]:
        """Stream the assistant's answer to OpenAI-style `messages` ({"role", "content"}).

        `thinking` None leaves the server's default. `continue_last`: the last message is an
        assistant answer that was stopped; stream its continuation. Stopping (should_stop,
        cancel(), or closing the generator) closes the connection, which makes the server stop
        generating. A stream cut mid-answer raises RemoteStreamCut after the text that did
        arrive was yielded.
        """
        if continue_last and not self.supports_continue:
            raise RemoteError(f"the {self.dialect.name} dialect cannot continue a stopped answer")
        messages = [self._wire_message(m) for m in messages]
        if thinking is not None and is_smollm3(self.model):
            messages = with_reasoning_flag(messages, thinking)
        if self.dialect.protocol == "ollama":
            url, sse = self.client.root + "/api/chat", False
            body = ollama_request(self.model, messages, max_tokens, sampling, thinking if self.ollama_thinks else None)
            parse = parse_ollama_event
        else:
            url, sse = self.client.api + "/chat/completions", True
            body = openai_request(self.dialect, self.model, messages, max_tokens, sampling, thinking, thinking_budget)
            parse = parse_openai_event
        open_think = False
        if continue_last:
            body.update(self.dialect.continue_fields)
            last = messages[-1]["content"]
            open_think = last.rfind(THINK_OPEN) > last.rfind(THINK_CLOSE)
        return self._stream(url, body, sse, parse, should_stop, ReasoningFold(open_think))

    def _wire_message(self, message: dict) -> dict:
        """Role and content; an assistant turn's `<think>` block in the server's reasoning field
        where it reads one there."""
        content = message["content"]
        field = self.dialect.history_reasoning
        if field and message["role"] == "assistant" and content.startswith(THINK_OPEN) and THINK_CLOSE in content:
            reasoning, _, answer = content[len(THINK_OPEN) :].partition(THINK_CLOSE)
            return {"role": "assistant", "content": answer, field: reasoning}
        return {"role": message["role"], "content": content}

    def _stream(self, url, body, sse, parse, should_stop, fold: ReasoningFold) -> Iterator[str]:
        self.stats = stats = RemoteStats(stop_reason="stopped")
        self.client.interrupted = False
        pieces = 0
        finish: str | None = None
        final = Chunk()  # the last usage / timings the server sent
        t0 = time.perf_counter()
        first = last = None
        try:
            with self.client.stream(url, body, self.model, sse) as events:
                for event in events:
                    chunk = parse(event)
                    if chunk.error:
                        message = server_message(chunk.error)
                        raise RemoteStreamCut(f"{self.client.host} reported an error mid-answer: {message}")
                    _keep_counts(final, chunk)
                    text = fold.text(chunk)
                    if text:
                        pieces += 1
                        last = time.perf_counter()
                        first = first or last
                        # Live counts for a progress line; the server's, where it sends them, at the end.
                        stats.generated_tokens, stats.decode_steps, stats.decode_s = pieces, pieces - 1, last - first
                        yield text
                    finish = chunk.finish_reason or finish
                    if self.client.interrupted or (should_stop is not None and should_stop()):
                        return
                if finish is None:
                    raise RemoteStreamCut(f"{self.client.host} ended the stream before the answer was complete")
                stats.stop_reason = STOP_REASONS.get(finish, "eos")
        except RemoteError:
            if not self.client.interrupted:
                raise
        finally:
            _fill_stats(stats, final, pieces, t0, first, last)


class ReasoningFold:
    """Reasoning sent in a field of its own, as the `<think>` ... `</think>` text a local engine writes."""

    def __init__(self, open_think: bool = False) -> None:
        # open_think: the text being continued ends inside a `<think>` block already.
        self.open_think = open_think
        self.in_think = False

    def text(self, chunk: Chunk) -> str:
        text = ""
        if chunk.reasoning:
            text += ("" if self.in_think or self.open_think else THINK_OPEN) + chunk.reasoning
            self.in_think, self.open_think = True, False
        if chunk.content:
            text += (THINK_CLOSE if self.in_think else "") + chunk.content
            self.in_think = False
        return text


COUNTS = ("prompt_tokens", "cached_tokens", "completion_tokens", "prefilled_tokens", "prefill_s", "decoded_tokens",
          "decode_s")


def _keep_counts(final: Chunk, chunk: Chunk) -> None:
    for name in COUNTS:
        value = getattr(chunk, name)
        if value is not None:
            setattr(final, name, value)


def _fill_stats(stats: RemoteStats, final: Chunk, pieces: int, t0: float, first: float | None,
                last: float | None) -> None:
    if final.decoded_tokens is not None and final.decode_s is not None:
        # llama-server timings / Ollama durations: the server's own measure of each phase.
        stats.counted_by = "server"
        stats.prompt_tokens = final.prompt_tokens or 0
        stats.prefilled_tokens = final.prefilled_tokens or 0
        stats.prefill_s = final.prefill_s or 0.0
        stats.generated_tokens = final.completion_tokens or final.decoded_tokens
        stats.decode_steps = final.decoded_tokens
        stats.decode_s = final.decode_s
        return
    # Times seen from here: the first piece ends the prefill (network included), as a local
    # engine counts its first token to the prefill.
    stats.prefill_s = (first or time.perf_counter()) - t0
    stats.decode_s = (last - first) if first is not None and last is not None else 0.0
    if final.completion_tokens is not None:
        stats.counted_by = "server"
        stats.prompt_tokens = final.prompt_tokens or 0
        stats.prefilled_tokens = stats.prompt_tokens - (final.cached_tokens or 0)
        stats.generated_tokens = final.completion_tokens
    else:
        stats.generated_tokens = pieces
    stats.decode_steps = max(stats.generated_tokens - 1, 0)

