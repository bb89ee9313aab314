"""Prompt-lookup speculative decoding: no second model. The draft is what followed the latest
earlier occurrence of the context's last few tokens (summaries, edits and answers about a
pasted text copy spans of it; a small model's greedy loops copy themselves), fed with the
sampled token in one forward and then verified. How long a draft is weighs how drafts of its
kind fared against what this engine's rows cost.

Verification samples each row exactly as plain decoding samples its one row, and keeps a
draft token only where the sample equals it; the first row that disagrees gives the next
token itself. A draft is a point mass, so this is exact speculative sampling (Leviathan et al.
2023, with q one-hot): greedy or sampled, every token comes from the same distribution plain
decoding draws it from, with the same number of draws, so a seeded run gives the same text.
"""

from __future__ import annotations

from . import settings

# Our CPU kernels compute every row of a forward as that row decoded alone (backends/native/
# model.py, backends/torch/native_layers.py), so a verified row is a decoded row. With the token
# fed, a forward of up to 16 rows: one AMX tile's height, over which rows past 8 cost little
# (draft_length weighs what they cost wherever they are dear).
MAX_DRAFT = 15
# Suffixes of 4 down to 2 tokens are looked up: a single token matches nearly everywhere and
# predicts badly (SmolLM2, bench/speculative.py's tasks: 1 drafted token in 5 accepted, against
# 4 in 5 from 2 tokens up).
MAX_NGRAM = 4
MIN_NGRAM = 2
FIRST_DRAFT = 4  # drafted before any forward has been timed
# A draft whose occurrence agrees with the context's last LONG_MATCH tokens or more is a copy
# under way (a quoted line, an unchanged stretch of code, a loop): SmolLM2 on bench/speculative.py's
# tasks, drafting 10 tokens every forward, kept 139 of 150 such drafted tokens, against 1 in 4 after
# a 2- or 3-token match. The two kinds keep their own record, so that copies draft long where chance
# matches stay short.
LONG_MATCH = 8
# What each draft position's acceptance is taken to be before anything is seen, by kind: as if
# from 4 drafts, 3 in 4 kept after a short match (SmolLM2: 0.73-0.78 at the first position), 9 in
# 10 after a long one. Seen drafts count less by DECAY a forward, so a run of rejections that
# stopped the drafting fades back to this guess and drafting is tried again.
PRIORS = {False: (3.0, 4.0), True: (3.6, 4.0)}
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
    SmolLM2 on 2 cores a row is ~0.2 of a decoded token's forward (two thirds of it attention
    over the context); a 3B model's weights stream from memory once for all rows."""

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


class DraftRecord:
    """How drafts of one kind fared, position by position: reached[k], the drafts that got to
    position k (k - 1 kept before it); accepted[k], those kept there."""

    def __init__(self, prior_accepted: float, prior_drafted: float):
        self.prior_accepted, self.prior_drafted = prior_accepted, prior_drafted
        self.reached = [0.0] * (MAX_DRAFT + 1)
        self.accepted = [0.0] * (MAX_DRAFT + 1)

    def fade(self) -> None:
        self.reached = [n * DECAY for n in self.reached]
        self.accepted = [n * DECAY for n in self.accepted]

    def record(self, drafted: int, accepted: int) -> None:
        for k in range(1, min(accepted + 1, drafted) + 1):
            self.reached[k] += 1
            self.accepted[k] += k <= accepted

    def acceptance(self, k: int) -> float:
        """The chance that draft position k is kept, given that those before it were."""
        return (self.accepted[k] + self.prior_accepted) / (self.reached[k] + self.prior_drafted)


class PromptLookup:
    """The context (prompt and generated tokens) and, for each n-gram in it (n = MIN_NGRAM to
    MAX_NGRAM), the position of the token after its latest occurrence; and how the drafts of
    this generation fared, by kind (a short or a long match)."""

    def __init__(self, tokens: list[int], stop_ids: set[int], max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM):
        self.tokens: list[int] = []
        self.stop_ids = stop_ids  # never drafted: plain decoding never feeds an end-of-sequence token
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.follows: dict[tuple[int, ...], int] = {}
        self.records = {long: DraftRecord(*prior) for long, prior in PRIORS.items()}
        self.fed = self.records[False]  # the kind of the last draft fed
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
        for record in self.records.values():
            record.fade()
        self.fed.record(drafted, accepted)

    def continuation(self, limit: int) -> tuple[list[int], int]:
        """Up to `limit` tokens that followed the longest suffix seen before (its latest
        occurrence), and over how many tokens (up to LONG_MATCH) the context agrees with it."""
        if limit <= 0:
            return [], 0
        for n in range(min(self.max_ngram, len(self.tokens)), self.min_ngram - 1, -1):
            start = self.follows.get(tuple(self.tokens[-n:]))
            if start is not None:
                return until_stop(copy_on(self.tokens, start, limit), self.stop_ids), agreement(self.tokens, start, n)
        return [], 0

    def acceptance(self, k: int, long: bool = False) -> float:
        return self.records[long].acceptance(k)

    def draft(self, limit: int, costs: ForwardCosts) -> list[int]:
        """The continuation, cut to the length with the most tokens expected per second."""
        tokens, agreed = self.continuation(min(limit, MAX_DRAFT))
        self.fed = self.records[agreed >= LONG_MATCH]
        return tokens[: draft_length(len(tokens), self.fed.acceptance, costs)]


def copy_on(tokens: list[int], start: int, limit: int) -> list[int]:
    """Up to `limit` tokens from tokens[start:]; where that runs into the context's end, the copy
    goes on copying itself (the context repeats with period len(tokens) - start: a loop, like
    lines), as an LZ77 match may overlap its own output."""
    out = tokens[start : start + limit]
    period = len(tokens) - start
    while len(out) < limit:
        out.append(out[-period])
    return out


def agreement(tokens: list[int], start: int, known: int) -> int:
    """How many tokens before `start` equal the context's last ones, counted up to LONG_MATCH
    (the first `known` are known to)."""
    n = known
    while n < LONG_MATCH and start - 1 - n >= 0 and tokens[start - 1 - n] == tokens[-1 - n]:
        n += 1
    return n


def draft_length(available: int, acceptance, costs: ForwardCosts) -> int:
    """How many of `available` drafted tokens to feed: the d that maximizes the tokens a forward
    is expected to give (1 + the chance that the first is kept + that the first two are ...)
    over what a forward of 1 + d rows costs. Before any forward is timed, FIRST_DRAFT.

    A row count not yet timed is taken to cost what the most timed do, and is tried at most
    doubling them: a wrong guess costs one forward of twice the rows known (on a 3B model, whose
    2 rows cost little more than 1, a first draft of 15 rejected cost 3% of a 128-token answer)."""
    if not costs.seconds:
        return min(available, FIRST_DRAFT)
    available = min(available, 2 * max(costs.seconds) - 1)
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


def lookup_draft(tokens: list[int], limit: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> tuple[list[int], int]:
    """PromptLookup.continuation by a scan of the whole context: the reference the index is tested against."""
    for n in range(min(max_ngram, len(tokens)), min_ngram - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - 1, n - 1, -1):  # the latest occurrence with a token after it
            if tokens[start - n : start] == suffix:
                out = [tokens[start + i] if start + i < len(tokens) else None for i in range(limit)]
                for i, token in enumerate(out):  # past the context's end: the copy's own tokens
                    if token is None:
                        out[i] = out[i - (len(tokens) - start)]
                agreed = max(m for m in range(n, min(LONG_MATCH, start) + 1) if tokens[start - m : start] == tokens[-m:])
                return out, agreed
    return [], 0
