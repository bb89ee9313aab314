import json
import os
from datetime import datetime

import gguf
import pytest

from backends import chat_template as chat_template_module
from backends.chat_template import ChatTemplate, chat_template_from_dir
from backends.errors import TemplateError
from conftest import SMOLLM3_META, TINY_HF

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local paths only: never reach the Hub

SMOLLM3_TEMPLATE = (SMOLLM3_META / "chat_template.jinja").read_text()

TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather for a city. Caractères: é, 東京",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    {"name": "add", "description": "Add two numbers", "parameters": {"type": "object", "properties": {}}},
]
USER = {"role": "user", "content": "What is 2+2?"}
MULTI_TURN = [
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "\nHello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "<think>\nA pun.\n</think>\nWhy did the scarecrow win? He was outstanding."},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "user", "content": "Another?"},
]

# (messages, render kwargs) pairs covering the SmolLM3 template's branches.
CASES = {
    "user only": ([USER], {}),
    "thinking on": ([USER], {"enable_thinking": True}),
    "thinking off": ([USER], {"enable_thinking": False}),
    "system": ([{"role": "system", "content": "You are terse."}, USER], {}),
    "system, thinking off": ([{"role": "system", "content": "You are terse."}, USER], {"enable_thinking": False}),
    "system /think": ([{"role": "system", "content": "Be terse. /think"}, USER], {"enable_thinking": False}),
    "system /no_think": ([{"role": "system", "content": "/no_think Be terse."}, USER], {"enable_thinking": True}),
    "system /no_think only": ([{"role": "system", "content": "/no_think"}, USER], {}),
    "system_override": ([{"role": "system", "content": "/system_override Just answer. /no_think"}, USER], {}),
    "multi-turn": (MULTI_TURN, {}),
    "multi-turn, thinking off": (MULTI_TURN, {"enable_thinking": False}),
    "multi-turn, no generation prompt": (MULTI_TURN[:4], {"add_generation_prompt": False}),
    "no generation prompt, thinking off": ([USER], {"add_generation_prompt": False, "enable_thinking": False}),
    "tools": ([USER], {"tools": TOOLS}),
    "xml_tools, thinking off": ([USER], {"xml_tools": TOOLS, "enable_thinking": False}),
    "python_tools and system": ([{"role": "system", "content": "Use tools."}, USER], {"python_tools": TOOLS}),
    "none content dropped": ([USER, {"role": "assistant", "content": None}], {}),
}


class _FrozenDatetime(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 7, 9, 23, 59, 59)


@pytest.fixture
def frozen_date(monkeypatch):
    """Both renderers read the date through strftime_now: freeze it so midnight cannot split them."""
    transformers_templates = pytest.importorskip("transformers.utils.chat_template_utils")
    monkeypatch.setattr(transformers_templates, "datetime", _FrozenDatetime)
    monkeypatch.setattr(chat_template_module, "datetime", _FrozenDatetime)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TINY_HF), local_files_only=True)


def _transformers_render(hf_tokenizer, template, messages, add_generation_prompt=True, **kwargs):
    return hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template, **kwargs
    )


@pytest.mark.parametrize("case", list(CASES))
def test_smollm3_template_matches_transformers(frozen_date, hf_tokenizer, case):
    messages, kwargs = CASES[case]
    template = ChatTemplate(SMOLLM3_TEMPLATE, bos_token=hf_tokenizer.bos_token, eos_token=hf_tokenizer.eos_token)
    ours = template.render(messages, **kwargs)
    assert ours == _transformers_render(hf_tokenizer, SMOLLM3_TEMPLATE, messages, **kwargs)
    if "/system_override" not in messages[0]["content"]:
        assert "Today Date: 09 July 2025\n" in ours


def test_smollm3_template_modes(frozen_date):
    template = ChatTemplate(SMOLLM3_TEMPLATE)
    thinking = template.render([USER])
    assert "Reasoning Mode: /think\n" in thinking
    assert thinking.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    no_think = template.render([USER], enable_thinking=False)
    assert "Reasoning Mode: /no_think\n" in no_think
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    override = template.render([{"role": "system", "content": "Only this. /system_override"}, USER])
    assert override.startswith("<|im_start|>system\nOnly this.<|im_end|>\n<|im_start|>user\n")


def test_gguf_smollm2_template(frozen_date, hf_tokenizer, smollm2_gguf):
    reader = gguf.GGUFReader(smollm2_gguf)
    source = reader.fields["tokenizer.chat_template"].contents()
    template = ChatTemplate(source, bos_token="<|im_start|>", eos_token="<|im_end|>")
    ours = template.render([USER])
    assert ours == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    for messages in ([USER], [{"role": "system", "content": "Be terse."}, USER], MULTI_TURN[:4]):
        for add in (True, False):
            expected = _transformers_render(hf_tokenizer, source, messages, add_generation_prompt=add)
            assert template.render(messages, add_generation_prompt=add) == expected


def test_tojson_reasoning_and_extras_match_transformers(hf_tokenizer):
    source = (
        "{% for m in messages %}{{ m | tojson }}|{{ m.reasoning_content }}|{{ m.thinking }}\n{% endfor %}"
        "{{ tools | tojson(indent=2) }}{{ bos_token }}{{ eos_token }}{{ custom }}{{ enable_thinking is defined }}"
        "{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"
        "{% generation %}[{{ add_generation_prompt }}]{% endgeneration %}"
        "{{ dict(a=1) | tojson }}{% set ns = namespace(n=1) %}{% set ns.n = ns.n + 1 %}{{ ns.n }}"
    )
    messages = [USER, {"role": "assistant", "content": "4 <b>&</b>", "reasoning": "2+2=4, ünïcode"}]
    template = ChatTemplate(source, bos_token=hf_tokenizer.bos_token, eos_token=hf_tokenizer.eos_token)
    ours = template.render(messages, tools=TOOLS, custom="x")
    assert ours == _transformers_render(hf_tokenizer, source, messages, tools=TOOLS, custom="x")
    assert '"2+2=4, ünïcode"' in ours and "<b>&</b>" in ours and "False" in ours


def test_raise_exception_is_a_template_error():
    template = ChatTemplate("line one\n{{ raise_exception('roles must alternate') }}", name="my template")
    with pytest.raises(TemplateError, match=r"my template, line 2: roles must alternate"):
        template.render([USER])


def test_syntax_error_names_the_line():
    with pytest.raises(TemplateError, match=r"broken, line 3"):
        ChatTemplate("{% for m in messages %}\n{{ m.content }}\n{% endfor %\n", name="broken")


def test_render_error_names_the_line():
    template = ChatTemplate("{{ messages[0].content }}\n\n{{ 1 // 0 }}", name="t")
    with pytest.raises(TemplateError, match=r"t, line 3: ZeroDivisionError"):
        template.render([USER])


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
        "{{ joiner.__init__.__globals__.__builtins__['__import__']('os').system('touch {marker}') }}",
        "{{ self.__init__.__globals__.__builtins__ }}",
        "{{ messages.append({'role': 'user'}) }}",
        "{% set ns = namespace(_secret=1) %}",
        "{{ raise_exception.__globals__['os'].system('touch {marker}') }}",
    ],
)
def test_sandbox_blocks_escapes(tmp_path, source):
    marker = tmp_path / "pwned"
    template = ChatTemplate(source.replace("{marker}", str(marker)))
    with pytest.raises(TemplateError):
        template.render([USER])
    assert not marker.exists()


def test_chat_template_from_dir():
    template = chat_template_from_dir(TINY_HF)
    assert template is not None
    assert template.source == SMOLLM3_TEMPLATE
    assert (template.bos_token, template.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_chat_template_from_tokenizer_config(tmp_path):
    assert chat_template_from_dir(tmp_path) is None
    config = {
        "bos_token": None,
        "eos_token": {"content": "<|im_end|>"},
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ eos_token }}{{ messages[0].content }}"},
        ],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = chat_template_from_dir(tmp_path)
    assert template.render([USER]) == "<|im_end|>What is 2+2?"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "plain"}))
    assert chat_template_from_dir(tmp_path).render([USER]) == "plain"
