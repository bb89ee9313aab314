"""`smollm3` without --prompt in a real terminal: a scripted tmux session (skipped without tmux)."""

import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_gguf

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    def __init__(self, tmp_path: Path):
        self.socket = f"smollm3-test-{os.getpid()}"  # a server of our own, never the user's

    def __call__(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True)
        assert done.returncode == 0, f"tmux {' '.join(args)}: {done.stderr.strip()}"
        return done.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "chat")

    def wait_for(self, text: str, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared; the screen:\n{self.screen()}")


def test_chat_in_a_real_terminal(tmp_path):
    tmux = Tmux(tmp_path)
    exit_file = tmp_path / "exit"
    command = (
        # (the test process may carry COLUMNS/LINES from its own terminal: the pane's size counts)
        "unset COLUMNS LINES; "
        f"cd {shlex.quote(str(ROOT))} && SMOLLM3_DATA_DIR={shlex.quote(str(tmp_path))} "
        f"{shlex.quote(sys.executable)} -m app --model-path {shlex.quote(str(tiny_gguf('F16')))} "
        f"-n 6 --temperature 0; echo $? > {shlex.quote(str(exit_file))}; sleep 60"  # (the pane stays for a look)
    )
    tmux("new-session", "-d", "-s", "chat", "-x", "120", "-y", "32", command)
    try:
        screen = tmux.wait_for("ctx 0/4096")
        assert "think off" in screen and "^t Thinking" in screen and "Message SmolLM" in screen
        tmux("send-keys", "-t", "chat", "Hello from tmux", "Enter")
        screen = tmux.wait_for("prefilled")
        assert "─ You ─" in screen and "Hello from tmux" in screen and "─ SmolLM ─" in screen
        screen = tmux.wait_for("reached the token limit")
        assert "generated 6, " in screen
        tmux("send-keys", "-t", "chat", "C-t")
        tmux.wait_for("THINK ON")
        tmux("send-keys", "-t", "chat", "C-q")
        deadline = time.monotonic() + 30
        while not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert exit_file.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "-L", tmux.socket, "kill-server"], capture_output=True)
    with sqlite3.connect(tmp_path / "chats.sqlite3") as db:
        assert db.execute("SELECT role, status FROM messages ORDER BY id").fetchall() == [("user", "done"), ("assistant", "length")]
        assert db.execute("SELECT thinking FROM chats").fetchone() == (1,)
