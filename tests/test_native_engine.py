"""backends/native/engine.py and its choice in backends.load: `auto` runs a GGUF the kernels can
multiply on the native backend, with no torch in the process; what it cannot run goes to torch,
or, asked for by name, is a one-line error; and its generations are the torch backend's."""

import json
import subprocess
import sys

import pytest

import backends
from backends.errors import BackendUnavailable
from backends.native import library
from backends.sampling import GREEDY, SamplingParams
from conftest import TINY_HF, tiny_gguf

pytestmark = pytest.mark.skipif(library.library() is None, reason="no C compiler with OpenMP")

FRESH_PROCESS = r"""
import json, sys
import backends
from backends.sampling import GREEDY
engine = backends.load(sys.argv[1])
tokens = list(engine.generate(engine.tokenizer.encode("The capital of France is"), 8, GREEDY))
print(json.dumps({"backend": engine.info.backend, "torch": "torch" in sys.modules, "tokens": tokens}))
"""


def test_auto_runs_a_gguf_without_importing_torch(smollm2_gguf):
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(smollm2_gguf)], capture_output=True, text=True,
                         check=True, timeout=300)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["backend"] == "native" and not r["torch"]
    torch_engine = backends.load(smollm2_gguf, backend="torch")
    prompt = torch_engine.tokenizer.encode("The capital of France is")
    assert r["tokens"] == list(torch_engine.generate(prompt, 8, GREEDY))


@pytest.mark.parametrize("path, device, dtype, backend", [
    (tiny_gguf("Q4_K_M"), None, "auto", "native"),
    (tiny_gguf("Q4_K_M"), "cpu", "f32", "native"),
    (tiny_gguf("Q4_K_M"), "cpu", "bf16", "torch"),  # native computes in f32 only
    (tiny_gguf("F16"), None, "auto", "torch"),  # F16 weights: torch's kernels
    (TINY_HF, None, "auto", "torch"),
])
def test_auto_takes_native_where_it_runs_the_file(path, device, dtype, backend):
    assert backends.load(path, device=device, dtype=dtype).info.backend == backend


def test_torch_by_name_is_torch():
    assert backends.load(tiny_gguf("Q8_0"), backend="torch").info.backend == "torch"


def test_native_kernels_off_means_torch(monkeypatch):
    monkeypatch.setenv("SMOLLM3_NATIVE", "0")
    assert backends.load(tiny_gguf("Q8_0")).info.backend == "torch"


@pytest.mark.parametrize("path, kwargs, message", [
    (tiny_gguf("F16"), {}, r"^--backend native: .*F16, which our C kernels do not multiply$"),
    (TINY_HF, {}, r"^--backend native: the native backend runs GGUF files"),
    (tiny_gguf("Q8_0"), {"device": "cuda"}, r"^--backend native runs on the CPU in f32"),
    (tiny_gguf("Q8_0"), {"dtype": "bf16"}, r"^--backend native runs on the CPU in f32"),
])
def test_native_by_name_says_why_it_cannot_run(path, kwargs, message):
    with pytest.raises(BackendUnavailable, match=message):
        backends.load(path, backend="native", **kwargs)


def test_seeded_sampling_repeats_and_the_seed_matters():
    engine = backends.load(tiny_gguf("Q4_K_M"), backend="native")
    prompt = engine.tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=7)
    first = list(engine.generate(prompt, 24, params))
    assert list(engine.generate(prompt, 24, params)) == first
    others = [list(engine.generate(prompt, 24, SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=s)))
              for s in (8, 9, 10)]
    assert any(o != first for o in others)
