"""Model text for the screen: Markdown with its control characters made visible."""

from __future__ import annotations

from markdown_it import MarkdownIt

_CONTROL = {c: 0x2400 + c for c in range(32) if chr(c) not in "\t\n"} | {0x7F: 0x2421}


def visible(text: str) -> str:
    """Model output for the screen: control characters as their Unicode pictures (␛ for ESC),
    so that a stray escape sequence cannot reach the terminal."""
    return text.translate(_CONTROL)


def code_blocks(markdown: str) -> list[str]:
    """The fenced and indented code blocks of a Markdown text, in order."""
    return [t.content for t in MarkdownIt("gfm-like").parse(markdown) if t.type in ("fence", "code_block")]
