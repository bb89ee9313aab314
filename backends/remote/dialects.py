"""What differs between the servers we talk to: the request fields, and how answers come back.

Every server but Ollama's native API takes the OpenAI chat-completions request; they differ in
which extra fields they read (the thinking switch, top-k, the repeat penalty, a thinking budget)
and where they put the reasoning (`reasoning_content`, `reasoning`, or `<think>` tags in the
content). A dialect is a row of data; `detect_dialect` picks one from the server's answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..sampling import SamplingParams


@dataclass(frozen=True)
class Dialect:
    name: str
    protocol: str = "openai"  # "openai": /v1/chat/completions SSE; "ollama": /api/chat NDJSON
    template_kwargs: bool = True  # reads chat_template_kwargs.enable_thinking
    top_k: bool = True
    repeat_penalty: str | None = "repetition_penalty"  # the request field, None where there is none
    repeat_last_n: str | None = None
    thinking_budget: str | None = None  # a per-request cap on reasoning tokens
    # Fields that make the server extend a final assistant message instead of starting a new
    # one ({} where it does so by itself), None where it cannot.
    continue_fields: dict | None = None
    # The message field the server reads an assistant turn's reasoning from, None where it is
    # sent back in the content as the `<think>` block it was shown as.
    history_reasoning: str | None = None


CONTINUE_FINAL_MESSAGE = {"continue_final_message": True, "add_generation_prompt": False}  # vLLM, SGLang

DIALECTS: dict[str, Dialect] = {
    d.name: d
    for d in (
        # vLLM >= 0.10 with --reasoning-config caps reasoning per request.
        Dialect("vllm", thinking_budget="thinking_token_budget", continue_fields=CONTINUE_FINAL_MESSAGE),
        # SGLang's budgets are template hints or server flags, none a plain request field.
        Dialect("sglang", continue_fields=CONTINUE_FINAL_MESSAGE),
        # llama-server's --reasoning-budget is a server flag, not a request field; it extends a
        # final assistant message by default (--prefill-assistant).
        Dialect("llama-server", repeat_penalty="repeat_penalty", repeat_last_n="repeat_last_n", continue_fields={}),
        Dialect("mlx-lm", repeat_last_n="repetition_context_size"),
        Dialect(
            "smollm3",
            repeat_penalty="repeat_penalty",
            repeat_last_n="repeat_last_n",
            thinking_budget="thinking_budget",
            # It strips the newlines around reasoning it sends and puts them back around the
            # reasoning it is sent, so a resent turn renders as the model wrote it.
            history_reasoning="reasoning_content",
        ),
        # Ollama's /api/chat extends a final assistant message by itself.
        Dialect("ollama", protocol="ollama", template_kwargs=False, repeat_penalty="repeat_penalty",
                repeat_last_n="repeat_last_n", continue_fields={}),
        # Any other server (OpenAI itself rejects unknown fields): the portable subset only.
        Dialect("openai", template_kwargs=False, top_k=False, repeat_penalty=None),
    )
}

# `owned_by` of the /v1/models entries, as each server writes it.
OWNERS = {"vllm": "vllm", "sglang": "sglang", "llamacpp": "llama-server", "smollm3": "smollm3"}


def detect_dialect(models: dict[str, Any], ollama_version: str | None) -> Dialect:
    """The dialect of a server from its /v1/models answer and whether /api/version answered."""
    entries = [m for m in models.get("data", []) if isinstance(m, dict)]
    for entry in entries:
        owner = OWNERS.get(str(entry.get("owned_by", "")).lower())
        if owner:
            return DIALECTS[owner]
    if ollama_version is not None:
        return DIALECTS["ollama"]
    if entries and all("owned_by" not in m for m in entries):
        # mlx_lm.server is the one server we know that lists models without an owner.
        return DIALECTS["mlx-lm"]
    return DIALECTS["openai"]


def is_smollm3(model: str) -> bool:
    return "smollm3" in model.lower()


def with_reasoning_flag(messages: list[dict], thinking: bool) -> list[dict]:
    """Messages whose system prompt carries SmolLM3's /think or /no_think flag.

    SmolLM3's template reads the flag from the system message on any server; a flag already in
    the text is replaced, so the toggle wins. The template strips the flag from the prompt.
    """
    flag = "/think" if thinking else "/no_think"
    if messages and messages[0].get("role") == "system":
        text = messages[0]["content"].replace("/no_think", "").replace("/think", "").rstrip()
        system = {**messages[0], "content": f"{text} {flag}".lstrip()}
        return [system, *messages[1:]]
    return [{"role": "system", "content": flag}, *messages]


def openai_request(
    dialect: Dialect,
    model: str,
    messages: list[dict],
    max_tokens: int,
    sampling: SamplingParams,
    thinking: bool | None,
    thinking_budget: int | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": max(sampling.temperature, 0.0),
    }
    if sampling.top_p is not None:
        body["top_p"] = sampling.top_p
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.top_k is not None and dialect.top_k:
        body["top_k"] = sampling.top_k
    # Sent at 1.0 too: a server's own default may be a penalty (smollm3 serve's is the CLI's 1.1),
    # which would make a greedy answer differ from the local one.
    if dialect.repeat_penalty:
        body[dialect.repeat_penalty] = sampling.repeat_penalty
        if dialect.repeat_last_n:
            body[dialect.repeat_last_n] = sampling.repeat_last_n
    if thinking is not None and dialect.template_kwargs:
        body["chat_template_kwargs"] = {"enable_thinking": thinking}
    if thinking is not False and thinking_budget is not None and dialect.thinking_budget:
        body[dialect.thinking_budget] = thinking_budget
    return body


def ollama_request(
    model: str,
    messages: list[dict],
    max_tokens: int,
    sampling: SamplingParams,
    thinking: bool | None,
) -> dict[str, Any]:
    options: dict[str, Any] = {"num_predict": max_tokens, "temperature": max(sampling.temperature, 0.0)}
    if sampling.top_p is not None:
        options["top_p"] = sampling.top_p
    if sampling.top_k is not None:
        options["top_k"] = sampling.top_k
    if sampling.seed is not None:
        options["seed"] = sampling.seed
    # Ollama applies its own default penalty (1.1) when none is sent, so always send ours.
    options["repeat_penalty"] = sampling.repeat_penalty
    options["repeat_last_n"] = sampling.repeat_last_n
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True, "options": options}
    if thinking is not None:
        body["think"] = thinking
    return body


@dataclass
class Chunk:
    """One streamed event, in the same terms for every server."""

    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    # Server-measured phases, where the server reports them (llama-server, Ollama).
    prefilled_tokens: int | None = None
    prefill_s: float | None = None
    decoded_tokens: int | None = None
    decode_s: float | None = None
    error: str | None = None  # an error the server reported inside the stream


def parse_openai_event(data: dict[str, Any]) -> Chunk:
    chunk = Chunk()
    if data.get("error") or data.get("object") == "error":
        error = data.get("error")
        chunk.error = str(error.get("message", error) if isinstance(error, dict) else error or data.get("message"))
        return chunk
    for choice in data.get("choices") or []:
        delta = choice.get("delta") or {}
        # vLLM before 0.11, SGLang and llama-server: reasoning_content; vLLM >= 0.11, mlx_lm: reasoning.
        chunk.reasoning += delta.get("reasoning_content") or delta.get("reasoning") or ""
        chunk.content += delta.get("content") or ""
        chunk.finish_reason = choice.get("finish_reason") or chunk.finish_reason
    usage = data.get("usage") or {}
    if usage:
        chunk.prompt_tokens = usage.get("prompt_tokens")
        chunk.completion_tokens = usage.get("completion_tokens")
        chunk.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    timings = data.get("timings") or {}
    if timings.get("predicted_n") is not None:  # llama-server, smollm3 serve
        chunk.prefilled_tokens = timings.get("prompt_n")
        chunk.decoded_tokens = timings["predicted_n"]
        # Times that give the server's own rates: the servers differ in whether the first
        # generated token counts to the prompt's time or the generation's.
        chunk.prefill_s = _seconds(chunk.prefilled_tokens, timings.get("prompt_per_second"), timings.get("prompt_ms"))
        decode_rate = timings.get("predicted_per_second")
        chunk.decode_s = _seconds(chunk.decoded_tokens, decode_rate, timings.get("predicted_ms"))
        if chunk.prompt_tokens is None and chunk.prefilled_tokens is not None:
            chunk.prompt_tokens = chunk.prefilled_tokens + timings.get("cache_n", 0)
        if chunk.completion_tokens is None:
            chunk.completion_tokens = chunk.decoded_tokens
    return chunk


def _seconds(tokens: int | None, per_second: float | None, ms: float | None) -> float:
    if tokens and per_second:
        return tokens / per_second
    return (ms or 0.0) / 1000


def parse_ollama_event(data: dict[str, Any]) -> Chunk:
    chunk = Chunk()
    if data.get("error"):
        chunk.error = str(data["error"])
        return chunk
    message = data.get("message") or {}
    chunk.reasoning = message.get("thinking") or ""
    chunk.content = message.get("content") or ""
    if data.get("done"):
        chunk.finish_reason = data.get("done_reason") or "stop"
        chunk.prompt_tokens = chunk.prefilled_tokens = data.get("prompt_eval_count")
        chunk.completion_tokens = chunk.decoded_tokens = data.get("eval_count")
        # Durations are in nanoseconds.
        if data.get("prompt_eval_duration") is not None:
            chunk.prefill_s = data["prompt_eval_duration"] / 1e9
        if data.get("eval_duration") is not None:
            chunk.decode_s = data["eval_duration"] / 1e9
    return chunk
