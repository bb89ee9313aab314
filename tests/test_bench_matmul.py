"""bench/matmul.py: one timed line per row count over a file's quantized weights."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from backends.torch import native
from conftest import tiny_gguf

SCRIPT = Path(__file__).parent.parent / "bench" / "matmul.py"
LINE = re.compile(r"^tiny-smollm3-Q4_K_M\.gguf rows=(\d+) threads=1: ([\d.]+) ms \((\d+) weights, [\d.]+ GB; [\d.]+ rows/s through the matmuls\)$")

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler to build the native kernels")


def test_times_each_row_count_over_every_weight():
    r = subprocess.run([sys.executable, str(SCRIPT), str(tiny_gguf("Q4_K_M")), "--rows", "1,17", "--reps", "1", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [LINE.match(line) for line in r.stdout.splitlines()]
    assert all(lines) and [int(m[1]) for m in lines] == [1, 17]
    assert all(int(m[3]) > 0 and float(m[2]) > 0 for m in lines)
