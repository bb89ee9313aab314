"""SmolLM3's tool calls, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, read out of
streamed answer text.

The text between the tags is held until the closing tag (a call is only a call once its JSON
parses), then comes out as one ToolCall with its arguments as a JSON string, the shape OpenAI
returns. A block whose JSON does not parse, or that names a tool the request did not offer, is
given back as the text it was: the client sees what the model wrote, never an error.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends `function.arguments`

    def as_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parse_tool_call(block: str, tool_names: set[str] | None = None) -> ToolCall | None:
    """The call in the text between the tags, or None when it is not a well-formed call."""
    try:
        call = json.loads(block)
    except (ValueError, RecursionError):
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    if tool_names is not None and call["name"] not in tool_names:
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(f"call_{secrets.token_hex(12)}", call["name"], json.dumps(arguments, ensure_ascii=False))


def format_tool_call(name: str, arguments) -> str:
    """An earlier call written back into the prompt the way the template tells the model to write it."""
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CLOSE}"


class ToolCallParser:
    """feed(text) -> [("content", str) | ("tool_call", ToolCall)], holding back what may be a tag."""

    def __init__(self, tool_names: set[str] | None = None):
        self.tool_names = tool_names
        self.pending = ""
        self.inside = False

    def feed(self, text: str) -> list[tuple[str, object]]:
        self.pending += text
        out: list[tuple[str, object]] = []
        while True:
            tag = CLOSE if self.inside else OPEN
            at = self.pending.find(tag)
            if at < 0:
                if not self.inside:
                    keep = partial_suffix(self.pending, OPEN)
                    if len(self.pending) > keep:
                        out.append(("content", self.pending[: len(self.pending) - keep]))
                        self.pending = self.pending[len(self.pending) - keep :]
                return out
            if not self.inside:
                if at:
                    out.append(("content", self.pending[:at]))
                self.pending = self.pending[at:]  # the block keeps its tag until it parses
                self.inside = True
                continue
            block, self.pending = self.pending[: at + len(CLOSE)], self.pending[at + len(CLOSE) :]
            out.append(self._block(block))
            self.inside = False

    def flush(self) -> list[tuple[str, object]]:
        """The end of the answer: an unclosed block still counts when its JSON is complete."""
        rest, self.pending = self.pending, ""
        if not rest:
            return []
        if self.inside:
            self.inside = False
            call = parse_tool_call(rest[len(OPEN) :], self.tool_names)
            if call is not None:
                return [("tool_call", call)]
        return [("content", rest)]

    def _block(self, block: str) -> tuple[str, object]:
        call = parse_tool_call(block[len(OPEN) : -len(CLOSE)], self.tool_names)
        return ("tool_call", call) if call is not None else ("content", block)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
