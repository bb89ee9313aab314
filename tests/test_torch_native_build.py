"""backends/torch/native.py builds its kernels wherever a C compiler is found: a kernel that
stops compiling must fail the suite, not quietly skip every native test (which is what
native.library() returning None does)."""

import subprocess

import pytest

from backends import settings
from backends.torch import native


def test_the_kernels_build_where_there_is_a_compiler():
    cc = native.compiler()
    if cc is None or not settings.native_kernels():
        pytest.skip("no C compiler, or SMOLLM3_NATIVE=0")
    try:
        path = native.build(cc)
    except subprocess.CalledProcessError as error:
        pytest.fail(f"{cc} failed on {native.SOURCE.name}:\n{error.stderr.decode(errors='replace')}")
    assert path.exists()
    assert native.library() is not None
