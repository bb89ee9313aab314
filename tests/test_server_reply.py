"""app/server/toolcalls.py, reply.py and protocol.py: tool-call parsing on template-shaped replies,
reasoning apart from the answer, stop strings, request checks. No engine, no HTTP."""

import json

import pytest

from app.server.protocol import ApiError, parse_chat, parse_json_body
from app.server.reply import ReplyText, StopFilter
from app.server.toolcalls import ToolCallParser, parse_tool_call

# Replies in the shape SmolLM3's template asks for (`<tool_call>\n{json}\n</tool_call>`, after the
# model card's xml_tools example), written by hand: no 3B output was captured here. The parser
# must read them the same in any chunking.
RECORDED = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Copenhagen"}}\n</tool_call>',
     [("get_weather", {"city": "Copenhagen"})], ""),
    ('I will check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
     [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris"})], "I will check both.\n\n"),
    ('<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}\n</tool_call>',
     [("get_weather", {"city": "Oslo"})], ""),
    # unclosed at the end of the reply, JSON complete: still a call
    ('<tool_call>\n{"name": "get_time", "arguments": {}}\n', [("get_time", {})], ""),
]
BROKEN = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"</tool_call>',  # JSON cut short
    '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',  # not an offered tool
    '<tool_call>\n["get_weather"]\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": [1, 2]}\n</tool_call>',
    "<tool_call>\n" + "[" * 5000 + "\n</tool_call>",
]
TOOLS = {"get_weather", "get_time"}


def run_parser(text: str, chunk: int):
    parser = ToolCallParser(TOOLS)
    events = []
    for i in range(0, len(text), chunk):
        events += parser.feed(text[i : i + chunk])
    events += parser.flush()
    content = "".join(v for k, v in events if k == "content")
    calls = [(v.name, json.loads(v.arguments)) for k, v in events if k == "tool_call"]
    return content, calls


@pytest.mark.parametrize("text,calls,content", RECORDED)
@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_recorded_tool_calls_parse_in_any_chunking(text, calls, content, chunk):
    assert run_parser(text, chunk) == (content, calls)


@pytest.mark.parametrize("text", BROKEN)
def test_a_call_that_does_not_parse_comes_back_as_its_text(text):
    assert run_parser(text, 4) == (text, [])


def test_call_ids_are_unique_and_arguments_json_text():
    a = parse_tool_call('{"name": "f", "arguments": {"x": "é"}}')
    b = parse_tool_call('{"name": "f", "arguments": {"x": "é"}}')
    assert a.id != b.id and a.id.startswith("call_")
    assert a.arguments == '{"x": "é"}'
    assert a.as_openai(0) == {"index": 0, "id": a.id, "type": "function",
                              "function": {"name": "f", "arguments": '{"x": "é"}'}}


def feed_all(reply: ReplyText, text: str, chunk: int = 2):
    events = []
    for i in range(0, len(text), chunk):
        events += reply.feed(text[i : i + chunk])
    events += reply.flush()
    joined = {}
    for kind, value in events:
        joined.setdefault(kind, []).append(value)
    return {k: v if k == "tool_call" else "".join(v) for k, v in joined.items()}


def test_reasoning_streams_apart_without_tags_or_padding():
    out = feed_all(ReplyText(), "<think>\nThe user greets me.\nI greet back.\n</think>\nHello there!")
    assert out == {"reasoning": "The user greets me.\nI greet back.", "content": "Hello there!"}


def test_reasoning_when_the_prompt_opened_the_block():
    out = feed_all(ReplyText(thinking_first=True), "Short.\n</think>\n\nAnswer")
    assert out == {"reasoning": "Short.", "content": "Answer"}


def test_raw_completion_text_is_untouched():
    text = "\n<think>x</think>\n y"
    assert feed_all(ReplyText(split_thinking=False), text) == {"content": text}


def test_stop_strings_cut_the_answer_not_the_reasoning():
    reply = ReplyText(stop=["STOP", "\n\n"])
    out = feed_all(reply, "<think>\nno STOP here\n</think>\nOne two STOP three", chunk=3)
    assert out == {"reasoning": "no STOP here", "content": "One two "}
    assert reply.stopped


def test_stop_filter_holds_back_a_partial_match_and_releases_it():
    f = StopFilter(["abc"])
    assert f.feed("xxab") == "xx"
    assert f.feed("d") == "abd"
    assert f.feed("ab") == "" and f.flush() == "ab"


def test_tool_calls_after_reasoning():
    reply = ReplyText(tool_names=TOOLS)
    out = feed_all(reply, '<think>\nNeed weather.\n</think>\n<tool_call>\n{"name": "get_weather", '
                          '"arguments": {"city": "Rome"}}\n</tool_call>', chunk=5)
    assert out["reasoning"] == "Need weather."
    assert [(c.name, json.loads(c.arguments)) for c in out["tool_call"]] == [("get_weather", {"city": "Rome"})]
    assert "content" not in out and reply.tool_calls == 1


# --- protocol ---

def bad(body) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse_chat(body)
    assert e.value.status == 400
    return e.value


def chat(**fields):
    return {"messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize("fields,param", [
    ({"n": 2}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 10**400}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["x"] * 10_000}, "stop"),
    ({"stop": [""]}, "stop[0]"),
    ({"tool_choice": "maybe"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"seed": 2**70}, "seed"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"messages": []}, "messages"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs.enable_thinking"),
    ({"thinking_budget": -5}, "thinking_budget"),
    ({"continue_final_message": True}, "continue_final_message"),  # the last message is the user's
    ({"continue_final_message": "yes"}, "continue_final_message"),
    ({"chat_template_kwargs": {"add_generation_prompt": 1}}, "chat_template_kwargs.add_generation_prompt"),
])
def test_bad_fields_are_400s_naming_the_field(fields, param):
    assert bad(chat(**fields)).param == param


def test_thinking_switches():
    assert parse_chat(chat(reasoning_effort="none")).enable_thinking is False
    assert parse_chat(chat(chat_template_kwargs={"enable_thinking": False})).enable_thinking is False
    assert parse_chat(chat()).enable_thinking is None
    assert parse_chat(chat(max_completion_tokens=7, max_tokens=3)).max_tokens == 7


PARTIAL = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello, I"}]


@pytest.mark.parametrize("fields", [
    {"continue_final_message": True},  # SGLang's clients send it alone
    {"continue_final_message": True, "add_generation_prompt": False},  # vLLM's
    {"chat_template_kwargs": {"continue_final_message": True, "add_generation_prompt": False}},
    {"continue_final_message": False, "chat_template_kwargs": {"continue_final_message": True}},
])
def test_continue_final_message(fields):
    request = parse_chat(chat(messages=PARTIAL, **fields))
    assert (request.continue_final_message, request.add_generation_prompt) == (True, False)
    assert "continue_final_message" not in request.template_kwargs


def test_continue_final_message_refusals():
    assert "add_generation_prompt" in bad(chat(messages=PARTIAL, continue_final_message=True,
                                               add_generation_prompt=True)).message
    assert bad(chat(continue_final_message=True)).message.endswith("the last message is the user's")
    forced = chat(messages=PARTIAL, continue_final_message=True, tool_choice="required",
                  tools=[{"type": "function", "function": {"name": "f"}}])
    assert bad(forced).param == "tool_choice"
    plain = parse_chat(chat(messages=PARTIAL))
    assert (plain.continue_final_message, plain.add_generation_prompt) == (False, True)
    assert parse_chat(chat(add_generation_prompt=False)).add_generation_prompt is False


@pytest.mark.parametrize("raw", [b"{", b"[1]", b'{"a": NaN}', b"\xff\xfe{}", b"[" * 100_000, b"1" * 5000])
def test_malformed_bodies(raw):
    with pytest.raises(ApiError) as e:
        parse_json_body(raw)
    assert e.value.status == 400 and e.value.body()["error"]["code"] == "invalid_json"
