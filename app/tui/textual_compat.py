"""Every use of Textual's private API, in one place, each with its reason (and a test in
tests/test_tui.py: test_the_footer_does_not_keep_the_keys_it_replaces). Checked against
textual 8.2; pyproject bounds the version below 9."""

from __future__ import annotations

from textual.widgets import Footer


class ChatFooter(Footer):
    """Textual's Footer, without its leak: it re-creates its keys whenever the bindings change
    (twice an answer here), and each key's data_bind watcher on the footer is dropped only when
    the footer's `compact` changes, which it never does. Without this, every answer leaked two
    footers' worth of keys: some 30 MB per 100 answers (tests/test_long_session.py)."""

    async def recompose(self) -> None:
        await super().recompose()
        for watchers in getattr(self, "__watchers", {}).values():  # Textual's own attribute name
            watchers[:] = [(node, callback) for node, callback in watchers if node.is_attached]
