"""The jinja2 sandbox, bounded: a chat template comes from an untrusted checkpoint, and jinja2's
sandbox blocks escapes but not work or memory (nor does transformers': `{{ 'x' * (10**10) }}` runs
until killed). A render here is bounded in time, in the size of its output, and in the size of
every string, list and number it builds: checked before each operation that can multiply sizes
(`*`, `**`, `+`, `~`, `%`, join, replace, padding, format widths, batch/slice counts, tojson
indents) and on every value a call, filter or namespace store produces. A breach raises
LimitExceeded, which the caller turns into its own error.

jinja2 routes the arithmetic operators named in `intercepted_binops` through `call_binop`, every
call through `call`, and every join of a macro's or block's output through `concat`; `for` loops'
iterables, `~` and the output buffers go through the code generator below. Time is checked at
each of these (every loop step, call, operator and filter): without a loop or a call, a template
runs in time bounded by its length. The SmolLM3 template renders a 401-message conversation in
12 ms this way, against 5 ms unbounded (measured on this project's x86 dev machine).
"""

import functools
import math
import re
import string
import threading
import time

import jinja2
import jinja2.filters
import jinja2.nodes
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The rendered prompt: about a million tokens, far past any SmolLM context.
MAX_RENDER_CHARS = 4 * 2**20
# Any string's characters, or a list's items plus the sizes of what it holds (so that a list of one
# long string repeated counts every repeat).
MAX_VALUE_SIZE = 4 * 2**20
MAX_INT_BITS = 2**16
# The SmolLM3 template renders a conversation in milliseconds.
RENDER_SECONDS = 1.0


class LimitExceeded(BaseException):
    """A render went past a limit. A BaseException, so that no `except Exception` in jinja2's
    runtime or in a filter can swallow it."""


# The running render's deadline, per thread (a server renders for several requests at once).
_deadline = threading.local()


def _check_time() -> None:
    if time.perf_counter() > getattr(_deadline, "at", math.inf):
        raise LimitExceeded(f"it took over {RENDER_SECONDS:g} s")


def _timed(items):
    """What a template's `for` loops over: the deadline checked at every step, so that loops
    that build or print nothing stop too."""
    for item in items:
        _check_time()
        yield item


def _check(size: int, what: str = "a string or list") -> None:
    if size > MAX_VALUE_SIZE:
        raise LimitExceeded(f"{what} of {size:,} characters or items (the limit is {MAX_VALUE_SIZE:,})")


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
            raise LimitExceeded(f"a number of {x.bit_length():,} bits (the limit is {MAX_INT_BITS:,})")
        _check(total)
    return total


def bounded(value):
    _size(value)
    return value


def _check_repeat(left, right) -> None:
    """`*`: a sequence repeated, or a product of integers."""
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise LimitExceeded(f"a product of {left.bit_length() + right.bit_length():,} bits")
        return
    sequence, times = (left, right) if isinstance(right, int) else (right, left)
    if isinstance(sequence, (str, list, tuple)) and isinstance(times, int):
        _check(_size(sequence) * max(times, 0))


def _check_power(base, exponent) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        bits = (abs(base).bit_length() - 1) * exponent
        if bits > MAX_INT_BITS:
            raise LimitExceeded(f"a power of at least {bits:,} bits (the limit is {MAX_INT_BITS:,})")


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


def bounded_join(separator: str, items) -> str:
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


@jinja2.pass_eval_context
def _join_filter(eval_ctx, value, d="", attribute=None):
    if attribute is not None:
        value = map(jinja2.filters.make_attrgetter(eval_ctx.environment, attribute), value)
    return bounded_join(str(d), value)


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


def _counted(name: str, position: int, keyword: str, weight: int):
    """batch and slice: the count argument makes a list that long (batch's padding), or that
    many lists (slice: each weighs as 16 items, about its memory)."""
    original = jinja2.filters.FILTERS[name]

    @functools.wraps(original)
    def check_count(*args, **kwargs):
        count = args[position] if len(args) > position else kwargs.get(keyword)
        if isinstance(count, int):
            _check(count * weight)
        return original(*args, **kwargs)

    return check_count


# Filters that can make a value much larger than their inputs, checked before they run.
_CHECKED_FILTERS = {
    "join": _join_filter,
    "replace": _replace_filter,
    "center": _center_filter,
    "indent": _indent_filter,
    "format": _format_filter,
    "batch": _counted("batch", 1, "linecount", 1),
    "slice": _counted("slice", 2, "slices", 16),  # (eval_ctx, value, slices)
}


def _bounded_filter(original):
    @functools.wraps(original)  # keeps jinja2's pass_context / pass_eval_context mark
    def filter_(*args, **kwargs):
        _check_time()
        return bounded(original(*args, **kwargs))

    return filter_


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
    """jinja2's code generator, with what it writes inline sent through the environment: every
    `for` loop's iterable, output buffers, and `~`."""

    def visit_Template(self, node, frame=None):
        for loop in node.find_all(jinja2.nodes.For):
            timed = jinja2.nodes.EnvironmentAttribute("timed_iter", lineno=loop.iter.lineno)
            loop.iter = jinja2.nodes.Call(timed, [loop.iter], [], None, None, lineno=loop.iter.lineno)
        super().visit_Template(node, frame)

    def buffer(self, frame):
        # A macro's or block's output list: an _OutputBuffer, counted as it grows.
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.output_buffer()")

    def visit_Concat(self, node, frame):
        # `a ~ b ~ ...` joins its operands in one call, which jinja2 does not route through the
        # environment: send it to BoundedEnvironment.concat_operands (autoescape is off here).
        self.write("environment.concat_operands((")
        for operand in node.nodes:
            self.visit(operand, frame)
            self.write(", ")
        self.write("))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with every operation that can build a large value checked. Filters are
    wrapped by `bound_filters`."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

    def call_binop(self, context, operator, left, right):
        _check_time()
        if operator == "*":
            _check_repeat(left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _check(_size(left) + _size(right))
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right)
        return bounded(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        _check_time()  # a macro calling itself twice runs 2^depth calls without a loop
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(owner, getattr(method, "__name__", ""), args, kwargs)
        return bounded(super().call(__context, __obj, *args, **kwargs))

    output_buffer = _OutputBuffer
    timed_iter = staticmethod(_timed)

    def concat(self, pieces) -> str:  # joins a macro's or block's output
        return bounded_join("", pieces)

    def concat_operands(self, operands) -> str:
        return bounded_join("", operands)


def bound_filters(filters: dict) -> dict:
    """Every filter with its result checked; those that grow values checked before they run."""
    return {name: _bounded_filter(_CHECKED_FILTERS.get(name, f)) for name, f in filters.items()}


def render(template: jinja2.Template, **context) -> str:
    """The render, streamed, its output counted as it comes, within RENDER_SECONDS (checked at
    every loop step, call, operator and filter)."""
    outer = getattr(_deadline, "at", math.inf)
    _deadline.at = min(outer, time.perf_counter() + RENDER_SECONDS)
    pieces, total = [], 0
    try:
        for piece in template.generate(**context):
            total += len(piece)
            if total > MAX_RENDER_CHARS:
                raise LimitExceeded(f"its output passed {MAX_RENDER_CHARS:,} characters")
            pieces.append(piece)
    finally:
        _deadline.at = outer
    return "".join(pieces)
