"""Chat history in SQLite: every message is committed as it is sent or completes.

One file, `chats.sqlite3`, under the user's data directory (`SMOLLM3_DATA_DIR` overrides
it). The schema is versioned with `PRAGMA user_version`; `MIGRATIONS[i]` takes a database
from version i to i + 1, so an older file is upgraded in place on open.

The TUI uses it from its UI thread only. Writes commit at once (autocommit) in WAL mode with
synchronous=FULL: what was committed survives the process being killed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..session import ChatMessage
from backends import settings

DB_NAME = "chats.sqlite3"

MIGRATIONS = [
    """
    CREATE TABLE chats (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        system_prompt TEXT,
        thinking INTEGER NOT NULL DEFAULT 0,
        model TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content TEXT NOT NULL,
        -- done | stopped | context (stopped by a full context) | streaming (being generated,
        -- or the app died while it was: shown as stopped)
        status TEXT NOT NULL DEFAULT 'done',
        in_context INTEGER NOT NULL DEFAULT 1,  -- 0: dropped from the model's context
        created REAL NOT NULL
    );
    CREATE INDEX messages_by_chat ON messages(chat_id, id);
    """,
    """
    -- A chat's sampling settings as JSON (NULL: the defaults); the defaults for new chats.
    ALTER TABLE chats ADD COLUMN settings TEXT;
    CREATE TABLE defaults (name TEXT PRIMARY KEY, value TEXT);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def data_dir() -> Path:
    """$SMOLLM3_DATA_DIR, else the platform's per-user data directory + /smollm3."""
    if (configured := settings.data_dir()) is not None:
        return configured
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "smollm3"
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "smollm3"
    return Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share") / "smollm3"


def default_db_path() -> Path:
    return data_dir() / DB_NAME


@dataclass
class ChatSummary:
    id: int
    title: str
    updated: float
    messages: int


@dataclass
class StoredChat:
    id: int
    title: str
    system_prompt: str | None
    thinking: bool
    messages: list[ChatMessage] = field(default_factory=list)
    settings: dict | None = None  # temperature, top_p, top_k, max_new_tokens; None: the defaults


class StoreError(Exception):
    pass


class ChatStore:
    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path is not None else default_db_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open the chat history {self.path}: {e}") from e

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path} is from a newer smollm3 (schema {version}, this one knows {SCHEMA_VERSION})")
        for i in range(version, SCHEMA_VERSION):
            # executescript commits first; BEGIN..COMMIT makes each step all or nothing.
            self.db.executescript(f"BEGIN; {MIGRATIONS[i]}; PRAGMA user_version = {i + 1}; COMMIT;")

    @contextmanager
    def _transaction(self):
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # --- chats ---

    def create_chat(self, title: str, system_prompt: str | None = None, thinking: bool = False, model: str = "") -> int:
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO chats (title, system_prompt, thinking, model, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
            (title, system_prompt, int(thinking), model, now, now),
        )
        return cur.lastrowid

    def chats(self) -> list[ChatSummary]:
        rows = self.db.execute(
            "SELECT c.id, c.title, c.updated, COUNT(m.id) FROM chats c LEFT JOIN messages m ON m.chat_id = c.id "
            "GROUP BY c.id ORDER BY c.updated DESC, c.id DESC"
        ).fetchall()
        return [ChatSummary(*row) for row in rows]

    def last_chat_id(self) -> int | None:
        row = self.db.execute("SELECT id FROM chats ORDER BY updated DESC, id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def load_chat(self, chat_id: int) -> StoredChat:
        row = self.db.execute("SELECT id, title, system_prompt, thinking, settings FROM chats WHERE id = ?", (chat_id,)).fetchone()
        if row is None:
            raise StoreError(f"no chat {chat_id}")
        chat = StoredChat(row[0], row[1], row[2], bool(row[3]), settings=_json(row[4]))
        for mid, role, content, status, in_context in self.db.execute(
            "SELECT id, role, content, status, in_context FROM messages WHERE chat_id = ? ORDER BY id", (chat_id,)
        ):
            chat.messages.append(ChatMessage(role, content, status, mid, bool(in_context)))
        return chat

    def rename_chat(self, chat_id: int, title: str) -> None:
        self.db.execute("UPDATE chats SET title = ? WHERE id = ?", (title, chat_id))

    def delete_chat(self, chat_id: int) -> None:
        self.db.execute("DELETE FROM chats WHERE id = ?", (chat_id,))

    def set_system_prompt(self, chat_id: int, system_prompt: str | None) -> None:
        self.db.execute("UPDATE chats SET system_prompt = ?, updated = ? WHERE id = ?", (system_prompt, time.time(), chat_id))

    def set_thinking(self, chat_id: int, thinking: bool) -> None:
        self.db.execute("UPDATE chats SET thinking = ? WHERE id = ?", (int(thinking), chat_id))

    def set_settings(self, chat_id: int, settings: dict) -> None:
        self.db.execute("UPDATE chats SET settings = ? WHERE id = ?", (json.dumps(settings), chat_id))

    # --- defaults for new chats ---

    def default(self, name: str):
        """A default stored with set_default (JSON values), or None."""
        row = self.db.execute("SELECT value FROM defaults WHERE name = ?", (name,)).fetchone()
        return _json(row[0]) if row else None

    def set_default(self, name: str, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO defaults (name, value) VALUES (?, ?)", (name, json.dumps(value)))

    # --- messages ---

    def add_message(self, chat_id: int, message: ChatMessage) -> int:
        """Store a new message; sets and returns its id."""
        now = time.time()
        with self._transaction():  # the message and the chat's time together
            cur = self.db.execute(
                "INSERT INTO messages (chat_id, role, content, status, in_context, created) VALUES (?, ?, ?, ?, ?, ?)",
                (chat_id, message.role, message.content, message.status, int(message.in_context), now),
            )
            self.db.execute("UPDATE chats SET updated = ? WHERE id = ?", (now, chat_id))
        message.id = cur.lastrowid
        return message.id

    def update_message(self, message: ChatMessage) -> None:
        self.db.execute("UPDATE messages SET content = ?, status = ? WHERE id = ?", (message.content, message.status, message.id))

    def delete_message(self, message_id: int) -> None:
        self.db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def drop_from_context(self, messages: list[ChatMessage]) -> None:
        with self._transaction():
            self.db.executemany("UPDATE messages SET in_context = 0 WHERE id = ?", [(m.id,) for m in messages if m.id is not None])

    def recent_inputs(self, limit: int = 200) -> list[str]:
        """The user's last messages over all chats, oldest first (the input box's history)."""
        rows = self.db.execute("SELECT content FROM messages WHERE role = 'user' ORDER BY id DESC LIMIT ?", (limit,))
        return [r[0] for r in rows][::-1]


def _json(text: str | None):
    """A stored JSON value; None for NULL or for text this version cannot read."""
    try:
        return json.loads(text) if text is not None else None
    except ValueError:
        return None
