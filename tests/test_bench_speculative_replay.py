"""bench/speculative_replay.py: a greedy output replayed through the drafter at given forward
costs, and the bound no prompt-lookup drafter beats on that output."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import speculative_replay as replay_script  # noqa: E402

# a row past the first costs a tenth of it: drafting pays wherever a draft may be kept
CHEAP_ROWS = {rows: 1.0 + 0.1 * (rows - 1) for rows in range(1, 17)}


def test_an_answer_that_copies_the_prompt_is_drafted_and_kept():
    prompt = list(range(100, 160))
    out = [7] + list(range(100, 160))  # a token, then the prompt word for word
    seconds, kept, drafted, forwards = replay_script.replay(prompt, out, CHEAP_ROWS)
    assert kept > 40 and forwards < 20 and kept + forwards == len(out) - 1
    assert replay_script.bound(prompt, out, CHEAP_ROWS) <= seconds < CHEAP_ROWS[1] * (len(out) - 1)


def test_an_answer_with_nothing_to_copy_costs_its_plain_forwards():
    prompt, out = list(range(100, 160)), list(range(1000, 1040))
    seconds, kept, drafted, forwards = replay_script.replay(prompt, out, CHEAP_ROWS)
    assert (kept, drafted, forwards) == (0, 0, len(out) - 1) and seconds == pytest.approx(len(out) - 1)
    assert replay_script.bound(prompt, out, CHEAP_ROWS) == pytest.approx(len(out) - 1)


def test_the_bound_copies_into_its_own_tokens_as_a_loop_does():
    prompt = [1, 2, 3, 4]
    out = [5, 6] + [5, 6] * 20  # a loop: after "5 6" comes "5 6 5 6 ..." past the context's end
    assert replay_script.longest_copy(prompt + out[:4], out[4:], 15) == 15
    assert replay_script.bound(prompt, out, CHEAP_ROWS) < replay_script.replay(prompt, out, CHEAP_ROWS)[0] + 1e-9


@pytest.mark.parametrize("seed", range(5))
def test_the_bound_is_never_slower_than_the_drafter(seed):
    import random

    rng = random.Random(seed)
    words = [rng.randrange(30) for _ in range(300)]  # a small vocabulary: matches that run on and break
    prompt, out = words[:200], words[200:]
    costs = {rows: 1.0 + rng.uniform(0.05, 0.6) * (rows - 1) for rows in range(1, 17)}
    assert replay_script.bound(prompt, out, costs) <= replay_script.replay(prompt, out, costs)[0] + 1e-9


ROW = re.compile(r"^\| (summarize|edit code|document QA) \| (\d+) \| (\d+) \| (\d+) / (\d+) \| ([\d.]+)x \| ([\d.]+)x \|$")


def test_replays_the_real_smollm2s_tasks(smollm2_gguf):
    r = subprocess.run([sys.executable, str(BENCH / "speculative_replay.py"), "--model-path", str(smollm2_gguf), "--tokens", "24"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [m for m in map(ROW.match, r.stdout.splitlines()) if m]
    assert [m[1] for m in rows] == ["summarize", "edit code", "document QA"]
    for m in rows:
        plain, forwards, kept = int(m[2]), int(m[3]), int(m[4])
        assert plain == 23 and forwards + kept == plain and float(m[6]) <= float(m[7]) + 0.005
