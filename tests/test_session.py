"""ChatSession: prompts per thinking mode, streaming turns, stopping and continuing, KV reuse
across turns, dropping turns; ThinkingSplitter and the thinking helpers."""

import pytest

import backends
from app.session import ChatMessage, ChatSession, ThinkingSplitter, has_open_think, split_thinking
from backends import SamplingParams
from backends.errors import ContextOverflow
from backends.sampling import GREEDY
from conftest import tiny_gguf

SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def engine():
    return backends.load(tiny_gguf("F16"))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def mode_position(engine, prompt: str) -> int:
    """Tokens before the reasoning mode in the system block."""
    return len(engine.tokenizer.encode(prompt[: prompt.index("Reasoning Mode: /") + len("Reasoning Mode: /")]))


def test_reply_streams_text_and_adds_both_turns(engine):
    session = ChatSession(engine)
    pieces = list(session.reply("Hello", 8, GREEDY))
    assert session.messages == [
        ChatMessage("user", "Hello"),
        ChatMessage("assistant", "".join(pieces), status="length"),
    ]
    assert engine.stats.generated_tokens == 8 and session.last_stop_reason == "length"


def test_thinking_mode_is_in_the_prompt_from_its_first_tokens(engine):
    session = ChatSession(engine, thinking=True, messages=[ChatMessage("user", "Hi")])
    think = session.render()
    session.thinking = False
    no_think = session.render()
    assert "Reasoning Mode: /think" in think and think.endswith("<|im_start|>assistant\n")
    assert "Reasoning Mode: /no_think" in no_think and no_think.endswith("<think>\n\n</think>\n")
    ids_think, ids_no = engine.tokenizer.encode(think), engine.tokenizer.encode(no_think)
    # The mode sits in the system block's metadata: the prompts part there, near the start.
    assert common_prefix(ids_think, ids_no) <= mode_position(engine, think) < 80


def test_no_think_prompt_drops_earlier_reasoning_think_prompt_keeps_it(engine):
    answer = "<think>\nweigh it\n</think>\n42"
    session = ChatSession(
        engine, thinking=True, messages=[ChatMessage("user", "Q?"), ChatMessage("assistant", answer, id=3)]
    )
    assert "<|im_start|>assistant\n<think>\nweigh it\n</think>\n42<|im_end|>" in session.render()
    session.thinking = False
    text = session.render()
    assert "weigh it" not in text and "<|im_start|>assistant\n<think>\n\n</think>\n42<|im_end|>" in text


def test_second_turn_prefills_only_the_new_tokens_and_matches_a_fresh_engine(engine):
    session = ChatSession(engine, thinking=False)
    first = list(session.reply("Tell me about cats.", 12, SEEDED))
    ids1 = engine.stats.prompt_tokens
    cached = list(engine.cached_ids)  # the first prompt and the tokens generated after it
    assert len(cached) >= ids1 + 11 and "".join(first)

    session.messages.append(ChatMessage("user", "And dogs?"))
    ids2 = session.prompt_ids()
    tokens2 = list(engine.generate(ids2, 12, SEEDED))
    stats = engine.stats

    reused = common_prefix(cached, ids2)
    assert stats.prompt_tokens == len(ids2)
    assert stats.prefilled_tokens == len(ids2) - reused  # exactly the part the cache did not hold
    # The whole first prompt came from the cache. (A random model's text need not tokenize back to
    # the tokens it was generated as, so part of the first answer may be prefilled again: the
    # SmolLM2 test below checks the exact count.)
    assert stats.prefilled_tokens < len(ids2) - ids1

    fresh = backends.load(tiny_gguf("F16"))
    assert list(fresh.generate(ids2, 12, SEEDED)) == tokens2
    assert fresh.stats.prefilled_tokens == len(ids2)


def test_second_turn_on_smollm2_prefills_exactly_the_new_turn(smollm2_gguf):
    engine = backends.load(smollm2_gguf)
    session = ChatSession(engine)
    assert "Paris" in "".join(session.reply("What is the capital of France?", 12, GREEDY))
    first = engine.stats
    assert first.stop_reason == "eos" and first.prefilled_tokens == first.prompt_tokens

    session.messages.append(ChatMessage("user", "And of Italy?"))
    ids2 = session.prompt_ids()
    tokens2 = list(engine.generate(ids2, 4, SEEDED))
    second = engine.stats
    new_turn = "<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"
    # Cached: the first prompt and every generated token (the EOS is sampled, never fed).
    assert second.prefilled_tokens == len(ids2) - first.prompt_tokens - first.generated_tokens
    assert second.prefilled_tokens == len(engine.tokenizer.encode(new_turn)) < second.prompt_tokens

    fresh = backends.load(smollm2_gguf)
    assert list(fresh.generate(ids2, 4, SEEDED)) == tokens2
    assert fresh.stats.prefilled_tokens == len(ids2)


def test_toggling_thinking_costs_a_fresh_prefill(engine):
    session = ChatSession(engine, thinking=False)
    list(session.reply("Hi", 4, GREEDY))
    session.thinking = True
    session.messages.append(ChatMessage("user", "Again"))
    list(session.generate(4, GREEDY))
    # Only the tokens before the reasoning mode in the metadata can be reused.
    assert engine.stats.prefilled_tokens >= engine.stats.prompt_tokens - mode_position(engine, session.render())


def test_stop_then_continue_extends_the_same_message(engine):
    session = ChatSession(engine, thinking=False)
    seen = []
    stream = session.reply("Count", 12, GREEDY, should_stop=lambda: len(seen) >= 4)
    for text in stream:
        seen.append(text)
    assert session.last_stop_reason == "stopped" and engine.stats.stop_reason == "stopped"
    partial = session.messages[-1].content
    assert partial == "".join(seen) and partial
    first_prompt = engine.stats.prompt_tokens
    more = "".join(session.continue_reply(3, GREEDY))
    assert session.messages[-1].content == partial + more and len(session.messages) == 2
    # The continuation's prompt is the turn so far: the cache holds the prompt and (but for
    # tokenization differences of a random model's text) the answer so far.
    assert engine.stats.prefilled_tokens <= engine.stats.prompt_tokens - first_prompt

    uninterrupted = ChatSession(engine, thinking=False)
    whole = "".join(uninterrupted.reply("Count", 12, GREEDY))
    assert whole.startswith(partial)


def test_closing_the_stream_early_keeps_the_text(engine):
    session = ChatSession(engine)
    stream = session.reply("Hello", 20, GREEDY)
    got = next(stream) + next(stream)
    stream.close()
    assert session.messages[-1].content.startswith(got)
    assert session.last_stop_reason == "stopped"


def test_continue_without_thinking_closes_an_open_thought(engine):
    session = ChatSession(engine, thinking=False)
    session.messages = [ChatMessage("user", "Q"), ChatMessage("assistant", "<think>\nhmm")]
    text = "".join(session.continue_reply(3, GREEDY))
    content = session.messages[-1].content
    assert content.startswith("<think>\nhmm\n</think>\n") and content.endswith(text)
    assert split_thinking(content) == ("\nhmm\n", "\n" + text)


def test_prompt_too_long_leaves_no_empty_turn(engine):
    import dataclasses

    small = backends.load(tiny_gguf("F16"))
    small.config = dataclasses.replace(small.config, context_length=64)
    session = ChatSession(small)
    with pytest.raises(ContextOverflow):
        list(session.reply("Hello", 4, GREEDY))
    assert [m.role for m in session.messages] == ["user"]
    assert session.last_stop_reason == "error"


def test_drop_oldest_turn_keeps_the_last_user_message(engine):
    msgs = [
        ChatMessage("user", "a"),
        ChatMessage("assistant", "b"),
        ChatMessage("user", "c"),
        ChatMessage("assistant", "d"),
        ChatMessage("user", "e"),
    ]
    session = ChatSession(engine, messages=list(msgs))
    assert session.drop_oldest_turn() == msgs[:2]
    assert session.drop_oldest_turn() == msgs[2:4]
    assert session.drop_oldest_turn() == [] and session.messages == msgs[4:]
    assert [m.in_context for m in msgs] == [False, False, False, False, True]


def test_context_tokens_and_raw_mode(engine):
    session = ChatSession(engine, use_template=False)
    assert session.context_tokens() == 0
    session.messages = [ChatMessage("user", "one two")]
    assert session.render() == "one two" and session.context_tokens() == len(engine.tokenizer.encode("one two"))
    assert not session.supports_thinking and ChatSession(engine).supports_thinking


def test_thinking_splitter_holds_back_split_tags():
    s = ThinkingSplitter()
    out = s.feed("<thi") + s.feed("nk>abc</th") + s.feed("ink>\nanswer") + s.flush()
    assert out == [("think", "abc"), ("answer", "\nanswer")]
    assert split_thinking("plain") == ("", "plain")
    assert has_open_think("<think>x") and not has_open_think("<think>x</think>y") and not has_open_think("y")
