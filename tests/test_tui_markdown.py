"""app/tui/markdown.py: line breaks as chat UIs render them, open code fences closed."""

from app.tui.markdown import chat_parser, close_open_fence, code_blocks, visible


def test_a_single_newline_is_a_line_break_outside_code():
    tokens = chat_parser().parse("Roses are red,\nviolets are blue.\n\n```\na\nb\n```\n")
    inline = next(t for t in tokens if t.type == "inline")
    assert [c.type for c in inline.children] == ["text", "hardbreak", "text"]
    fence = next(t for t in tokens if t.type == "fence")
    assert fence.content == "a\nb\n"  # code untouched


def test_close_open_fence():
    assert close_open_fence("Here:\n```python\nprint(1)") == "Here:\n```python\nprint(1)\n```"
    assert close_open_fence("~~~~\nx\n~~~\n") == "~~~~\nx\n~~~\n~~~~"  # a shorter fence does not close
    closed = "```\na\n```\nafter"
    assert close_open_fence(closed) == closed
    assert close_open_fence("``` not `a fence`\ntext") == "``` not `a fence`\ntext"
    assert close_open_fence("````\n```\n") == "````\n```\n````"
    assert close_open_fence("") == ""


def test_code_blocks_and_visible():
    assert code_blocks("a\n```sh\nls\n```\n\n    indented\n") == ["ls\n", "indented\n"]
    assert visible("a\x1b[31mb\x00\n\t") == "a␛[31mb␀\n\t"
