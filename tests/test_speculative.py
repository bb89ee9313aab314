"""Prompt-lookup speculation (backends/speculative.py, the loop in backends/engine.py): the n-gram
index against a plain scan, and generation with speculation token for token equal to plain
decoding on the real SmolLM2 GGUF, the tiny fixture and MLX, with the KV cache left as plain
decoding leaves it."""

import dataclasses
import random

import numpy as np
import pytest

import backends
from backends import speculative
from backends.sampling import GREEDY, SamplingParams
from conftest import tiny_gguf

PASTED = (
    "The harbor town of Veldmar sits where the river Ost meets the cold northern sea. Its fishermen "
    "leave before dawn and return at noon, and the market on the quay sells their catch until the "
    "bells ring at four. In winter the harbor freezes for six weeks, and the town lives on salted "
    "herring, rye bread and the stories of the old lighthouse keeper, who has seen forty winters there."
)
CODE = '''def parse_size(text: str) -> int:
    """Bytes in a size such as 10k, 4M or 2G."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    text = text.strip().lower()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)
'''
TASKS = [
    "Repeat this text exactly:\n\n" + PASTED,
    "Rename parse_size to size_in_bytes in this code and give back the whole code:\n\n" + CODE,
    PASTED + "\n\nHow long does the harbor of Veldmar freeze in winter?",
]


def chat_ids(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(engine.chat_template.render([{"role": "user", "content": text}], add_generation_prompt=True))


def run(engine, monkeypatch, setting: str, prompt_ids, n: int, sampling=GREEDY) -> tuple[list[int], backends.GenerationStats]:
    monkeypatch.setenv("SMOLLM3_SPECULATE", setting)
    engine.cached_ids = []  # a fresh prefill: both runs start from the same logits
    out = list(engine.generate(prompt_ids, n, sampling))
    return out, engine.stats


def next_logits(engine) -> np.ndarray:
    """Logits of one more token after what the cache holds: reads every cached position."""
    return engine.to_numpy(engine.forward([17], len(engine.cached_ids), last_only=True))


def assert_same_as_plain(engine, monkeypatch, prompt_ids, n: int, sampling=GREEDY) -> backends.GenerationStats:
    plain, plain_stats = run(engine, monkeypatch, "0", prompt_ids, n, sampling)
    plain_cache, plain_next = list(engine.cached_ids), next_logits(engine)
    out, stats = run(engine, monkeypatch, "auto", prompt_ids, n, sampling)
    assert out == plain
    assert engine.cached_ids == plain_cache
    assert np.array_equal(next_logits(engine), plain_next)  # rejected drafts left nothing behind
    assert stats.generated_tokens == plain_stats.generated_tokens and stats.stop_reason == plain_stats.stop_reason
    assert stats.decode_steps + stats.accepted_tokens == plain_stats.decode_steps
    return stats


# --- the n-gram index ---


def test_index_drafts_as_a_scan_of_the_context():
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.randrange(6) for _ in range(rng.randrange(1, 40))]
        lookup = speculative.PromptLookup(tokens[:5], set())
        lookup.extend(tokens[5:])
        for limit in (1, 3, 10):
            assert lookup.continuation(limit) == speculative.lookup_draft(tokens, limit)


def test_longest_suffix_wins_and_its_latest_occurrence():
    #          0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 9, 5, 2, 3, 8, 7, 1, 2, 3]
    lookup = speculative.PromptLookup(tokens, set())
    # "1 2 3" occurred at 0-2 (followed by 9); "2 3" later at 5-6 (followed by 8): the longer match wins
    assert lookup.continuation(3) == ([9, 5, 2], 3)
    assert speculative.lookup_draft([4, 2, 3, 8, 5, 2, 3, 6, 2, 3], 2) == ([6, 2], 2)


def test_a_copy_into_the_context_end_goes_on_copying_itself():
    # "1 2" last occurred two tokens back: the loop goes on
    assert speculative.PromptLookup([5, 1, 2, 1, 2], set()).continuation(5) == ([1, 2, 1, 2, 1], 2)
    assert speculative.PromptLookup([4, 7, 7, 7], set()).continuation(3) == ([7, 7, 7], 2)


def test_agreement_counts_the_match_back_to_long_match():
    span = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    lookup = speculative.PromptLookup([1, *span, 2, 3, *span[:9]], set())
    assert lookup.continuation(2) == ([19, 2], speculative.LONG_MATCH)
    lookup = speculative.PromptLookup([1, *span, 2, 3, 4, *span[7:9]], set())
    assert lookup.continuation(2) == ([19, 2], 2)


def test_no_draft_without_a_match_of_two_tokens():
    assert speculative.PromptLookup([1, 2, 3, 4, 5, 1], set()).continuation(5) == ([], 0)  # only "1" repeats
    assert speculative.PromptLookup([7], set()).continuation(5) == ([], 0)


def test_drafts_stop_before_an_end_of_sequence_token():
    lookup = speculative.PromptLookup([5, 6, 7, 2, 8, 5, 6], {2})
    assert lookup.continuation(4)[0] == [7]


def costs_of(seconds: dict[int, float]) -> speculative.ForwardCosts:
    costs = speculative.ForwardCosts()
    for rows, s in seconds.items():
        costs.record(rows, s)
    return costs


def test_draft_length_weighs_expected_tokens_against_what_rows_cost():
    likely, unlikely = (lambda k: 0.9), (lambda k: 0.2)
    nearly_free = costs_of({r: 1.0 + 0.02 * r for r in range(1, 12)})  # weights streamed once for all rows
    each_a_forward = costs_of({r: float(r) for r in range(1, 12)})  # every row as dear as a token
    tiles = costs_of({1: 1.0, 2: 1.45, 3: 1.9, 4: 2.4, 5: 2.7, 6: 3.2, 7: 3.5, 8: 2.9, 9: 3.0, 10: 3.1, 11: 3.3})
    assert speculative.draft_length(10, likely, nearly_free) == 10
    assert speculative.draft_length(10, unlikely, nearly_free) == 2  # 1.24 tokens for 1.06 beats 1.2 for 1.04 and 1.248 for 1.08
    assert speculative.draft_length(10, likely, each_a_forward) == 0
    # 8 rows and up take the AMX tiles: 6.51 tokens expected from 9 drafted for 3.1, the best rate
    assert speculative.draft_length(10, likely, tiles) == 9
    assert speculative.draft_length(6, likely, tiles) == 4  # 4.10 for 2.7 beats 4.69 for 3.2
    assert speculative.draft_length(10, unlikely, tiles) == 0
    assert speculative.draft_length(3, likely, speculative.ForwardCosts()) == 3  # nothing timed yet
    assert speculative.draft_length(9, likely, speculative.ForwardCosts()) == speculative.FIRST_DRAFT


def test_untimed_row_counts_are_tried_at_most_doubling():
    certain = lambda k: 1.0
    assert speculative.draft_length(15, certain, costs_of({1: 1.0})) == 1  # 2 rows
    assert speculative.draft_length(15, certain, costs_of({1: 1.0, 2: 1.0})) == 3  # 4 rows
    assert speculative.draft_length(15, certain, costs_of({1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0})) == 15


def test_forward_costs_follow_a_lower_time_at_once_and_a_higher_one_slowly():
    costs = costs_of({1: 10.0})
    costs.record(1, 8.0)
    assert costs.estimate(1) == 8.0
    costs.record(1, 18.0)
    assert costs.estimate(1) == pytest.approx(9.0)
    costs.record(4, 20.0)
    assert costs.estimate(3) == pytest.approx(9.0) and costs.estimate(6) == 20.0  # untimed: the most below
    assert costs_of({4: 5.0}).estimate(2) is None


def test_acceptance_learns_each_draft_position_and_forgets_slowly():
    lookup = speculative.PromptLookup([1, 2, 3], set())
    accepted, drafted = speculative.PRIORS[False]
    prior = accepted / drafted
    assert lookup.acceptance(1) == lookup.acceptance(5) == prior
    for _ in range(10):
        lookup.verified(4, 1)  # the first of four kept, the second not: nothing learned about 3 and 4
    assert lookup.acceptance(1) > 0.9 and lookup.acceptance(2) < 0.3 and lookup.acceptance(3) == prior
    low = lookup.acceptance(2)
    for _ in range(30):
        lookup.verified(0, 0)  # forwards without a draft
    assert low < lookup.acceptance(2) < prior and prior - lookup.acceptance(2) < 0.1


def test_rejected_drafts_stop_drafting_where_rows_are_dear_and_it_resumes_later():
    tiles = costs_of({1: 1.0, 2: 1.45, 3: 1.9, 4: 2.4, 5: 2.7, 6: 3.2, 7: 3.5, 8: 2.9, 9: 3.0, 10: 3.1, 11: 3.3})
    lookup = speculative.PromptLookup([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 1, 2], set())
    assert len(lookup.draft(10, tiles)) >= 7  # the tiles' rows, at the prior's 3 in 4
    for _ in range(5):
        lookup.verified(10, 0)
    assert lookup.draft(10, tiles) == []
    waited = 0
    while not lookup.draft(10, tiles) and waited < 100:
        lookup.verified(0, 0)
        waited += 1
    assert 2 < waited < 20


def test_long_matches_keep_their_own_record_and_draft_longer():
    short_then_long = costs_of({1: 1.0, 2: 1.45, 3: 1.9, 4: 2.4, 5: 2.7, 6: 3.2, 7: 3.5, 8: 3.6, 9: 3.7, 10: 3.8, 11: 3.9})
    span = list(range(10, 30))
    short = speculative.PromptLookup([1, *span, 2, 3, 10, 11], set())
    long = speculative.PromptLookup([1, *span, 2, 3, *span[:9]], set())
    assert len(short.draft(10, short_then_long)) < len(long.draft(10, short_then_long)) == 10
    for _ in range(5):
        long.verified(10, 10)
    assert long.acceptance(5, long=True) > 0.95 and long.acceptance(5) == short.acceptance(5)
    long.draft(10, short_then_long)  # a long match again: its rejections count against long matches only
    for _ in range(10):
        long.verified(10, 0)
    assert long.acceptance(1, long=True) < 0.5 < short.acceptance(1) == long.acceptance(1)


def test_setting(monkeypatch):
    monkeypatch.delenv("SMOLLM3_SPECULATE", raising=False)
    assert speculative.enabled(True) and not speculative.enabled(False)
    monkeypatch.setenv("SMOLLM3_SPECULATE", "0")
    assert not speculative.enabled(True)
    monkeypatch.setenv("SMOLLM3_SPECULATE", "1")
    assert speculative.enabled(False)


# --- generation: torch ---


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return backends.load(smollm2_gguf, backend="torch")


def test_batch_rows_are_decoded_rows_bitwise(smollm2):
    """What makes speculation exact on the torch CPU backend: each row of a 12-row forward has
    the logits that row gets when decoded alone."""
    assert smollm2.rows_exact
    prompt, rows = chat_ids(smollm2, PASTED)[:40], chat_ids(smollm2, PASTED)[40:52]
    smollm2.cached_ids = []
    smollm2.forward(prompt, 0, last_only=True)
    batch = smollm2.to_numpy(smollm2.forward(rows, len(prompt), last_only=False))
    alone = [smollm2.to_numpy(smollm2.forward([t], len(prompt) + i, last_only=True))[0] for i, t in enumerate(rows)]
    assert np.array_equal(batch, np.stack(alone))


def test_greedy_output_equals_plain_decoding_on_smollm2(smollm2, monkeypatch):
    accepted = 0
    for text in TASKS:
        stats = assert_same_as_plain(smollm2, monkeypatch, chat_ids(smollm2, text), 32)
        accepted += stats.accepted_tokens
    assert accepted > 20  # the pasted texts are copied: drafts were verified and kept


def test_seeded_sampling_equals_plain_decoding(smollm2, monkeypatch):
    params = SamplingParams(temperature=0.7, top_p=0.95, top_k=40, seed=3)
    stats = assert_same_as_plain(smollm2, monkeypatch, chat_ids(smollm2, TASKS[0]), 24, params)
    assert stats.accepted_tokens > 0


def test_stops_at_the_context_as_plain_decoding(smollm2, monkeypatch):
    prompt_ids = chat_ids(smollm2, TASKS[0])
    monkeypatch.setattr(smollm2, "config", dataclasses.replace(smollm2.config, context_length=len(prompt_ids) + 12))
    stats = assert_same_as_plain(smollm2, monkeypatch, prompt_ids, 40)
    assert stats.stop_reason == "context"


class OracleDrafts:
    """Drafts from the plain output itself with every third token wrong: verification must keep
    the right ones and replace the first wrong one in each draft by the model's token."""

    def __init__(self, prompt_len: int, plain: list[int], vocab: int):
        self.prompt_len, self.plain, self.vocab = prompt_len, plain, vocab
        self.wrong_offered = 0

    def draft(self, lookup: speculative.PromptLookup, limit: int, costs) -> list[int]:
        done = len(lookup.tokens) - self.prompt_len
        out = self.plain[done : done + min(limit, 6)]
        for i in range(2, len(out), 3):
            out[i] = (out[i] + 1) % self.vocab
            self.wrong_offered += 1
        return out


def check_wrong_drafts_are_rejected(engine, monkeypatch, prompt_ids, n: int) -> None:
    plain, _ = run(engine, monkeypatch, "0", prompt_ids, n)
    oracle = OracleDrafts(len(prompt_ids), plain, engine.config.vocab_size)
    monkeypatch.setattr(speculative.PromptLookup, "draft", lambda self, limit, costs: oracle.draft(self, limit, costs))
    out, stats = run(engine, monkeypatch, "1", prompt_ids, n)
    assert out == plain
    assert oracle.wrong_offered > 5 and 0 < stats.accepted_tokens < stats.drafted_tokens


def test_wrong_drafts_are_rejected_on_smollm2(smollm2, monkeypatch):
    check_wrong_drafts_are_rejected(smollm2, monkeypatch, chat_ids(smollm2, "Name three rivers in Europe."), 20)


def test_tiny_fixture_greedy_and_wrong_drafts(monkeypatch):
    engine = backends.load(tiny_gguf("Q4_K_M"), backend="torch")
    assert engine.rows_exact
    prompt_ids = [5, 6, 7, 8, 9, 10, 11, 12] * 6
    assert_same_as_plain(engine, monkeypatch, prompt_ids, 40)
    check_wrong_drafts_are_rejected(engine, monkeypatch, prompt_ids, 40)


def test_off_where_rows_are_not_exact(monkeypatch):
    """Float weights go through BLAS, which rounds a batch's rows differently from one row."""
    engine = backends.load(tiny_gguf("F16"), backend="torch")
    assert not engine.rows_exact
    monkeypatch.delenv("SMOLLM3_SPECULATE", raising=False)
    list(engine.generate([5, 6, 7, 8] * 8, 12, GREEDY))
    assert engine.stats.drafted_tokens == 0


# --- generation: MLX (on the CPU here) ---


def test_mlx_greedy_equals_plain_decoding_and_rejects_wrong_drafts(smollm2_gguf, monkeypatch):
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    engine = backends.load(smollm2_gguf, backend="mlx")
    assert engine.rows_exact
    stats = assert_same_as_plain(engine, monkeypatch, chat_ids(engine, TASKS[0]), 24)
    assert stats.accepted_tokens > 5
    check_wrong_drafts_are_rejected(engine, monkeypatch, chat_ids(engine, "Name three rivers in Europe."), 20)
