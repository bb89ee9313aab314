"""app/server/prompts.py: a chat request's prompt text, compared with what transformers renders
for the same messages (continue_final_message, add_generation_prompt)."""

from types import SimpleNamespace

import pytest

from app.server.prompts import chat_prompt
from app.server.protocol import ApiError, parse_chat
from backends.chat_template import ChatTemplate, templates_dir
from test_chat_template import frozen_date  # noqa: F401  (a fixture: one date for both renderers)

SMOLLM2 = (templates_dir() / "smollm2.jinja").read_text()
SMOLLM3 = (templates_dir() / "smollm3.jinja").read_text()
ASK = {"role": "user", "content": "Name the capital of France."}


def prompt_text(source: str, body: dict):
    """The prompt chat_prompt builds, as text (a tokenizer that keeps the characters)."""
    engine = SimpleNamespace(chat_template=ChatTemplate(source), tokenizer=SimpleNamespace(encode=list))
    prompt = chat_prompt(engine, parse_chat(body))
    return "".join(prompt.ids), prompt


def transformers_text(source: str, messages: list[dict], **kwargs) -> str:
    templates = pytest.importorskip("transformers.utils.chat_template_utils")
    return templates.render_jinja_template([messages], chat_template=source, **kwargs)[0][0]


@pytest.mark.parametrize("source,messages", [
    (SMOLLM2, [ASK, {"role": "assistant", "content": "The capital of France is"}]),
    (SMOLLM2, [ASK, {"role": "assistant", "content": "The answer is "}]),  # the template keeps the space
    (SMOLLM2, [{"role": "system", "content": "Be brief."}, ASK, {"role": "assistant", "content": ""}]),
    (SMOLLM3, [{"role": "system", "content": "/no_think"}, ASK, {"role": "assistant", "content": "It is"}]),
    (SMOLLM3, [ASK, {"role": "assistant", "content": "Paris.\n"}, ASK, {"role": "assistant", "content": "Again:"}]),
])
def test_continued_prompt_is_what_transformers_renders(frozen_date, source, messages):  # noqa: F811
    text, prompt = prompt_text(source, {"messages": messages, "continue_final_message": True})
    assert text == transformers_text(source, messages, continue_final_message=True, add_generation_prompt=False)
    assert text.endswith(messages[-1]["content"]) and not prompt.thinking_first
    assert text.count("<|im_start|>assistant") == sum(m["role"] == "assistant" for m in messages)


def test_a_continued_think_block_is_still_open(frozen_date):  # noqa: F811
    messages = [ASK, {"role": "assistant", "content": "<think>\nFrance is in Europe"}]
    text, prompt = prompt_text(SMOLLM3, {"messages": messages, "continue_final_message": True})
    assert text == transformers_text(SMOLLM3, messages, continue_final_message=True, add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\n<think>\nFrance is in Europe") and prompt.thinking_first


def test_without_a_generation_prompt_the_last_turn_is_closed(frozen_date):  # noqa: F811
    messages = [ASK, {"role": "assistant", "content": "Paris."}]
    text, _ = prompt_text(SMOLLM2, {"messages": messages, "add_generation_prompt": False})
    assert text == transformers_text(SMOLLM2, messages, add_generation_prompt=False)
    assert text.endswith("Paris.<|im_end|>\n")
    opened, _ = prompt_text(SMOLLM2, {"messages": messages})
    assert opened == text + "<|im_start|>assistant\n"


def test_a_template_that_drops_the_message_cannot_continue_it():
    source = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content[:3] }}<|im_end|>\n{% endfor %}"
    with pytest.raises(ApiError) as e:
        prompt_text(source, {"messages": [ASK, {"role": "assistant", "content": "Paris is"}],
                             "continue_final_message": True})
    assert (e.value.status, e.value.param) == (400, "continue_final_message")
