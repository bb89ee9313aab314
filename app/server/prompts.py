"""A chat request as prompt tokens: the client's conversation through the model's template.

The conversation is rendered whole each time, as the chat does, and the engine reuses the KV
cache for the longest common token prefix: a client that resends its growing conversation gets
back the text it was given, rendered to the same tokens, and only the new turn is prefilled.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends import ChatTemplate, Engine

from ..session import THINK_CLOSE, THINK_OPEN, has_open_think
from .protocol import ApiError, ChatRequest
from .toolcalls import OPEN as TOOL_OPEN
from .toolcalls import format_tool_call

EMPTY_THINKING = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n"
# transformers' marker for continue_final_message, written after the last message and cut off again
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


@dataclass
class ChatPrompt:
    ids: list[int]
    thinking_first: bool  # the prompt leaves a <think> block open for the model
    forced_text: str  # the start of the answer, written by the server (tool_choice)
    tool_names: set[str] | None  # None: the reply is not parsed for tool calls


def thinking_mode(messages: list[dict], enable_thinking: bool | None) -> bool:
    """Whether the template will render this conversation in /think mode: SmolLM3's system
    prompt switch wins over enable_thinking, which defaults to on."""
    if messages and messages[0]["role"] == "system":
        system = messages[0]["content"]
        if "/no_think" in system:
            return False
        if "/think" in system:
            return True
    return enable_thinking is not False


def _for_template(message: dict, thinking: bool, template_reads_reasoning: bool) -> dict:
    if message["role"] != "assistant":
        return {"role": message["role"], "content": message["content"]}
    content = message["content"]
    calls = [format_tool_call(c["name"], c["arguments"]) for c in message.get("tool_calls", [])]
    if calls:
        content = "\n".join(([content] if content else []) + calls)
    turn = {"role": "assistant", "content": content}
    reasoning = message.get("reasoning_content")
    if reasoning and thinking:
        if template_reads_reasoning:
            turn["reasoning_content"] = reasoning
        else:
            # SmolLM3's template renders an assistant turn's content as is in /think mode: the
            # reasoning goes back in its block, as the model wrote it.
            turn["content"] = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n{content}"
    return turn


def render_continuing(template: ChatTemplate, messages: list[dict], **kwargs) -> str:
    """The conversation rendered to end inside its last message, with no end of turn after it, so
    the model continues that message: transformers' apply_chat_template(continue_final_message=True).
    As there, the message is rendered with a marker after its text and the prompt cut at the
    marker; a template that trims the message's end trims the space before the marker too."""
    last = messages[-1]
    text = template.render([*messages[:-1], {**last, "content": last["content"] + CONTINUE_TAG}],
                           add_generation_prompt=False, **kwargs)
    at = text.rfind(CONTINUE_TAG.strip())
    if at < 0 or last["content"].strip() not in text:
        raise ApiError(400, "the chat template leaves out part of the last message, so it cannot be continued",
                       param="continue_final_message", code="template_error")
    return text[:at] if text.startswith(CONTINUE_TAG, at) else text[:at].rstrip()


def chat_prompt(engine: Engine, request: ChatRequest) -> ChatPrompt:
    template = engine.chat_template
    if template is None:
        raise ApiError(400, "this model has no chat template: send a raw prompt to /v1/completions",
                       param="messages", code="no_chat_template")
    thinking = thinking_mode(request.messages, request.enable_thinking)
    reads_reasoning = "reasoning_content" in template.source
    messages = [_for_template(m, thinking, reads_reasoning) for m in request.messages]
    kwargs = dict(request.template_kwargs)
    use_tools = bool(request.tools) and request.tool_choice != "none"
    if use_tools:
        if "xml_tools" in template.source:
            kwargs["xml_tools"] = [t.for_template() for t in request.tools]
        else:
            kwargs["tools"] = [{"type": "function", "function": t.for_template()} for t in request.tools]
    if request.continue_final_message:
        text = render_continuing(template, messages, enable_thinking=request.enable_thinking, **kwargs)
    else:
        text = template.render(messages, add_generation_prompt=request.add_generation_prompt,
                               enable_thinking=request.enable_thinking, **kwargs)
    forced = ""
    if use_tools and request.tool_choice not in (None, "auto"):
        # "required" and a named tool: the server writes the start of the call and the model
        # completes it, so a call is certain; the reasoning, if any, is skipped.
        forced = TOOL_OPEN + '\n{"name": "'
        if request.tool_choice != "required":
            forced += request.tool_choice + '", "arguments": '
        if has_open_think(text):
            forced = "\n" + THINK_CLOSE + "\n" + forced
        elif thinking and THINK_OPEN in template.source and not text.endswith(EMPTY_THINKING):
            forced = EMPTY_THINKING + forced
    return ChatPrompt(
        ids=engine.tokenizer.encode(text + forced),
        thinking_first=has_open_think(text),
        forced_text=forced,
        tool_names={t.name for t in request.tools} if use_tools else None,
    )
