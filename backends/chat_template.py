"""Chat templates rendered exactly as transformers 5.24 renders them (`apply_chat_template(...,
tokenize=False)`), without transformers: the same sandboxed jinja2 environment, globals and filters
(transformers/utils/chat_template_utils.py), and the same preparation of the messages.

A template comes from an untrusted checkpoint, so a render is bounded where transformers' is not:
in time, in the size of its output, and in the size of every string, list and number it builds
(checked before the operations that multiply sizes: `*`, `**`, `+`, `~`, `%`, join, replace,
padding; and on every value a call, filter or namespace store produces). A breach is a
TemplateError like any other template failure.

SmolLM3's and SmolLM2's official templates ship in `assets/templates/`, for checkpoints that carry
none (`official_chat_template`).
"""

import functools
import importlib.resources
import json
import re
import string
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.filters
import jinja2.nodes
import jinja2.utils
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateError

# The rendered prompt: about a million tokens, far past any SmolLM context.
MAX_RENDER_CHARS = 4 * 2**20
# Any string's characters, or a list's items plus the sizes of what it holds (so that a list of one
# long string repeated counts every repeat).
MAX_VALUE_SIZE = 4 * 2**20
MAX_INT_BITS = 2**16
# The SmolLM3 template renders a conversation in milliseconds.
RENDER_SECONDS = 1.0

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


class _LimitExceeded(BaseException):
    """A render went past a limit. A BaseException, so that no `except Exception` in jinja2's
    runtime or in a filter can swallow it; ChatTemplate turns it into a TemplateError."""


def _check(size: int, what: str = "a string or list") -> None:
    if size > MAX_VALUE_SIZE:
        raise _LimitExceeded(f"{what} of {size:,} characters or items (the limit is {MAX_VALUE_SIZE:,})")


def _size(value) -> int:
    """Characters and items in `value`, through lists, tuples and dicts; over the limit raises
    as soon as the count passes it, without walking the rest."""
    total, stack = 0, [value]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            total += len(x)
        elif isinstance(x, (list, tuple, set, frozenset, dict)):
            total += len(x)
            _check(total)
            stack.extend(x.items() if isinstance(x, dict) else x)
        elif isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
            raise _LimitExceeded(f"a number of {x.bit_length():,} bits (the limit is {MAX_INT_BITS:,})")
        _check(total)
    return total


def _bounded(value):
    _size(value)
    return value


def _check_repeat(left, right) -> None:
    """`*`: a sequence repeated, or a product of integers."""
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _LimitExceeded(f"a product of {left.bit_length() + right.bit_length():,} bits")
        return
    sequence, times = (left, right) if isinstance(right, int) else (right, left)
    if isinstance(sequence, (str, list, tuple)) and isinstance(times, int):
        _check(_size(sequence) * max(times, 0))


def _check_power(base, exponent) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        bits = (abs(base).bit_length() - 1) * exponent
        if bits > MAX_INT_BITS:
            raise _LimitExceeded(f"a power of at least {bits:,} bits (the limit is {MAX_INT_BITS:,})")


_PRINTF_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _int_arguments(args) -> list[int]:
    values = args.values() if isinstance(args, dict) else args if isinstance(args, (list, tuple)) else [args]
    return [v for v in values if isinstance(v, int)]


def _check_printf(fmt: str, args) -> None:
    """`%` formatting: widths and precisions, written in the format or taken from the arguments (`*`)."""
    total = len(fmt)
    for match in _PRINTF_FIELD.finditer(fmt):
        for number in match.groups():
            if number == "*":
                total += sum(abs(v) for v in _int_arguments(args))
            elif number:
                total += int(number)
    _check(total, "a formatted string")


def _check_format(fmt: str, args, kwargs) -> None:
    """str.format: widths and precisions in the format specs, and nested ones (`{:{w}}`)."""
    total = len(fmt)
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if spec:
            total += sum(int(n) for n in re.findall(r"\d+", spec))
            if "{" in spec:
                total += sum(abs(v) for v in _int_arguments(list(args) + list(kwargs.values())))
    _check(total, "a formatted string")


def _replaced_size(s: str, old: str, new: str, count=None) -> int:
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))


def _bounded_join(separator: str, items) -> str:
    """`separator.join(map(str, items))`, stopped as soon as the result would pass the limit."""
    pieces, total = [], 0
    for item in items:
        piece = item if isinstance(item, str) else str(item)
        total += len(piece) + len(separator)
        _check(total, "a joined string")
        pieces.append(piece)
    return separator.join(pieces)


def _check_str_method(s: str, name: str, args: tuple, kwargs: dict) -> tuple:
    """Before a str method that can make a string far longer than its inputs; returns the
    arguments to call it with (join's items, read once)."""
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        _check(args[0])
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tabsize, int):
            _check(len(s) + s.count("\t") * tabsize)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check(_replaced_size(s, *args[:3]))
    elif name == "join" and len(args) == 1:
        items = list(args[0])
        _check(sum(len(item) if isinstance(item, str) else 0 for item in items) + len(s) * len(items), "a joined string")
        return (items,)
    elif name in ("format", "format_map"):
        _check_format(s, args, kwargs)
    return args


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes HTML characters; chat templates expect plain json.dumps. Written
    # piece by piece, so that an indent over a deep structure stops at the limit.
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return _bounded_join("", encoder.iterencode(x))


@jinja2.pass_eval_context
def _join_filter(eval_ctx, value, d="", attribute=None):
    if attribute is not None:
        value = map(jinja2.filters.make_attrgetter(eval_ctx.environment, attribute), value)
    return _bounded_join(str(d), value)


@jinja2.pass_eval_context
def _replace_filter(eval_ctx, s, old, new, count=None):
    _check(_replaced_size(str(s), str(old), str(new), count))
    return jinja2.filters.do_replace(eval_ctx, s, old, new, count)


def _center_filter(value, width=80):
    if isinstance(width, int):
        _check(width)
    return jinja2.filters.do_center(value, width)


def _indent_filter(s, width=4, first=False, blank=False):
    s = str(s)
    _check(len(s) + (s.count("\n") + 1) * (width if isinstance(width, int) else len(str(width))))
    return jinja2.filters.do_indent(s, width, first, blank)


def _format_filter(value, *args, **kwargs):
    _check_printf(str(value), kwargs or args)
    return jinja2.filters.do_format(value, *args, **kwargs)


def _counted(name: str, position: int, keyword: str):
    """batch and slice: the count argument makes lists that long, or that many."""
    original = jinja2.filters.FILTERS[name]

    @functools.wraps(original)
    def check_count(*args, **kwargs):
        count = args[position] if len(args) > position else kwargs.get(keyword)
        if isinstance(count, int):
            _check(count)
        return original(*args, **kwargs)

    return check_count


# Filters that can make a value much larger than their inputs, checked before they run.
_CHECKED_FILTERS = {
    "join": _join_filter,
    "replace": _replace_filter,
    "center": _center_filter,
    "indent": _indent_filter,
    "format": _format_filter,
    "batch": _counted("batch", 1, "linecount"),
    "slice": _counted("slice", 2, "slices"),  # (eval_ctx, value, slices)
}


def _bounded_filter(original):
    @functools.wraps(original)  # keeps jinja2's pass_context / pass_eval_context mark
    def filter_(*args, **kwargs):
        return _bounded(original(*args, **kwargs))

    return filter_


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
        jinja2.utils.Namespace.__setitem__(self, name, _bounded(value))

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"cannot store underscore-prefixed attribute {name!r} on a namespace")


class _OutputBuffer(list):
    """Where a macro's, a block set's or a filter block's output gathers before it is joined:
    counted as it grows, since a loop can append to it without building anything checked."""

    size = 0

    def append(self, piece):
        self.size += len(piece)
        _check(self.size, "a block's output")
        super().append(piece)

    def extend(self, pieces):
        for piece in pieces:
            self.append(piece)


class _BoundedCodeGenerator(CodeGenerator):
    def buffer(self, frame):
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")

    def visit_Concat(self, node, frame):
        # `a ~ b ~ ...` joins its operands in one call, which jinja2 does not route through the
        # environment: send it to _BoundedEnvironment.concat_operands (autoescape is off here).
        self.write("environment.concat_operands((")
        for operand in node.nodes:
            self.visit(operand, frame)
            self.write(", ")
        self.write("))")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with every operation that can build a large value checked (see the module
    docstring). Jinja2 routes arithmetic operators listed in `intercepted_binops` through
    call_binop, every call through call, and every buffer join through concat."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            _check_repeat(left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _check(_size(left) + _size(right))
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        return _bounded(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(owner, getattr(method, "__name__", ""), args, kwargs)
        return _bounded(super().call(__context, __obj, *args, **kwargs))

    def concat(self, pieces) -> str:
        return _bounded_join("", pieces)

    output_buffer = _OutputBuffer

    def concat_operands(self, operands) -> str:
        return _bounded_join("", operands)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters = {name: _bounded_filter(_CHECKED_FILTERS.get(name, f)) for name, f in env.filters.items()}
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
        except _LimitExceeded as exc:  # jinja2 folds constant expressions while compiling
            raise TemplateError(f"{name}: {exc}") from None
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
            return self._render_bounded(
                messages=_prepare_messages(messages),
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **_plain(context),
            )
        except _LimitExceeded as exc:
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

    def _render_bounded(self, **context) -> str:
        """The render, streamed: its output counted as it comes, and every line it runs (the
        template's and the Python it calls) checked against the deadline by a trace function,
        which catches loops that build or print nothing."""
        deadline = time.perf_counter() + RENDER_SECONDS

        def trace(frame, event, arg):
            if time.perf_counter() > deadline:
                raise _LimitExceeded(f"it took over {RENDER_SECONDS:g} s")
            return trace

        pieces, total = [], 0
        previous = sys.gettrace()
        sys.settrace(trace)
        try:
            for piece in self._template.generate(**context):
                total += len(piece)
                if total > MAX_RENDER_CHARS:
                    raise _LimitExceeded(f"its output passed {MAX_RENDER_CHARS:,} characters")
                pieces.append(piece)
        finally:
            sys.settrace(previous)
        return "".join(pieces)

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
