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

# Our CPU kernels compute every row of a forward as that row decoded alone (backends/native/
# model.py, backends/torch/native_layers.py), so a verified row is a decoded row.
MAX_DRAFT = 10
# Suffixes of 4 down to 2 tokens are looked up: a single token matches nearly everywhere and
# predicts badly (SmolLM2, bench/speculative.py's tasks: 1 drafted token in 5 accepted, against
# 4 in 5 from 2 tokens up).
MAX_NGRAM = 4
MIN_NGRAM = 2
FIRST_DRAFT = 4  # drafted before any forward has been timed
# What each draft position's acceptance is taken to be before anything is seen: 3 in 4, as if
# from 4 drafts (SmolLM2 on bench/speculative.py's tasks: 0.73-0.78 at the first position, higher
# after). Seen drafts count less by DECAY a forward, so a run of rejections that stopped the
# drafting fades back to this guess and drafting is tried again.
PRIOR_ACCEPTED, PRIOR_DRAFTED = 3.0, 4.0
DECAY = 0.9


def enabled(rows_exact: bool) -> bool:
    """SMOLLM3_SPECULATE: 0 off, 1 on; unset (or auto), on where the backend computes a batch's
    rows exactly as decoded rows (Engine.rows_exact). Elsewhere (GPU kernels, float weights in
    BLAS) rows differ by rounding, and a near-tie can then pick another token than plain decoding."""
    setting = settings.speculate()
    return setting == "1" or (setting == "auto" and rows_exact)


class ForwardCosts:
    """Seconds a decoding forward takes by the rows fed (the token and its draft), through the
    sampling of its first row (MLX computes lazily, when sampled), as measured on this engine.
    What a drafted row costs differs by an order of magnitude between machines and models: on
    SmolLM2 on 2 cores a row is ~0.45 of a decoded token's forward (where AMX's tiles take 8 rows
    and up, 8-11 rows cost what 5 do); a 3B model's weights stream from memory once for all rows."""

    def __init__(self):
        self.seconds: dict[int, float] = {}

    def record(self, rows: int, seconds: float) -> None:
        # Noise only adds time (another process, a page fault): a lower time is followed at
        # once, a higher one slowly.
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None or seconds < old else 0.9 * old + 0.1 * seconds

    def estimate(self, rows: int) -> float | None:
        """The measured time, else the largest measured for fewer rows (more rows cost at least
        that: an unmeasured count looks cheap until it is tried), else None."""
        if rows in self.seconds:
            return self.seconds[rows]
        below = [s for r, s in self.seconds.items() if r < rows]
        return max(below) if below else None


class PromptLookup:
    """The context (prompt and generated tokens) and, for each n-gram in it (n = MIN_NGRAM to
    MAX_NGRAM), the position of the token after its latest occurrence; and how the drafts of
    this generation fared, position by position."""

    def __init__(self, tokens: list[int], stop_ids: set[int], max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        self.tokens: list[int] = []
        self.stop_ids = stop_ids  # never drafted: plain decoding never feeds an end-of-sequence token
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.follows: dict[tuple[int, ...], int] = {}
        # reached[k]: drafts that got to position k (k - 1 accepted before it); accepted[k]: kept
        self.reached = [0.0] * (MAX_DRAFT + 1)
        self.accepted = [0.0] * (MAX_DRAFT + 1)
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.follows[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def verified(self, drafted: int, accepted: int) -> None:
        """The last forward fed `drafted` tokens (-1: there was none) and the samples kept the
        first `accepted`. What was seen counts less with every forward, drafted or not."""
        if drafted < 0:
            return
        self.reached = [n * DECAY for n in self.reached]
        self.accepted = [n * DECAY for n in self.accepted]
        for k in range(1, min(accepted + 1, drafted) + 1):
            self.reached[k] += 1
            self.accepted[k] += k <= accepted

    def acceptance(self, k: int) -> float:
        """The chance that draft position k is kept, given that those before it were."""
        return (self.accepted[k] + PRIOR_ACCEPTED) / (self.reached[k] + PRIOR_DRAFTED)

    def continuation(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest suffix seen before (its latest occurrence)."""
        if limit <= 0:
            return []
        for n in range(min(self.max_ngram, len(self.tokens)), self.min_ngram - 1, -1):
            start = self.follows.get(tuple(self.tokens[-n:]))
            if start is not None:
                return until_stop(self.tokens[start : start + limit], self.stop_ids)
        return []

    def draft(self, limit: int, costs: ForwardCosts) -> list[int]:
        """The continuation, cut to the length with the most tokens expected per second."""
        tokens = self.continuation(min(limit, MAX_DRAFT))
        return tokens[: draft_length(len(tokens), self.acceptance, costs)]


def draft_length(available: int, acceptance, costs: ForwardCosts) -> int:
    """How many of `available` drafted tokens to feed: the d that maximizes the tokens a forward
    is expected to give (1 + the chance that the first is kept + that the first two are ...)
    over what a forward of 1 + d rows costs. Before any forward is timed, FIRST_DRAFT."""
    if not costs.seconds:
        return min(available, FIRST_DRAFT)
    fallback = min(costs.seconds.values())  # for fewer rows than any timed: no more than the cheapest
    best_rate, best, expected, kept = 1 / (costs.estimate(1) or fallback), 0, 1.0, 1.0
    for d in range(1, available + 1):
        kept *= acceptance(d)
        expected += kept
        rate = expected / (costs.estimate(1 + d) or fallback)
        if rate > best_rate:
            best_rate, best = rate, d
    return best


def until_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


def lookup_draft(tokens: list[int], limit: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """PromptLookup.continuation by a scan of the whole context: the reference the index is tested against."""
    for n in range(min(max_ngram, len(tokens)), min_ngram - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - 1, n - 1, -1):  # the latest occurrence with a token after it
            if tokens[start - n : start] == suffix:
                return tokens[start : start + limit]
    return []
