import contextlib
import io
import json
import os
import re
from datetime import datetime
from pathlib import Path

import gguf
import pytest

from backends import chat_template as chat_template_module
from backends import load_chat_template, load_tokenizer
from backends.chat_template import ChatTemplate, chat_template_from_dir, official_chat_template, templates_dir
from backends.checkpoint import open_checkpoint
from backends.errors import TemplateError
from conftest import SMOLLM3_META, TINY_HF, tiny_gguf

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


# --- the official templates, for checkpoints that carry none ---


def gguf_with_template(source: Path, target: Path, template: str | None) -> Path:
    """A copy of a GGUF with its chat template replaced, or removed (None), written by gguf's
    writer as its gguf_new_metadata script does."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch=reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name in ("general.architecture", "tokenizer.chat_template") or field.name.startswith("GGUF."):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    if template is not None:
        writer.add_chat_template(template)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return target


def test_official_templates_are_the_published_ones(smollm2_gguf):
    assert (templates_dir() / "smollm3.jinja").read_bytes() == (SMOLLM3_META / "chat_template.jinja").read_bytes()
    published = gguf.GGUFReader(smollm2_gguf).fields["tokenizer.chat_template"].contents()
    assert (templates_dir() / "smollm2.jinja").read_text(encoding="utf-8") == published
    assert official_chat_template("llama").source == published
    assert official_chat_template("qwen2") is None


@pytest.mark.parametrize("model", ["tiny SmolLM3", "SmolLM2-135M"])
def test_gguf_without_template_renders_as_the_original(frozen_date, tmp_path, smollm2_gguf, model):
    original = tiny_gguf("Q8_0") if model == "tiny SmolLM3" else smollm2_gguf
    stripped = gguf_with_template(original, tmp_path / "no-template.gguf", None)
    assert "tokenizer.chat_template" not in gguf.GGUFReader(stripped).fields
    templates, tokenizers = [], []
    for path in (original, stripped):
        ckpt = open_checkpoint(path)
        tokenizers.append(load_tokenizer(ckpt))
        templates.append(load_chat_template(ckpt, tokenizers[-1]))
    assert templates[0].notice == ""
    assert templates[1].notice.startswith("no-template.gguf has no chat template: using SmolLM")
    rendered = 0
    for name, (messages, kwargs) in CASES.items():
        try:
            prompt = templates[0].render(messages, **kwargs)
        except TemplateError as exc:  # SmolLM2's template needs every message's content
            with pytest.raises(TemplateError, match=re.escape(str(exc).split(": ", 1)[1])):
                templates[1].render(messages, **kwargs)
            continue
        assert templates[1].render(messages, **kwargs) == prompt, name
        assert tokenizers[1].encode(prompt) == tokenizers[0].encode(prompt)
        rendered += 1
    assert rendered >= len(CASES) - 1


def test_hf_folder_without_template_renders_as_the_original(frozen_date, tmp_path):
    for f in TINY_HF.iterdir():
        if f.name != "chat_template.jinja":
            (tmp_path / f.name).symlink_to(f)
    templates = []
    for folder in (TINY_HF, tmp_path):
        ckpt = open_checkpoint(folder)
        templates.append(load_chat_template(ckpt, load_tokenizer(ckpt)))
    assert templates[1].notice.endswith("has no chat template: using SmolLM3's chat template (smollm3.jinja)")
    for name, (messages, kwargs) in CASES.items():
        assert templates[1].render(messages, **kwargs) == templates[0].render(messages, **kwargs), name


def test_no_official_template_for_a_vocabulary_without_chatml(tmp_path):
    """A Llama-architecture GGUF that is not SmolLM (no <|im_start|> in its vocabulary) keeps raw mode."""
    ckpt = open_checkpoint(gguf_with_template(tiny_gguf("Q8_0"), tmp_path / "t.gguf", None))
    tokenizer = load_tokenizer(ckpt)
    tokenizer.token_to_id = lambda token: None
    assert load_chat_template(ckpt, tokenizer) is None


def run_cli(*argv: str) -> tuple[int, str, str]:
    from app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_cli_says_when_it_uses_the_official_template(tmp_path):
    stripped = gguf_with_template(tiny_gguf("Q4_0"), tmp_path / "no-template.gguf", None)
    code, out, err = run_cli("--model-path", str(stripped), "--prompt", "Hi", "-n", "1", "--temperature", "0")
    assert code == 0, err
    notices = [line for line in err.splitlines() if "chat template" in line]
    assert notices == ["smollm3: no-template.gguf has no chat template: using SmolLM3's chat template (smollm3.jinja)"]
    code, out, err = run_cli("--model-path", str(tiny_gguf("Q4_0")), "--prompt", "Hi", "-n", "1", "--temperature", "0")
    assert code == 0 and "chat template" not in err


def test_chat_template_flag_overrides_the_checkpoints(tmp_path):
    (tmp_path / "raw.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    for path in (tiny_gguf("Q4_0"), TINY_HF):
        ckpt = open_checkpoint(path)
        template = load_chat_template(ckpt, load_tokenizer(ckpt), tmp_path / "raw.jinja")
        assert template.render([USER]) == "What is 2+2?"

    def prompt_tokens(*extra):
        code, out, err = run_cli("--model-path", str(tiny_gguf("Q4_0")), "--prompt", "Hi", "-n", "1", *extra)
        assert code == 0, err
        return int(re.search(r"(\d+) prompt tokens", err).group(1))

    raw = prompt_tokens("--no-chat-template")  # "Hi" alone
    assert prompt_tokens("--chat-template", str(tmp_path / "raw.jinja")) == raw
    assert prompt_tokens() > raw + 100  # SmolLM3's system block
    code, out, err = run_cli("--model-path", str(tiny_gguf("Q4_0")), "--prompt", "Hi", "--chat-template",
                             str(tmp_path / "missing.jinja"))
    assert code == 2 and err.startswith("smollm3: error: cannot read the chat template") and len(err.splitlines()) == 1


def test_a_runaway_template_fails_at_load(tmp_path):
    hostile = gguf_with_template(tiny_gguf("Q4_0"), tmp_path / "hostile.gguf", "{{ 'x' * (10**10) }}")
    ckpt = open_checkpoint(hostile)
    with pytest.raises(TemplateError, match=r"hostile.gguf chat template, line 1: render stopped: a string"):
        load_chat_template(ckpt, load_tokenizer(ckpt))
