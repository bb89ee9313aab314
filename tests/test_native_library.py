"""backends/native/library.py builds the kernels wherever a C compiler is found (a kernel that
stops compiling must fail the suite, not quietly skip every native test, which is what
library() returning None does), and takes its thread count as torch would."""

import os
import subprocess

import pytest

from backends import settings
from backends.native import library


def test_the_kernels_build_where_there_is_a_compiler():
    cc = library.compiler()
    if cc is None or not settings.native_kernels():
        pytest.skip("no C compiler, or SMOLLM3_NATIVE=0")
    try:
        path = library.build(cc)
    except subprocess.CalledProcessError as error:
        pytest.fail(f"{cc} failed on {library.SOURCE.name}:\n{error.stderr.decode(errors='replace')}")
    assert path.exists()
    assert library.library() is not None


def test_threads_follow_omp_num_threads_else_the_physical_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert library.default_threads() == 3
    for unusable in ("", "0", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        cores = library.default_threads()
        assert 1 <= cores <= len(os.sched_getaffinity(0))
