"""backends/memory.py: torch's library pages handed back after a load, measured in
fresh processes (a test process has touched far more of torch than a chat does)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; madvise as Linux has it")

MEASURE = r"""
import json, os, sys
import torch
from backends.memory import library_ranges, release_library_pages

TORCH_DIR = os.path.dirname(torch.__file__)

def torch_rss_mb():
    ranges = library_ranges(TORCH_DIR)
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                start, end = (int(v, 16) for v in fields[0].split("-"))
                current = (start, end) in ranges
            elif fields[0] == "Rss:" and current:
                total += int(fields[1])
    return total / 1024

before = torch_rss_mb()
advised = release_library_pages(TORCH_DIR)
after = torch_rss_mb()
print(json.dumps({"before": before, "after": after, "advised_mb": advised / 2**20}))
"""

LOAD = r"""
import json, sys
import backends
import backends.torch.engine as torch_engine
from backends.sampling import GREEDY
if sys.argv[2] == "keep":
    torch_engine.release_library_pages = lambda package_dir: 0
engine = backends.load(sys.argv[1], backend="torch")
tokens = list(engine.generate(engine.tokenizer.encode("The capital of France is"), 12, GREEDY))
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
print(json.dumps({"peak": peak, "tokens": tokens}))
"""


def run_json(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_torch_library_pages_are_handed_back():
    r = run_json(MEASURE)
    if r["advised_mb"] == 0:
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux 5.4+)")
    assert r["before"] > 60, r  # libtorch_cpu.so's pages the import ran through
    assert r["after"] < r["before"] / 3, r


def test_a_loaded_model_peaks_lower_and_answers_the_same(smollm2_gguf):
    released, kept = run_json(LOAD, str(smollm2_gguf), "release"), run_json(LOAD, str(smollm2_gguf), "keep")
    assert released["tokens"] == kept["tokens"]
    assert released["peak"] < kept["peak"] - 25, (released, kept)  # measured: 51 MiB lower
