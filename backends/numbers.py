"""Rounding up, written once: sizes padded to a step (alignments, pages, cache growth)."""

from __future__ import annotations


def ceil_div(n: int, k: int) -> int:
    """n / k rounded up, for positive k."""
    return -(-n // k)


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k at or above n (gpt-fast's name), for positive k."""
    return ceil_div(n, k) * k


def cache_capacity(current: int, needed: int, limit: int, exact: bool = False) -> int:
    """A KV cache's next size, to hold `needed` positions: it doubles, in steps of 256, up to
    `limit` (the model's context), so a long generation reallocates a handful of times; `exact`
    (a generation that knows its length) grows to `needed` in steps of 64 only."""
    step = 64 if exact else 256
    capacity = needed if exact else min(max(needed, 2 * current, 256), limit)
    return min(find_multiple(capacity, step), max(limit, needed))
