"""`smollm3` without --prompt in a real terminal: scripted tmux sessions (skipped without tmux)."""

import os
import re
import shlex
import shutil
import signal
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
        # A server of our own, never the user's, and one per test: a server just told to quit
        # still holds its socket for a moment, and a session started on it then fails
        # ("server exited unexpectedly").
        self.socket = f"smollm3-test-{os.getpid()}-{tmp_path.name}"

    def __call__(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True)
        assert done.returncode == 0, f"tmux {' '.join(args)}: {done.stderr.strip()}"
        return done.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "chat")

    def kill_server(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)

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
        screen = tmux.wait_for("prefill")
        assert "─ You ─" in screen and "Hello from tmux" in screen and "─ SmolLM ─" in screen
        screen = tmux.wait_for("reached the token limit")
        assert re.search(r"generated 6,| 6 tok ", screen)
        tmux("send-keys", "-t", "chat", "C-t")
        tmux.wait_for("THINK ON")
        tmux("send-keys", "-t", "chat", "C-q")
        deadline = time.monotonic() + 30
        while not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert exit_file.read_text().strip() == "0"
    finally:
        tmux.kill_server()
    with sqlite3.connect(tmp_path / "chats.sqlite3") as db:
        assert db.execute("SELECT role, status FROM messages ORDER BY id").fetchall() == [("user", "done"), ("assistant", "length")]
        assert db.execute("SELECT thinking FROM chats").fetchone() == (1,)


def start_chat(tmux: Tmux, tmp_path: Path, *flags: str) -> dict[str, Path]:
    """The chat in a tmux pane; files: pid (the app's), exit (its status, then "restored" when
    the terminal's settings are as they were before it started)."""
    files = {name: tmp_path / name for name in ("pid", "exit")}
    app = (
        f"echo $$ > {shlex.quote(str(files['pid']))}; exec {shlex.quote(sys.executable)} -m app "
        f"--model-path {shlex.quote(str(tiny_gguf('F16')))} {' '.join(flags)}"
    )
    command = (
        f"unset COLUMNS LINES; cd {shlex.quote(str(ROOT))}; before=$(stty -g); "
        f"SMOLLM3_DATA_DIR={shlex.quote(str(tmp_path))} bash -c {shlex.quote(app)}; echo $? > {shlex.quote(str(files['exit']))}; "
        f"[ \"$(stty -g)\" = \"$before\" ] && echo restored >> {shlex.quote(str(files['exit']))}; sleep 60"
    )
    tmux("new-session", "-d", "-s", "chat", "-x", "120", "-y", "32", command)
    return files


def wait_for_exit(files: dict[str, Path], timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while not (files["exit"].exists() and files["exit"].read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.3)  # the "restored" line
    return files["exit"].read_text().split()


def stored(tmp_path: Path) -> list[tuple]:
    with sqlite3.connect(tmp_path / "chats.sqlite3") as db:
        return db.execute("SELECT role, status, length(content) > 0 FROM messages ORDER BY id").fetchall()


def test_ctrl_c_stops_the_answer_then_quits_in_a_real_terminal(tmp_path):
    tmux = Tmux(tmp_path)
    files = start_chat(tmux, tmp_path, "-n 3000", "--temperature 0")
    try:
        tmux.wait_for("ctx 0/4096")
        assert "^c Quit" in tmux.screen()
        tmux("send-keys", "-t", "chat", "Tell me a long story", "Enter")
        screen = tmux.wait_for(" tok, ")  # the live count: the answer has begun
        assert "^c Stop" in screen
        tmux("send-keys", "-t", "chat", "C-c")  # the key, not a signal: the terminal is in raw mode
        screen = tmux.wait_for("Press Ctrl+C again to quit")
        assert "Stopped" in screen and not files["exit"].exists()
        tmux("send-keys", "-t", "chat", "C-c")  # within the 3 s window
        assert wait_for_exit(files) == ["0", "restored"]
        assert "Traceback" not in tmux.screen()
    finally:
        tmux.kill_server()
    assert stored(tmp_path) == [("user", "done", 1), ("assistant", "stopped", 1)]


def test_sigint_mid_answer_quits_cleanly_keeping_the_answer(tmp_path):
    tmux = Tmux(tmp_path)
    files = start_chat(tmux, tmp_path, "-n 3000", "--temperature 0")
    try:
        tmux.wait_for("ctx 0/4096")
        tmux("send-keys", "-t", "chat", "Tell me a long story", "Enter")
        tmux.wait_for(" tok, ")  # the live count: the answer has begun
        os.kill(int(files["pid"].read_text()), signal.SIGINT)  # `kill -INT`: from outside, not the keyboard
        assert wait_for_exit(files) == ["130", "restored"]
        assert "Traceback" not in tmux.screen()
    finally:
        tmux.kill_server()
    assert stored(tmp_path) == [("user", "done", 1), ("assistant", "stopped", 1)]
