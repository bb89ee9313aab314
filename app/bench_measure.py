"""The measuring process of `smollm3 bench` (app/bench.py): one engine, one prompt length.

`measure` takes any engine adapter, so the cross-engine harness in bench/ measures llama.cpp
and transformers with the same loop. Progress goes to stderr as PROGRESS lines, which the
parent shows as they come.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol


class BenchAdapter(Protocol):
    """One engine under test. `generate` feeds `ids` from an empty cache and makes exactly `n` tokens."""

    tokens: list[int]  # what the last `generate` made

    def load(self) -> None: ...

    def generate(self, ids: list[int], n: int) -> tuple[float, float, int]:
        """(seconds to the first token incl. prefill, seconds for the decode steps, decode steps)."""
        ...

    def describe(self) -> dict: ...


@dataclass
class Spec:
    """What one measuring process does (written as JSON for the child)."""

    engine: str  # "ours" here; bench/ adds "llamacpp", "transformers"
    model_path: str
    prompt_ids: list[int]  # the longest prompt; shorter ones are its prefixes
    prompt_len: int  # measured in this process
    first_token_len: int  # the cold first token is timed on this (the shortest) prompt
    n_gen: int
    reps: int
    threads: int | None = None
    backend: str = "auto"
    device: str | None = None
    dtype: str = "auto"


@dataclass
class Sample:
    """One process's results; times in seconds, sizes in MiB (the _mb fields)."""

    prompt_len: int
    n_gen: int
    import_s: float
    load_s: float
    first_token_s: float  # cold: the first generate after load, on first_token_len tokens
    ttft_s: float  # medians of the warm repetitions from here on
    prefill_tok_s: float
    decode_tok_s: float
    decode_steps: int
    rss_after_load_mb: float
    peak_rss_mb: float
    others_cores: float  # median CPU (in cores) other processes used during the runs that count
    load_others_cores: float  # the same during load and the cold first token
    best_prefill_tok_s: float  # the fastest run, contended or not
    best_decode_tok_s: float
    ttft_all: list[float] = field(default_factory=list)
    decode_all: list[float] = field(default_factory=list)
    others_cores_all: list[float] = field(default_factory=list)
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    engine_info: dict = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)  # the last run's output: engines should agree


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set of this process in MiB.

    Linux's VmHWM is reset by exec; ru_maxrss is not (it keeps the pre-exec high-water mark of
    the process that spawned us), so it is only the fallback elsewhere (macOS: bytes)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak / 2**20 if sys.platform == "darwin" else peak / 1024
        return peak, peak


QUIET_CORES = 0.25  # a run during which other processes used less CPU than this counts as quiet


class CpuMeter:
    """CPU used by other processes while a block runs, in cores (0: quiet; 1: one core busy elsewhere).

    The machine is shared: a timing is only worth its name when nobody else was computing."""

    def __init__(self):
        self.others_cores = 0.0

    @staticmethod
    def _snapshot() -> tuple[float, float, float]:
        own = sum(os.times()[:2])
        try:
            jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            busy = (sum(jiffies[:8]) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        except (OSError, ValueError, IndexError):
            busy = own  # no /proc: report quiet
        return time.perf_counter(), busy, own

    def __enter__(self):
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc):
        (t0, busy0, own0), (t1, busy1, own1) = self._start, self._snapshot()
        self.others_cores = max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9)


def measure(adapter: BenchAdapter, spec: Spec, import_s: float, progress=lambda text: None) -> Sample:
    """progress(text) is told each measurement as it ends (the parent shows it)."""
    with CpuMeter() as load_meter:
        t0 = time.perf_counter()
        adapter.load()
        load_s = time.perf_counter() - t0
        rss_after_load, _ = rss_mb()
        first_token_s, _, _ = adapter.generate(spec.prompt_ids[: spec.first_token_len], 1)
    progress(f"load {load_s:.2f} s, first token {first_token_s:.3f} s")
    ids = spec.prompt_ids[: spec.prompt_len]
    adapter.generate(ids, spec.n_gen)  # warm-up: caches, compiled kernels, allocator
    progress("warm-up done")
    runs = []  # (ttft, decode tok/s, others' cores); repeated while contended, up to twice the repetitions
    while len(runs) < 2 * spec.reps and sum(r[2] < QUIET_CORES for r in runs) < spec.reps:
        with CpuMeter() as meter:
            ttft, decode_s, steps = adapter.generate(ids, spec.n_gen)
        runs.append((ttft, steps / decode_s if decode_s > 0 else 0.0, meter.others_cores))
        busy = "" if meter.others_cores < QUIET_CORES else f", contended ({meter.others_cores:.2f} cores busy elsewhere)"
        progress(f"run {len(runs)}: TTFT {ttft:.3f} s, decode {runs[-1][1]:.1f} tok/s{busy}")
    quiet = [r for r in runs if r[2] < QUIET_CORES]
    used = quiet if len(quiet) >= max(1, spec.reps // 2) else runs
    ttft = statistics.median(r[0] for r in used)
    _, peak = rss_mb()
    return Sample(
        prompt_len=spec.prompt_len, n_gen=spec.n_gen, import_s=import_s, load_s=load_s,
        first_token_s=first_token_s, ttft_s=ttft, prefill_tok_s=spec.prompt_len / ttft,
        decode_tok_s=statistics.median(r[1] for r in used), decode_steps=steps,
        rss_after_load_mb=rss_after_load, peak_rss_mb=peak, ttft_all=[r[0] for r in runs],
        decode_all=[r[1] for r in runs], others_cores_all=[r[2] for r in runs],
        others_cores=statistics.median(r[2] for r in used), load_others_cores=load_meter.others_cores,
        best_prefill_tok_s=spec.prompt_len / min(r[0] for r in runs), best_decode_tok_s=max(r[1] for r in runs),
        loadavg=os.getloadavg(), engine_info=adapter.describe(), tokens=list(adapter.tokens),
    )


class OursAdapter:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.engine = None
        self.tokens: list[int] = []

    def load(self) -> None:
        import dataclasses

        import backends

        s = self.spec
        self.engine = backends.load(s.model_path, backend=s.backend, device=s.device, dtype=s.dtype)
        # As llama-bench: always generate n tokens, whatever the model says (random weights may pick EOS).
        self.engine.tokenizer.eos_ids = []
        self.engine.config = dataclasses.replace(self.engine.config, eos_token_ids=())

    def generate(self, ids: list[int], n: int) -> tuple[float, float, int]:
        from backends.sampling import GREEDY

        engine = self.engine
        engine.cached_ids = []  # no KV reuse between repetitions: every run prefills all of `ids`
        self.tokens = list(engine.generate(list(ids), n, GREEDY))
        s = engine.stats
        if len(self.tokens) != n or s.prefilled_tokens != len(ids):
            raise RuntimeError(f"expected {len(ids)} prefilled and {n} generated tokens, "
                               f"got {s.prefilled_tokens} and {len(self.tokens)}")
        return s.prefill_s, s.decode_s, s.decode_steps

    def describe(self) -> dict:
        import backends

        i = self.engine.info
        return {"engine": "ours", "backend": i.backend, "device": i.device, "dtype": i.dtype,
                "weight_type": i.weight_type, "version": _our_version(), "torch": _torch_version(),
                "threads": _torch_threads(), "kernels": _kernels_setting(),
                "backends_module": Path(backends.__file__).parent.name}


def _kernels_setting() -> str:
    from backends import settings

    return settings.kernels()


def _our_version() -> str:
    try:
        from importlib.metadata import version

        v = version("smollm3")
    except Exception:
        v = "?"
    try:
        root = Path(__file__).resolve().parent.parent
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if rev:
            v += f"+{rev}" + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return v


def _torch_version() -> str | None:
    torch = sys.modules.get("torch")
    return getattr(torch, "__version__", None)


def _torch_threads() -> int | None:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def run_worker(spec_path: str, out_path: str) -> int:
    """Child process: measure one prompt length of the `ours` engine, write a Sample as JSON."""
    spec = Spec(**json.loads(Path(spec_path).read_text()))
    t0 = time.perf_counter()
    import torch

    import backends  # noqa: F401

    if spec.threads:
        torch.set_num_threads(spec.threads)
    import_s = time.perf_counter() - t0
    sample = measure(OursAdapter(spec), spec, import_s, progress=report_progress)
    Path(out_path).write_text(json.dumps(asdict(sample)))
    return 0


PROGRESS = "@progress "  # a child's stderr line the parent shows as it comes


def report_progress(text: str) -> None:
    print(PROGRESS + text, file=sys.stderr, flush=True)
