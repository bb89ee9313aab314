"""Why a speculative task falls short: a model's greedy output on bench/speculative.py's tasks
replayed through the drafter (backends/speculative.py) at a model's timed forward costs, beside
the best any prompt-lookup drafter could do on the same output.

    python bench/speculative_replay.py                                   # SmolLM2-135M Q4_1: its text, its costs
    python bench/speculative_replay.py --costs-model bench/models/smollm3-3b-random-Q4_K_M.gguf

The replay feeds the known greedy tokens where the engine would sample them (greedy output is
the same with or without drafts), so it counts each forward's rows exactly as generate() does
and prices them at the forward costs timed here (rows 1 to 16 after the first task's prompt, best of
7). Its speed-up is a simulation: what it leaves out (sampling, Python) costs the measured runs
a few per cent. The bound drafts, at every step, the longest run of the coming tokens that
follows an earlier occurrence of the last 2 tokens (the drafter's shortest lookup), cut to the
lengths that take the fewest seconds overall: no drafter that copies from the context can be
faster at these costs.
--costs-model prices one model's text at another's costs: what a model with the random 3B
files' shape would gain from text that repeats as SmolLM2's does (a projection, not a
measurement: a real 3B writes other text).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from app.bench_measure import ADAPTERS, Spec, import_engine  # noqa: E402
from backends import speculative  # noqa: E402
from speculative import task_prompts  # noqa: E402

MIN_SUFFIX = speculative.MIN_NGRAM


def load(model_path: str):
    spec = Spec("ours", model_path, [], 0, 0, 0, 1, None)
    import_engine(spec)
    adapter = ADAPTERS["ours"](spec)
    adapter.load()
    return adapter


def greedy_streams(adapter, tokens: int) -> dict[str, tuple[list[int], list[int]]]:
    os.environ["SMOLLM3_SPECULATE"] = "0"
    streams = {}
    for name, ids in task_prompts(adapter.engine).items():
        adapter.generate(ids, tokens)
        streams[name] = (ids, list(adapter.tokens))
    return streams


def forward_costs(adapter, ids: list[int], max_rows: int = 16, reps: int = 7) -> dict[int, float]:
    """Seconds a forward of 1..max_rows rows takes at the end of `ids` (the rows overwrite the
    cache positions after it, as a draft's do), best of `reps`."""
    engine = adapter.engine
    adapter.generate(ids, 1)
    at = len(ids)
    costs = {}
    for rows in range(1, max_rows + 1):
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            engine.forward(ids[:rows], at, last_only=rows == 1)
            best = min(best, time.perf_counter() - start)
        costs[rows] = best
    return costs


def replay(ids: list[int], out: list[int], costs: dict[int, float]) -> tuple[float, int, int, int]:
    """(seconds, kept, drafted, forwards) for the tokens after the first, as generate() feeds them."""
    lookup = speculative.PromptLookup(ids, set())
    timed = speculative.ForwardCosts()
    lookup.extend(out[:1])
    seconds, kept, drafted, forwards, last = 0.0, 0, 0, 0, (-1, 0)
    i = 1
    while i < len(out):
        lookup.verified(*last)
        draft = lookup.draft(len(out) - i - 1, timed)
        rows = 1 + len(draft)
        timed.record(rows, costs[rows])
        seconds += costs[rows]
        k = 0
        while k < len(draft) and draft[k] == out[i + k]:
            k += 1
        lookup.extend(out[i : i + k + 1])
        kept, drafted, forwards, last = kept + k, drafted + len(draft), forwards + 1, (len(draft), k)
        i += k + 1
    return seconds, kept, drafted, forwards


def longest_copy(context: list[int], coming: list[int], limit: int) -> int:
    """The most tokens of `coming` that follow an earlier occurrence of the context's last
    MIN_SUFFIX tokens, a copy running on into its own tokens as the drafter's does (copy_on)."""
    suffix, whole, best = context[-MIN_SUFFIX:], context + coming, 0
    for start in range(MIN_SUFFIX, len(context)):
        if context[start - MIN_SUFFIX : start] == suffix:
            n = 0
            while n < limit and n < len(coming) and whole[start + n] == coming[n]:
                n += 1
            best = max(best, n)
    return best


def bound(ids: list[int], out: list[int], costs: dict[int, float]) -> float:
    """The fewest seconds for the tokens after the first with drafts of only what the longest
    copy offers at each step, each cut to the best length for what follows (dynamic programming)."""
    n = len(out)
    longest = [0] + [longest_copy(ids + out[:i], out[i:], min(speculative.MAX_DRAFT, n - i - 1)) for i in range(1, n)]
    fastest = [0.0] * (n + 1)
    for i in range(n - 1, 0, -1):
        fastest[i] = min(costs[1 + d] + fastest[i + d + 1] for d in range(longest[i] + 1))
    return fastest[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"),
                        help="the model whose greedy output is replayed")
    parser.add_argument("--costs-model", help="the model whose forward costs price it (default: the same)")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    text_model = load(args.model_path)
    streams = greedy_streams(text_model, args.tokens)
    costs_model = load(args.costs_model) if args.costs_model else text_model
    first_ids = next(iter(streams.values()))[0]
    costs = forward_costs(costs_model, first_ids)
    print("forward ms by rows: " + ", ".join(f"{r}: {s * 1000:.1f}" for r, s in costs.items()))
    print("| task | plain forwards | drafter: forwards | kept / drafted | speed-up | bound |")
    print("|---|--:|--:|--:|--:|--:|")
    for name, (ids, out) in streams.items():
        plain = costs[1] * (len(out) - 1)
        seconds, kept, drafted, forwards = replay(ids, out, costs)
        print(f"| {name} | {len(out) - 1} | {forwards} | {kept} / {drafted} | {plain / seconds:.2f}x | "
              f"{plain / bound(ids, out, costs):.2f}x |")


if __name__ == "__main__":
    main()
