"""OpenAI request bodies read into typed requests, and OpenAI-shaped errors.

Everything a client sends is checked here, once, before it reaches the engine: a wrong type,
an unknown value or a number out of range is a 400 that names the field. Fields we do not
know are ignored, as OpenAI-compatible servers do (clients send `user`, `metadata`, ...).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_STRINGS = 16  # OpenAI allows 4; editors send a few more (Continue sends ~6)
MAX_STOP_CHARS = 512
MAX_TOOLS = 128
ROLES = ("system", "developer", "user", "assistant", "tool")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high")
# Names the server passes to the template itself: a client's chat_template_kwargs cannot replace them.
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "xml_tools", "documents", "add_generation_prompt",
                            "continue_final_message", "enable_thinking", "bos_token", "eos_token")
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class ApiError(Exception):
    """An error answered as OpenAI answers it: `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the body is not valid UTF-8 (byte {e.start})", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers over Python's digit limit
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the body must be a JSON object, got {_type_name(body)}", code="invalid_json")
    return body


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


@dataclass
class ToolSpec:
    name: str
    description: str | None
    parameters: dict | None

    def for_template(self) -> dict:
        """SmolLM3's `xml_tools` entries: the function object itself, as its model card passes them."""
        spec: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            spec["description"] = self.description
        if self.parameters is not None:
            spec["parameters"] = self.parameters
        return spec


@dataclass
class Sampling:
    """The request's sampling fields; None means the server's default."""
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    seed: int | None = None


@dataclass
class CompletionRequest:
    model: str | None
    prompt: str
    max_tokens: int | None
    sampling: Sampling
    stop: list[str]
    stream: bool
    include_usage: bool


@dataclass
class ChatRequest(CompletionRequest):
    messages: list[dict] = field(default_factory=list)
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: str | None = None  # "auto" | "none" | "required" | a tool name
    enable_thinking: bool | None = None
    template_kwargs: dict = field(default_factory=dict)
    thinking_budget: int | None = None
    add_generation_prompt: bool = True  # open a new assistant turn after the messages
    continue_final_message: bool = False  # end the prompt inside the last (assistant) message


# --- field readers ---

def _type_name(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"'{param}': {message}", param=param, code="invalid_value")


def _get(body: dict, name: str, kinds: tuple, what: str, param: str | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise _bad(param or name, f"expected {what}, got {_type_name(value)}")
    return value


def _int(body: dict, name: str, low: int | None = None, high: int | None = None, param: str | None = None):
    value = _get(body, name, (int,), "an integer", param)
    if value is not None and (low is not None and value < low or high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise _bad(param or name, f"must be {bounds}, got {_short(value)}")
    return value


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False):
    value = _get(body, name, (int, float), "a number")
    if value is None:
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer past float range: out of any range below
        value = (math.inf if value > 0 else -math.inf)
    if not (low < value if low_open else low <= value) or value > high:
        raise _bad(name, f"must be in {'(' if low_open else '['}{low}, {high}], got {_short(value)}")
    return value


def _bool(body: dict, name: str, param: str | None = None) -> bool | None:
    return _get(body, name, (bool,), "a boolean", param)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text_content(content, param: str) -> str:
    """A message's content: a string, or an array of text parts (images are not supported)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(param, f"expected a string or an array of content parts, got {_type_name(content)}")
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else None
            why = f"'{_short(kind)}' parts are not supported" if isinstance(kind, str) else "expected a text part"
            raise _bad(f"{param}[{i}]", f"{why} (only {{'type': 'text', 'text': ...}})")
        texts.append(part["text"])
    return "".join(texts)


# --- requests ---

def _common(body: dict, default_max_tokens: int | None) -> dict:
    model = _get(body, "model", (str,), "a string")
    n = _int(body, "n")
    if n is not None and n != 1:
        raise _bad("n", f"only n=1 is supported, got {_short(n)}")
    max_tokens = _int(body, "max_completion_tokens", 1) if body.get("max_completion_tokens") is not None \
        else _int(body, "max_tokens", 1)
    top_k = _int(body, "top_k", 0)
    sampling = Sampling(
        temperature=_number(body, "temperature", 0.0, 100.0),
        top_p=_number(body, "top_p", 0.0, 1.0, low_open=True),
        top_k=top_k or None,  # 0 turns it off, as llama-server reads it
        repeat_penalty=_number(body, "repeat_penalty", 0.0, 100.0, low_open=True),
        repeat_last_n=_int(body, "repeat_last_n", 0, 1 << 20),
        seed=_int(body, "seed", *SEED_RANGE),
    )
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    elif stop is None:
        stop = []
    elif not isinstance(stop, list):
        raise _bad("stop", f"expected a string or an array of strings, got {_type_name(stop)}")
    if len(stop) > MAX_STOP_STRINGS:
        raise _bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise _bad(f"stop[{i}]", f"expected a string of 1 to {MAX_STOP_CHARS} characters")
    stream = bool(_bool(body, "stream"))
    options = _get(body, "stream_options", (dict,), "an object") or {}
    include_usage = bool(_bool(options, "include_usage", "stream_options.include_usage"))
    if _get(body, "logprobs", (bool, int), "a boolean"):
        raise _bad("logprobs", "log probabilities are not supported")
    response_format = _get(body, "response_format", (dict,), "an object")
    if response_format is not None and response_format.get("type", "text") != "text":
        raise _bad("response_format", f"only {{'type': 'text'}} is supported, got {_short(response_format.get('type'))}")
    return dict(model=model, max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
                sampling=sampling, stop=stop, stream=stream, include_usage=include_usage)


def parse_completion(body: dict) -> CompletionRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", f"expected a string, got {_type_name(prompt)}")
    if not prompt:
        raise _bad("prompt", "is empty")
    if _bool(body, "echo"):
        raise _bad("echo", "echoing the prompt is not supported")
    return CompletionRequest(prompt=prompt, **_common(body, default_max_tokens=16))  # OpenAI's default


def parse_chat(body: dict) -> ChatRequest:
    common = _common(body, default_max_tokens=None)
    messages = _messages(body.get("messages"))
    tools = _tools(body)
    tool_choice = _tool_choice(body.get("tool_choice"), tools)
    kwargs = _get(body, "chat_template_kwargs", (dict,), "an object") or {}
    enable_thinking = _bool(kwargs, "enable_thinking", "chat_template_kwargs.enable_thinking")
    extra = {}
    for key, value in kwargs.items():
        if key in RESERVED_TEMPLATE_KWARGS:
            continue
        if not key.isidentifier() or key.startswith("_"):
            raise _bad("chat_template_kwargs", f"'{_short(key)}' is not a template variable name")
        extra[key] = value
    effort = _get(body, "reasoning_effort", (str,), "a string")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise _bad("reasoning_effort", f"expected one of {', '.join(REASONING_EFFORTS)}, got {_short(effort)}")
    if effort == "none":
        enable_thinking = False
    elif effort is not None and enable_thinking is None:
        enable_thinking = True
    generation_prompt, continuing = _generation_prompt(body, kwargs, messages, tool_choice)
    return ChatRequest(
        prompt="", messages=messages, tools=tools, tool_choice=tool_choice, enable_thinking=enable_thinking,
        template_kwargs=extra, thinking_budget=_int(body, "thinking_budget", 0),
        add_generation_prompt=generation_prompt, continue_final_message=continuing, **common,
    )


def _generation_prompt(body: dict, kwargs: dict, messages: list[dict], tool_choice: str | None) -> tuple[bool, bool]:
    """add_generation_prompt and continue_final_message, as vLLM reads them: top-level fields or
    chat_template_kwargs (which win). Continuing implies no generation prompt, as in SGLang,
    where the field is sent alone; asking for both is vLLM's 400."""
    def flag(name):
        value = _bool(kwargs, name, f"chat_template_kwargs.{name}")
        return _bool(body, name) if value is None else value

    continuing = bool(flag("continue_final_message"))
    generation_prompt = flag("add_generation_prompt")
    if not continuing:
        return generation_prompt is not False, False
    if generation_prompt:
        raise _bad("continue_final_message", "cannot be true together with add_generation_prompt: the prompt "
                   "either ends inside the last message or opens a new one")
    if messages[-1]["role"] != "assistant":
        raise _bad("continue_final_message", f"continues the last message, which must be the assistant's; "
                   f"the last message is the {messages[-1]['role']}'s")
    if tool_choice not in (None, "auto", "none"):
        raise _bad("tool_choice", "a forced tool call starts a new answer: it cannot continue_final_message")
    return False, True


def _messages(raw) -> list[dict]:
    if not isinstance(raw, list):
        raise _bad("messages", f"expected an array of messages, got {_type_name(raw)}")
    if not raw:
        raise _bad("messages", "is empty")
    messages = []
    for i, m in enumerate(raw):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(param, f"expected an object, got {_type_name(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{param}.role", f"expected one of {', '.join(ROLES)}, got {_short(role)}")
        message = {"role": "system" if role == "developer" else role,
                   "content": _text_content(m.get("content"), f"{param}.content")}
        if role == "assistant":
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise _bad(f"{param}.reasoning_content", f"expected a string, got {_type_name(reasoning)}")
                message["reasoning_content"] = reasoning
            calls = m.get("tool_calls")
            if calls is not None:
                message["tool_calls"] = _history_tool_calls(calls, f"{param}.tool_calls")
        messages.append(message)
    return messages


def _history_tool_calls(calls, param: str) -> list[dict]:
    """An assistant turn's earlier tool calls, as {name, arguments} for the prompt."""
    if not isinstance(calls, list):
        raise _bad(param, f"expected an array, got {_type_name(calls)}")
    out = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad(f"{param}[{i}]", "expected {'type': 'function', 'function': {'name': ..., 'arguments': ...}}")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                pass  # kept as the string the client sent
        out.append({"name": function["name"], "arguments": arguments})
    return out


def _tools(body: dict) -> list[ToolSpec]:
    raw = _get(body, "tools", (list,), "an array")
    if raw is None:
        return []
    if len(raw) > MAX_TOOLS:
        raise _bad("tools", f"at most {MAX_TOOLS} tools, got {len(raw)}")
    tools = []
    for i, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise _bad(f"tools[{i}]", "expected {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
        description = _get(function, "description", (str,), "a string", f"tools[{i}].function.description")
        parameters = _get(function, "parameters", (dict,), "an object", f"tools[{i}].function.parameters")
        tools.append(ToolSpec(function["name"], description, parameters))
    return tools


def _tool_choice(raw, tools: list[ToolSpec]) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, dict):
        function = raw.get("function") if raw.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise _bad("tool_choice", "expected 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}")
        if name not in {t.name for t in tools}:
            raise _bad("tool_choice", f"names the tool '{_short(name)[1:-1]}', which is not in 'tools'")
        return name
    if raw not in ("auto", "none", "required"):
        raise _bad("tool_choice", f"expected 'auto', 'none', 'required' or a named function, got {_short(raw)}")
    if raw == "required" and not tools:
        raise _bad("tool_choice", "'required' needs 'tools'")
    return raw
