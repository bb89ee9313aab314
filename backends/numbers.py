"""Rounding up, written once: sizes padded to a step (alignments, pages, cache growth)."""

from __future__ import annotations


def ceil_div(n: int, k: int) -> int:
    """n / k rounded up, for positive k."""
    return -(-n // k)


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k at or above n (gpt-fast's name), for positive k."""
    return ceil_div(n, k) * k
