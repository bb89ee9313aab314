"""Snapshots of the chat screen, a thinking block and the settings screen.

A scripted engine makes them deterministic: fixed text, fixed timings in the status line, and
nothing on screen shows the date. Update with `pytest tests/test_tui_snapshots.py --snapshot-update`
after checking the new pictures (`snapshot_report.html`).
"""

from app.tui.app import ChatApp
from app.tui.store import ChatStore
from backends.sampling import GREEDY
from test_tui_support import ScriptedEngine, ready, send

SIZE = (100, 34)
ANSWER = (
    "<think>\nThe user asks for a loop in Python. A `for` loop over `range` is the simplest;"
    " show it and say what it prints.\n</think>\n"
    "Here is a loop:\n\n```python\nfor i in range(3):\n    print(i)\n```\n\nIt prints **0**, **1** and **2**."
)


def make_app(tmp_path, thinking=True) -> ChatApp:
    engine = ScriptedEngine([ANSWER])
    return ChatApp(
        lambda progress: engine,
        store=ChatStore(tmp_path / "chats.sqlite3"),
        thinking=thinking,
        sampling=GREEDY,
        max_new_tokens=200,
        model_label="SmolLM3-3B",
    )


async def chat(pilot) -> None:
    await ready(pilot)
    pilot.app.chat.set_system_prompt("Answer briefly.")
    await send(pilot, "Show me a loop in Python")
    pilot.app.chat.query_prompt().cursor_blink = False
    pilot.app.clear_notifications()
    await pilot.pause()


def test_main_screen(snap_compare, tmp_path):
    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=chat)


def test_thinking_block_open(snap_compare, tmp_path):
    async def run_before(pilot):
        await chat(pilot)
        block = pilot.app.query("AssistantMessage").last().thinking_block
        block.collapsed = False
        await pilot.pause()

    assert snap_compare(make_app(tmp_path), terminal_size=SIZE, run_before=run_before)


def test_settings_screen(snap_compare, tmp_path):
    async def run_before(pilot):
        await ready(pilot)
        pilot.app.chat.query_prompt().cursor_blink = False
        await pilot.press("ctrl+s")
        await pilot.pause()
        for widget in pilot.app.screen.query("Input"):
            widget.cursor_blink = False

    assert snap_compare(make_app(tmp_path, thinking=False), terminal_size=SIZE, run_before=run_before)
