"""Prompt-lookup speculative decoding: no second model. The draft is what followed the latest
earlier occurrence of the context's last few tokens (summaries, edits and answers about a
pasted text copy spans of it), fed with the sampled token in one forward and then verified.

Verification samples each row exactly as plain decoding samples its one row, and keeps a
draft token only where the sample equals it; the first row that disagrees gives the next
token itself. A draft is a point mass, so this is exact speculative sampling (Leviathan et al.
2023, with q one-hot): greedy or sampled, every token comes from the same distribution plain
decoding draws it from, with the same number of draws, so a seeded run gives the same text.
"""

from __future__ import annotations

from . import settings

# The native CPU layers compute every row of a forward as that row decoded alone
# (backends/torch/native_layers.py), so a verified row is a decoded row. Drafts stay short: a
# rejected drafted row costs a share of a forward (~0.4 on SmolLM2-135M, whose weights sit in
# cache; less where they stream from memory).
MAX_DRAFT = 10
# Suffixes of 4 down to 2 tokens are looked up: a single token matches nearly everywhere and
# predicts badly (SmolLM2, bench/speculative.py's tasks: 1 drafted token in 5 accepted, against
# 4 in 5 from 2 tokens up), and each drafted row costs a share of a forward.
MAX_NGRAM = 4
MIN_NGRAM = 2
FIRST_DRAFT = 4


def enabled(rows_exact: bool) -> bool:
    """SMOLLM3_SPECULATE: 0 off, 1 on; unset (or auto), on where the backend computes a batch's
    rows exactly as decoded rows (Engine.rows_exact). Elsewhere (GPU kernels, float weights in
    BLAS) rows differ by rounding, and a near-tie can then pick another token than plain decoding."""
    setting = settings.speculate()
    return setting == "1" or (setting == "auto" and rows_exact)


class PromptLookup:
    """The context (prompt and generated tokens) and, for each n-gram in it (n = MIN_NGRAM to
    MAX_NGRAM), the position of the token after its latest occurrence."""

    def __init__(self, tokens: list[int], stop_ids: set[int], max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        self.tokens: list[int] = []
        self.stop_ids = stop_ids  # never drafted: plain decoding never feeds an end-of-sequence token
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.follows: dict[tuple[int, ...], int] = {}
        self.length = FIRST_DRAFT  # drafts' length, after how the last ones fared (see verified)
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.follows[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def verified(self, drafted: int, accepted: int) -> None:
        """Lengthen drafts while they are accepted whole, else draft what was accepted and one
        more: a rejected row costs a share of a forward and gives nothing."""
        self.length = next_draft_length(self.length, drafted, accepted)

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` (and self.length) tokens that followed the longest suffix seen before
        (its latest occurrence)."""
        limit = min(limit, self.length)
        if limit <= 0:
            return []
        for n in range(min(self.max_ngram, len(self.tokens)), self.min_ngram - 1, -1):
            start = self.follows.get(tuple(self.tokens[-n:]))
            if start is not None:
                return until_stop(self.tokens[start : start + limit], self.stop_ids)
        return []


def next_draft_length(length: int, drafted: int, accepted: int) -> int:
    if drafted <= 0:  # nothing drafted, nothing learned
        return length
    return min(MAX_DRAFT, length + 2) if accepted == drafted else max(1, accepted + 1)


def until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


def lookup_draft(tokens: list[int], limit: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """PromptLookup.draft by a scan of the whole context: the reference the index is tested against."""
    for n in range(min(max_ngram, len(tokens)), min_ngram - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - 1, n - 1, -1):  # the latest occurrence with a token after it
            if tokens[start - n : start] == suffix:
                return tokens[start : start + limit]
    return []
