"""Chat templates rendered exactly as transformers 5.24 renders them (`apply_chat_template(...,
tokenize=False)`), without transformers: the same sandboxed jinja2 environment, globals and filters
(transformers/utils/chat_template_utils.py), and the same preparation of the messages.

A template comes from an untrusted checkpoint: it renders in template_sandbox's bounded
environment (time, output, and the size of every value it builds), and a breach is a
TemplateError like any other template failure.

SmolLM3's and SmolLM2's official templates ship in `assets/templates/`, for checkpoints that carry
none (`official_chat_template`).
"""

import importlib.resources
import json
import traceback
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils

from . import template_sandbox
from .errors import TemplateError
from .template_sandbox import BoundedEnvironment, LimitExceeded, bounded, bounded_join

# Official templates by architecture: (file in assets/templates, model name).
OFFICIAL_TEMPLATES = {"smollm3": ("smollm3.jinja", "SmolLM3"), "llama": ("smollm2.jinja", "SmolLM2")}

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
    # jinja2's own tojson escapes HTML characters; chat templates expect plain json.dumps. Written
    # piece by piece, so that an indent over a deep structure stops at the limit.
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return bounded_join("", encoder.iterencode(x))


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
        jinja2.utils.Namespace.__setitem__(self, name, bounded(value))

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"cannot store underscore-prefixed attribute {name!r} on a namespace")


def _environment() -> BoundedEnvironment:
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters = template_sandbox.bound_filters(env.filters)
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
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "chat template",
                 notice: str = ""):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name
        self.notice = notice  # a line for the user when this is not the checkpoint's own template
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"{name}, line {exc.lineno}: {exc.message}") from exc
        except LimitExceeded as exc:  # jinja2 folds constant expressions while compiling
            raise TemplateError(f"{name}: stopped while compiling: {exc}") from None
        except Exception as exc:
            raise TemplateError(f"{name}: {type(exc).__name__}: {exc}") from None

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
            return template_sandbox.render(
                self._template,
                messages=_prepare_messages(messages),
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **_plain(context),
            )
        except LimitExceeded as exc:
            line = self._line_of(exc)
            where = f"{self.name}, line {line}" if line else self.name
            raise TemplateError(f"{where}: render stopped: {exc}") from None
        except TemplateError as exc:
            line = _template_line(exc)
            raise TemplateError(f"{self.name}, line {line}: {exc}") from exc
        except Exception as exc:
            line = _template_line(exc)
            raise TemplateError(f"{self.name}, line {line}: {type(exc).__name__}: {exc}") from exc

    def check(self) -> "ChatTemplate":
        """Render a first turn as the app does: a template that fails, or breaks a limit, fails
        here, when the model loads, rather than when the chat sends its first message."""
        self.render([{"role": "user", "content": "Hi"}])
        return self

    def _line_of(self, exc: BaseException) -> int | None:
        # A BaseException passes jinja2's traceback rewriting: map the generated code's line back.
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<template>"]
        return self._template.get_corresponding_lineno(frames[-1].lineno) if frames else None


def templates_dir():
    """assets/templates: beside backends/ in a checkout, and in site-packages once installed (the
    wheel ships assets/ as the package `assets`); importlib.resources finds it wherever else."""
    here = Path(__file__).resolve().parent.parent / "assets" / "templates"
    return here if here.is_dir() else importlib.resources.files("assets") / "templates"


def official_chat_template(architecture: str, bos_token: str = "", eos_token: str = "") -> ChatTemplate | None:
    """SmolLM3's template for arch `smollm3`, SmolLM2's for `llama`, as published with the models."""
    if architecture not in OFFICIAL_TEMPLATES:
        return None
    file, model = OFFICIAL_TEMPLATES[architecture]
    source = (templates_dir() / file).read_text(encoding="utf-8")
    return ChatTemplate(source, bos_token, eos_token, name=f"{model}'s chat template ({file})")


def chat_template_from_file(path, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read the chat template {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return ChatTemplate(source, bos_token, eos_token, name=str(path))


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
