"""A long chat: 200 turns on the tiny model keep memory flat once the KV cache is full-size."""

import json
import subprocess
import sys
import textwrap

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
