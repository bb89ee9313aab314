"""The bounded sandbox: hostile templates stop within time and memory, real ones render as
jinja2 renders them unbounded."""

import re
import time
import tracemalloc

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from backends import chat_template as chat_template_module
from backends import template_sandbox
from backends.chat_template import ChatTemplate
from backends.errors import TemplateError
from test_chat_template import SMOLLM3_TEMPLATE, USER, frozen_date  # noqa: F401 (a fixture)

# What each one would take unbounded (measured with transformers' sandbox, which shares them): a
# 10 GB string, 10^10 loop steps, and strings and lists that double until memory runs out.
HOSTILE_TEMPLATES = {
    "a string repeated 10^10 times": "{{ 'x' * (10**10) }}",
    "an integer power of 10^7 bits": "{{ 2 ** 10000000 }}",
    "repeated squaring": "{% set ns = namespace(n=3) %}{% for i in range(99) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "99,999 x 99,999 nested loops": "{% for i in range(99999) %}{% for j in range(99999) %}{{ j }}{% endfor %}{% endfor %}",
    "nested loops that print nothing": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "nested loops over a string": "{% set s = 'ab' * 99999 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "a huge join": "{{ (['x' * 1000000] * 1000) | join(',') }}",
    "a huge join method": "{{ ','.join(['x' * 3000000] * 2) }}",
    "a huge separator": "{{ range(99999) | join('x' * 99999) }}",
    "~ doubling in a loop": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "+ doubling in a loop": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "a list doubling": "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "one long ~ chain": "{% set s = 'x' * 3000000 %}{{ s ~ s ~ s ~ s ~ s ~ s }}",
    "a macro's buffer": "{% macro m(s) %}{% for i in range(99999) %}{{ s }}{% endfor %}{% endmacro %}{% set x = m('y' * 9999) %}",
    "a block set's buffer": "{% set x %}{% for i in range(99999) %}{{ 'y' * 9999 }}{% endfor %}{% endset %}",
    "a list of one long string repeated": "{{ ['x' * 4000000] * 1000 }}",
    "str.center": "{{ 'x'.center(10**10) }}",
    "center filter": "{{ 'x' | center(10**10) }}",
    "str.format width": "{{ '{:>10000000000}'.format('x') }}",
    "str.format nested width": "{{ '{:>{}}'.format('x', 10**10) }}",
    "% width": "{{ '%10000000000s' % 'x' }}",
    "% width from the arguments": "{{ '%*s' % (10**10, 'x') }}",
    "format filter width": "{{ '%10000000000s' | format(messages[0].content) }}",
    "str.replace of the empty string": "{{ ('x' * 99999).replace('', 'y' * 99999) }}",
    "replace filter": "{{ ('x' * 99999) | replace('', 'y' * 99999) }}",
    "indent of many lines": "{{ ('\n' * 99999) | indent(99999) }}",
    "tojson with a huge indent": "{{ ([[[[1]]]] * 9999) | tojson(indent=99999) }}",
    "batch padding": "{{ [1] | batch(10**10, 0) | list }}",
    "slice into millions of lists": "{{ [1] | slice(4000000) | list }}",
    "expandtabs": "{{ ('\t' * 999999).expandtabs(999999) }}",
    "an output of 100 MB": "{% for i in range(99999) %}{{ 'x' * 999 }}{% endfor %}",
    "unbounded recursion": "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "2^40 macro calls without a loop": "{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}{% endmacro %}{{ m(40) }}",
    "a recursive loop": "{% for x in [[1, 2]] * 99999 recursive %}{{ loop(x) if x is iterable }}{% endfor %}",
}


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_hostile_template_stops_within_bounds(name):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(TemplateError, match=r"^hostile\b") as info:
            ChatTemplate(HOSTILE_TEMPLATES[name], name="hostile").render([USER])
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value)
    assert re.search(r"(render stopped|stopped while compiling): |RecursionError", str(info.value)), info.value
    assert elapsed < 3 * template_sandbox.RENDER_SECONDS, elapsed
    assert peak < 20 * template_sandbox.MAX_VALUE_SIZE, f"{peak / 2**20:.0f} MiB"


def test_limits_leave_real_conversations_alone(frozen_date):
    """A 100-turn conversation of 44 KB renders as jinja2 unbounded renders it."""
    messages = [USER]
    for i in range(50):
        messages += [{"role": "assistant", "content": f"Answer {i}. " * 60}, {"role": "user", "content": f"Q{i} " * 40}]
    unbounded = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[chat_template_module._GenerationBlock])
    unbounded.globals["strftime_now"] = chat_template_module._strftime_now
    expected = unbounded.from_string(SMOLLM3_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert len(expected) > 40_000
    assert ChatTemplate(SMOLLM3_TEMPLATE).render(messages) == expected
