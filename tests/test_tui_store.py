"""The SQLite chat history: location, schema versioning, commits, and the Markdown export."""

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.session import ChatMessage
from app.tui.export import chat_markdown
from app.tui.store import SCHEMA_VERSION, ChatStore, StoreError, data_dir, default_db_path


def test_data_dir_honours_smollm3_data_dir_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOLLM3_DATA_DIR", str(tmp_path / "mine"))
    assert data_dir() == tmp_path / "mine" and default_db_path() == tmp_path / "mine" / "chats.sqlite3"
    monkeypatch.delenv("SMOLLM3_DATA_DIR")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
        assert data_dir() == tmp_path / "xdg" / "smollm3"
        monkeypatch.delenv("XDG_DATA_HOME")
        monkeypatch.setenv("HOME", str(tmp_path))
        assert data_dir() == tmp_path / ".local" / "share" / "smollm3"


def test_default_store_is_created_under_the_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOLLM3_DATA_DIR", str(tmp_path / "a" / "b"))
    store = ChatStore()
    assert store.path == tmp_path / "a" / "b" / "chats.sqlite3" and store.path.exists()
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_messages_are_committed_as_they_are_written(tmp_path):
    store = ChatStore(tmp_path / "c.sqlite3")
    chat = store.create_chat("t", "sys", thinking=True, model="m.gguf")
    user, answer = ChatMessage("user", "question"), ChatMessage("assistant", "par", "streaming")
    store.add_message(chat, user)
    store.add_message(chat, answer)
    # Another connection (as after a crash: nothing is pending in this one) sees them.
    other = sqlite3.connect(tmp_path / "c.sqlite3")
    assert other.execute("SELECT role, content, status FROM messages ORDER BY id").fetchall() == [
        ("user", "question", "done"),
        ("assistant", "par", "streaming"),
    ]
    answer.content, answer.status = "partial", "stopped"
    store.update_message(answer)
    store.drop_from_context([user])
    assert other.execute("SELECT content, status, in_context FROM messages ORDER BY id").fetchall() == [
        ("question", "done", 0),
        ("partial", "stopped", 1),
    ]
    loaded = store.load_chat(chat)
    assert (loaded.title, loaded.system_prompt, loaded.thinking) == ("t", "sys", True)
    assert [(m.role, m.in_context) for m in loaded.messages] == [("user", False), ("assistant", True)]


def test_chats_newest_first_rename_delete_cascades(tmp_path):
    store = ChatStore(tmp_path / "c.sqlite3")
    a = store.create_chat("a")
    b = store.create_chat("b")
    store.add_message(a, ChatMessage("user", "later"))  # touching a chat makes it the newest
    assert [c.title for c in store.chats()] == ["a", "b"] and store.last_chat_id() == a
    assert [c.messages for c in store.chats()] == [1, 0]
    store.rename_chat(a, "renamed")
    store.delete_chat(a)
    assert [c.title for c in store.chats()] == ["b"]
    assert store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    with pytest.raises(StoreError):
        store.load_chat(a)


def test_recent_inputs_span_chats_oldest_first(tmp_path):
    store = ChatStore(tmp_path / "c.sqlite3")
    a, b = store.create_chat("a"), store.create_chat("b")
    store.add_message(a, ChatMessage("user", "one"))
    store.add_message(a, ChatMessage("assistant", "reply"))
    store.add_message(b, ChatMessage("user", "two"))
    assert store.recent_inputs() == ["one", "two"] and store.recent_inputs(limit=1) == ["two"]


def test_schema_version_is_checked_and_kept(tmp_path):
    path = tmp_path / "c.sqlite3"
    ChatStore(path).close()
    ChatStore(path).close()  # reopening an up-to-date file migrates nothing
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer smollm3"):
        ChatStore(path)


def test_an_unwritable_location_is_a_store_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open the chat history"):
        ChatStore(blocker / "c.sqlite3")


def test_a_commit_survives_sigkill(tmp_path):
    path = tmp_path / "c.sqlite3"
    code = textwrap.dedent(
        f"""
        import os, signal
        from app.session import ChatMessage
        from app.tui.store import ChatStore
        store = ChatStore({str(path)!r})
        chat = store.create_chat("t")
        store.add_message(chat, ChatMessage("user", "typed before the crash"))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent)
    assert proc.returncode == -9
    chat = ChatStore(path).load_chat(1)
    assert [m.content for m in chat.messages] == ["typed before the crash"]


def test_markdown_export_marks_stopped_answers(tmp_path):
    store = ChatStore(tmp_path / "c.sqlite3")
    chat = store.create_chat("Title")
    store.add_message(chat, ChatMessage("user", "Q"))
    store.add_message(chat, ChatMessage("assistant", "<think>\n\n</think>\nA", "stopped"))
    assert chat_markdown(store.load_chat(chat)) == "# Title\n\n## You\n\nQ\n\n## SmolLM\n\nA\n\n*(stopped)*\n"
