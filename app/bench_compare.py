"""Our engine against llama.cpp on the same GGUF and token ids: ratios and the speed targets.

`smollm3 bench --compare llama.cpp` runs it on the user's machine (CPU, CUDA or Metal: each
engine on the device it picks); bench/run.py uses the same ratios and target rows for the
report in bench/RESULTS.md, so a number printed here means what it means there.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

# Targets, ours / llama.cpp in the same run (speeds: at least; load + first token, RSS: at most).
DECODE_SHORT = 1.15  # decode at the shortest prompt, on the main files
DECODE = 1.0  # decode at the other prompts, at a long context, and on the other quant types
PREFILL_SHORT = 1.0  # prompts under LONG_PROMPT, warm and cold
PREFILL_LONG = 1.5
LONG_PROMPT = 512
LOAD_FIRST_TOKEN = 1.0
PEAK_RSS = 1.0


@dataclass
class Target:
    metric: str
    bound: float
    ratio: float
    at_least: bool  # True: ratio >= bound passes; False: ratio <= bound passes
    detail: str = ""  # the two engines' own figures

    @property
    def met(self) -> bool:
        return self.ratio >= self.bound if self.at_least else self.ratio <= self.bound

    @property
    def miss(self) -> str:
        """By how much a missed target is missed, in percent of the bound ("" when met)."""
        if self.met:
            return ""
        if self.at_least:
            return f"{(1 - self.ratio / self.bound) * 100:.0f}% short"
        return f"{(self.ratio / self.bound - 1) * 100:.0f}% over"

    def row(self) -> str:
        sign = ">=" if self.at_least else "<="
        met = "yes" if self.met else f"**no**: {self.miss}"
        return f"| {self.metric} | {sign} {self.bound:.2f}x | {self.ratio:.2f}x ({self.detail}) | {met} |"


def ratios(ours: dict, peer: dict) -> dict:
    """ours / peer for every headline metric and every prompt length measured by both."""
    out = {k: ours[k] / peer[k] for k in ("load_s", "load_first_token_s", "peak_rss_mb")}
    for p, t in ours["tests"].items():
        if p in peer["tests"]:
            for k in ("prefill_tok_s", "decode_tok_s", "ttft_s", "best_prefill_tok_s", "best_decode_tok_s"):
                out[f"{k}@{p}"] = t[k] / peer["tests"][p][k]
    for p, c in ours.get("cold", {}).items():
        if p in peer.get("cold", {}):
            out[f"cold_prefill_tok_s@{p}"] = c["prefill_tok_s"] / peer["cold"][p]["prefill_tok_s"]
    return out


def target_rows(ours: dict, peer: dict, decode_short: float = DECODE_SHORT, rss: bool = True,
                long: tuple[dict, dict] | None = None) -> list[Target]:
    """The targets for one file. long: (ours, peer) from a long-context decode (measure_long)."""
    tests = sorted((p for p in ours["tests"] if p in peer["tests"]), key=int)
    rows = []
    for p in tests:
        o, q = ours["tests"][p], peer["tests"][p]
        bound = decode_short if p == tests[0] else DECODE
        rows.append(Target(f"decode tok/s, prompt {p}", bound, o["decode_tok_s"] / q["decode_tok_s"], True,
                           f"{o['decode_tok_s']:.2f} vs {q['decode_tok_s']:.2f}"))
    if long:
        o, q = long
        rows.append(Target(f"decode tok/s, {o['context']}-token context", DECODE, o["decode_tok_s"] / q["decode_tok_s"],
                           True, f"{o['decode_tok_s']:.2f} vs {q['decode_tok_s']:.2f}"))
    for p in tests:
        o, q = ours["tests"][p], peer["tests"][p]
        bound = PREFILL_LONG if int(p) >= LONG_PROMPT else PREFILL_SHORT
        rows.append(Target(f"prefill tok/s, prompt {p}", bound, o["prefill_tok_s"] / q["prefill_tok_s"], True,
                           f"{o['prefill_tok_s']:.1f} vs {q['prefill_tok_s']:.1f}"))
    for p, o in sorted(ours.get("cold", {}).items(), key=lambda kv: int(kv[0])):
        q = peer.get("cold", {}).get(p)
        if q and int(p) < LONG_PROMPT:
            rows.append(Target(f"cold prefill tok/s, prompt {p}", PREFILL_SHORT, o["prefill_tok_s"] / q["prefill_tok_s"],
                               True, f"{o['prefill_tok_s']:.1f} vs {q['prefill_tok_s']:.1f}"))
    rows.append(Target("load + first token", LOAD_FIRST_TOKEN, ours["load_first_token_s"] / peer["load_first_token_s"],
                       False, f"{ours['load_first_token_s']:.2f} vs {peer['load_first_token_s']:.2f} s"))
    if rss:
        rows.append(Target("peak RSS", PEAK_RSS, ours["peak_rss_mb"] / peer["peak_rss_mb"], False,
                           f"{ours['peak_rss_mb']:.0f} vs {peer['peak_rss_mb']:.0f} MiB"))
    return rows


def format_targets(rows: list[Target]) -> str:
    lines = ["| metric | target | ours / llama.cpp | met |", "|---|---|---|---|"]
    return "\n".join(lines + [r.row() for r in rows])


def llamacpp_missing() -> str | None:
    """Why llama.cpp cannot be compared against here, or None when llama_cpp imports."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "--compare llama.cpp needs llama-cpp-python in this Python: pip install llama-cpp-python"
    return None
