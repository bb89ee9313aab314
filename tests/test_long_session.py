"""A long chat: 200 turns on the tiny model keep memory flat once the KV cache is full-size."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import tiny_gguf

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)  # a tiny model runs fastest on one thread (and the test beside others)
    import backends
    from app.session import ChatSession
    from backends.sampling import SamplingParams

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

    engine = backends.load(sys.argv[1], backend="torch")
    # The KV cache at its full size (the context) from the start: what grows after is the rest.
    engine.model.ensure_capacity(engine.config.context_length)
    for cache in engine.model.caches:  # resident from the start too (it is allocated unfilled)
        cache.k.zero_(), cache.v.zero_()
    session = ChatSession(engine)
    sampling = SamplingParams(temperature=0.8, seed=1)
    samples = {}
    for turn in range(200):
        # When the context is nearly full, drop the oldest turns down to half of it (a full
        # prefill each time, so not every turn).
        if session.context_tokens() > engine.config.context_length - 200:
            while session.messages and session.context_tokens() > engine.config.context_length // 2:
                session.drop_oldest_turn()
        "".join(session.reply(f"Turn {turn}: tell me something new about the number {turn}.", 8, sampling))
        if turn in (60, 199):
            samples[turn] = rss_mb()
    print(json.dumps({"samples": samples, "kv_capacity": engine.model.capacity, "messages": len(session.messages)}))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_200_turns_keep_rss_flat():
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_gguf("Q8_0"))],
                         capture_output=True, text=True, timeout=900, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    early, late = r["samples"]["60"], r["samples"]["199"]
    assert r["kv_capacity"] <= 4096  # the cache never outgrows the context
    assert late - early < 25, r  # MB: nothing but the (already full-size) KV cache grows with a chat


TUI_SCRIPT = textwrap.dedent(
    """
    import asyncio, ctypes, gc, json, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    torch.set_num_threads(1)
    from textual._styles_cache import StylesCache
    from app.tui.app import ChatApp
    from app.tui.chat_log import ChatLog
    from app.tui.store import ChatStore
    from app.tui.turns import drop_to_fit
    from backends.sampling import SamplingParams
    from test_tui_support import ready, send, tiny_engine

    def measure():
        # Textual keeps up to 1024 discarded widgets' render caches in an lru_cache: bounded,
        # but full only after ~50 answers; cleared here so that both samples leave it out.
        StylesCache.get_inner_outer.cache_clear()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/status") as f:
            rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
        return rss, len(gc.get_objects())

    async def chat(db, turns):
        engine = tiny_engine()
        engine.model.ensure_capacity(engine.config.context_length)  # the KV cache full-size from the start,
        for cache in engine.model.caches:  # and resident (it is allocated unfilled): its pages are not a leak
            cache.k.zero_(), cache.v.zero_()
        app = ChatApp(lambda progress: engine, store=ChatStore(db), max_new_tokens=8,
                      sampling=SamplingParams(temperature=0.8, seed=1))
        ChatLog.MAX_SHOWN_MESSAGES = 20  # the same trimming as at 100, reached sooner
        samples = {}
        async with app.run_test(size=(100, 32)) as pilot:
            await ready(pilot)
            # A first message of ~2200 tokens: the context fills and old turns are dropped early.
            first = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(140))
            for turn in range(turns):
                if app.chat.session.context_tokens() > engine.config.context_length - 100:
                    while app.chat.session.context_tokens() > engine.config.context_length // 2:
                        await drop_to_fit(app.chat, at_least_one=True)
                await send(pilot, first if turn == 0 else f"Turn {turn}: what about {turn}?")
                if turn in (40, turns - 1):
                    samples[turn] = measure()
            shown = len(app.query("UserMessage, AssistantMessage"))
        print(json.dumps({"samples": samples, "kv_capacity": engine.model.capacity, "shown": shown}))

    asyncio.run(chat(sys.argv[2], int(sys.argv[3])))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc, trims glibc's heap")
def test_a_long_tui_chat_keeps_rss_flat(tmp_path):
    """The same through the chat TUI (Pilot, real generation): 70 turns, the most a test can
    afford here (~0.5 s a turn), with the KV cache full-size from the first turn. It found two
    leaks: Textual's Footer kept every key it re-created (app/tui/textual_compat.py ChatFooter), and
    every message stayed on screen (now the newest MAX_SHOWN_MESSAGES)."""
    tests = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", TUI_SCRIPT, tests, str(tmp_path / "chats.sqlite3"), "70"],
                         cwd=Path(tests).parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    (early_rss, early_objects), (late_rss, late_objects) = r["samples"]["40"], r["samples"]["69"]
    assert r["kv_capacity"] == 4096 and r["shown"] == 20
    # MB over 29 turns (~10 here: the growing context's working memory); the leaks made ~0.7 MB a turn more
    assert late_rss - early_rss < 20, r
    # the session's messages and input history (the screen keeps the newest 20 from turn ~35 on);
    # the leaks made ~1000 a turn
    assert late_objects - early_objects < 1500, r
