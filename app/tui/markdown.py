"""Model text for the screen and the export: control characters made visible, Markdown parsed
as chat UIs do, open code fences closed."""

from __future__ import annotations

import re

from markdown_it import MarkdownIt

_CONTROL = {c: 0x2400 + c for c in range(32) if chr(c) not in "\t\n"} | {0x7F: 0x2421}


def visible(text: str) -> str:
    """Model output for the screen: control characters as their Unicode pictures (␛ for ESC),
    so that a stray escape sequence cannot reach the terminal."""
    return text.translate(_CONTROL)


def code_blocks(markdown: str) -> list[str]:
    """The fenced and indented code blocks of a Markdown text, in order."""
    return [t.content for t in MarkdownIt("gfm-like").parse(markdown) if t.type in ("fence", "code_block")]


def chat_parser() -> MarkdownIt:
    """Markdown as chat UIs render answers: a single newline is a line break (a poem keeps its
    lines), where CommonMark would join the lines into one paragraph. Code blocks are untouched.

    markdown-it's `breaks` option acts in its HTML renderer only; Textual renders the tokens
    itself (a softbreak as a space), so the breaks are made hard in the token stream."""
    parser = MarkdownIt("gfm-like")
    parser.core.ruler.push("hard_line_breaks", _hard_line_breaks)
    return parser


def _hard_line_breaks(state) -> None:
    for token in state.tokens:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def close_open_fence(text: str) -> str:
    """The text with a code fence left open (an answer stopped inside one) closed, so that what
    follows it in a document is not code too (CommonMark: a closing fence is the same character,
    at least as long, with nothing after it)."""
    fence = None
    for line in text.splitlines():
        if not (m := _FENCE.match(line)):
            continue
        marker, rest = m.groups()
        if fence is None:
            if not (marker[0] == "`" and "`" in rest):  # a backtick fence's info string has none
                fence = marker
        elif marker[0] == fence[0] and len(marker) >= len(fence) and not rest.strip():
            fence = None
    if fence is None:
        return text
    return text + ("" if text.endswith("\n") else "\n") + fence
