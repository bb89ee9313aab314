"""Chat templates rendered exactly as transformers 5.24 renders them (`apply_chat_template(...,
tokenize=False)`), without transformers: the same sandboxed jinja2 environment, globals and filters
(transformers/utils/chat_template_utils.py), and the same preparation of the messages."""

import json
import traceback
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateError

# The names a message's reasoning travels under; transformers copies it to all of them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks the assistant's tokens for training masks;
    for inference it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes HTML characters; chat templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict` for templates: callable, without the class attributes that reach CPython internals."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore-prefixed attribute names."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"cannot store underscore-prefixed attribute {name!r} on a namespace")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value):
    """Rebuild what the template sees from plain JSON types, as transformers does: objects with
    methods the sandbox does not know become an inert "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: list[dict]) -> list[dict]:
    prepared = []
    for message in messages:
        if not isinstance(message, dict):
            raise TemplateError(f"chat messages must be dicts, got {message!r}")
        # transformers drops None-valued keys, then aliases the reasoning fields.
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


def _template_line(exc: BaseException) -> int | None:
    # jinja2 rewrites tracebacks so that template code shows as frames of file "<template>".
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<template>"]
    return frames[-1].lineno if frames else getattr(exc, "lineno", None)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "chat template"):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{name}, line {exc.lineno}: {exc.message}") from exc

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools=None,
        **extra,
    ) -> str:
        if tools is not None and not all(isinstance(tool, dict) for tool in tools):
            raise TemplateError("tools must be JSON-schema dicts")
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        # transformers passes only the special tokens the tokenizer has: unset ones stay undefined.
        context = {k: v for k, v in context.items() if v}
        context.update(extra)
        if enable_thinking is not None:
            context["enable_thinking"] = enable_thinking
        try:
            return self._template.render(
                messages=_prepare_messages(messages),
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **_plain(context),
            )
        except TemplateError as exc:
            line = _template_line(exc)
            raise TemplateError(f"{self.name}, line {line}: {exc}") from exc
        except Exception as exc:
            line = _template_line(exc)
            raise TemplateError(f"{self.name}, line {line}: {type(exc).__name__}: {exc}") from exc


def chat_template_from_dir(hf_dir) -> ChatTemplate | None:
    """The chat template of a Hugging Face checkpoint folder: chat_template.jinja, else
    tokenizer_config.json's "chat_template" (a string, or a list of {name, template})."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise TemplateError(f"cannot read {config_path}: {exc}") from exc

    def token(key: str) -> str:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return value or ""

    jinja_path = hf_dir / "chat_template.jinja"
    if jinja_path.is_file():
        source, name = jinja_path.read_text(encoding="utf-8"), str(jinja_path)
    else:
        source, name = config.get("chat_template"), f"{config_path} chat_template"
        if isinstance(source, list):
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not source:
            return None
    return ChatTemplate(source, bos_token=token("bos_token"), eos_token=token("eos_token"), name=name)
