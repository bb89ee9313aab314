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

    engine: str  # "ours" or "llamacpp" here; bench/ adds "transformers"
    model_path: str
    prompt_ids: list[int]  # the longest prompt; shorter ones are its prefixes
    prompt_len: int  # measured in this process
    first_token_len: int  # the cold first token (the first generate after load) is timed on this prompt
    n_gen: int
    reps: int  # 0: load and the cold first token only
    threads: int | None = None
    backend: str = "auto"
    device: str | None = None
    dtype: str = "auto"


@dataclass
class Sample:
    """One process's results; times in seconds, sizes in MiB (the _mb fields)."""

    prompt_len: int
    n_gen: int
    first_token_len: int
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
    if spec.reps == 0:
        return cold_sample(adapter, spec, import_s, load_s, first_token_s, rss_after_load, load_meter.others_cores)
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
        prompt_len=spec.prompt_len, n_gen=spec.n_gen, first_token_len=spec.first_token_len, import_s=import_s,
        load_s=load_s,
        first_token_s=first_token_s, ttft_s=ttft, prefill_tok_s=spec.prompt_len / ttft,
        decode_tok_s=statistics.median(r[1] for r in used), decode_steps=steps,
        rss_after_load_mb=rss_after_load, peak_rss_mb=peak, ttft_all=[r[0] for r in runs],
        decode_all=[r[1] for r in runs], others_cores_all=[r[2] for r in runs],
        others_cores=statistics.median(r[2] for r in used), load_others_cores=load_meter.others_cores,
        best_prefill_tok_s=spec.prompt_len / min(r[0] for r in runs), best_decode_tok_s=max(r[1] for r in runs),
        loadavg=os.getloadavg(), engine_info=adapter.describe(), tokens=list(adapter.tokens),
    )


def cold_sample(adapter, spec: Spec, import_s, load_s, first_token_s, rss_after_load, others_cores) -> Sample:
    """A process that only loads and times the first token: cold prefill and load + first token."""
    n = spec.first_token_len
    return Sample(
        prompt_len=n, n_gen=1, first_token_len=n, import_s=import_s, load_s=load_s, first_token_s=first_token_s,
        ttft_s=first_token_s, prefill_tok_s=n / first_token_s, decode_tok_s=0.0, decode_steps=0,
        rss_after_load_mb=rss_after_load, peak_rss_mb=rss_mb()[1], others_cores=others_cores,
        load_others_cores=others_cores, best_prefill_tok_s=n / first_token_s, best_decode_tok_s=0.0,
        loadavg=os.getloadavg(), engine_info=adapter.describe(), tokens=list(adapter.tokens),
    )


def measure_long(adapter: BenchAdapter, spec: Spec, progress=lambda text: None) -> dict:
    """Decode at a long context: prefill spec.prompt_len tokens once (it is expensive), decode
    n_gen tokens, then twice more rewind the cache to the prompt (the last prompt token is fed
    again, for its logits) and decode n_gen again. Decode tok/s is the median of the three."""
    t0 = time.perf_counter()
    adapter.load()
    load_s = time.perf_counter() - t0
    ids = spec.prompt_ids[: spec.prompt_len]
    with CpuMeter() as meter:
        prefill_s, decode_s, steps = adapter.generate(ids, spec.n_gen)
    decodes, others, tokens = [steps / decode_s], [meter.others_cores], [list(adapter.tokens)]
    progress(f"prefill {len(ids)} tokens {prefill_s:.1f} s, decode {decodes[-1]:.2f} tok/s")
    for _ in range(2):
        with CpuMeter() as meter:
            _, decode_s, steps = adapter.generate(ids, spec.n_gen, rewind=True)
        decodes.append(steps / decode_s)
        others.append(meter.others_cores)
        tokens.append(list(adapter.tokens))
        progress(f"rewound to {len(ids)}: decode {decodes[-1]:.2f} tok/s")
    return {"context": len(ids), "n_gen": spec.n_gen, "load_s": load_s, "prefill_s": prefill_s,
            "prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": statistics.median(decodes),
            "decode_all": decodes, "others_cores": statistics.median(others), "peak_rss_mb": rss_mb()[1],
            "tokens_all": tokens, "engine_info": adapter.describe()}


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

    def generate(self, ids: list[int], n: int, rewind: bool = False) -> tuple[float, float, int]:
        """rewind: the cache holds `ids` (and more) from the last call; only the last prompt token is fed."""
        from backends.sampling import GREEDY

        engine = self.engine
        if not rewind:
            engine.cached_ids = []  # no KV reuse between repetitions: every run prefills all of `ids`
        self.tokens = list(engine.generate(list(ids), n, GREEDY))
        s = engine.stats
        if len(self.tokens) != n or s.prefilled_tokens != (1 if rewind else len(ids)):
            raise RuntimeError(f"expected {1 if rewind else len(ids)} prefilled and {n} generated tokens, "
                               f"got {s.prefilled_tokens} and {len(self.tokens)}")
        # With speculation a forward can confirm several tokens: count tokens, not forwards.
        return s.prefill_s, s.decode_s, s.decode_steps + s.accepted_tokens

    def describe(self) -> dict:
        import backends

        i = self.engine.info
        return {"engine": "ours", "backend": i.backend, "device": i.device, "dtype": i.dtype,
                "weight_type": i.weight_type, "version": _our_version(), "torch": _torch_version(),
                "threads": i.extra.get("threads") or _torch_threads(), "kernels": _kernels_setting(),
                "backends_module": Path(backends.__file__).parent.name}


class LlamaCppAdapter:
    """llama-cpp-python's Llama, fed token ids through `eval`; greedy is an argmax over the last
    logits (no sampler chain), so llama.cpp pays no Python sampling overhead: as llama-bench.
    Every layer goes to the GPU where this llama.cpp build has one and our engine is not told cpu."""

    def __init__(self, spec: Spec):
        from backends.numbers import find_multiple

        self.spec = spec
        self.llm = None
        self.tokens: list[int] = []
        self.n_ctx = find_multiple(len(spec.prompt_ids) + spec.n_gen + 16, 256)
        self.gpu_layers = 0

    def load(self) -> None:
        import llama_cpp

        t = self.spec.threads
        if self.spec.device != "cpu" and llama_cpp.llama_supports_gpu_offload():
            self.gpu_layers = -1
        self.llm = llama_cpp.Llama(self.spec.model_path, n_ctx=self.n_ctx, n_threads=t, n_threads_batch=t,
                                   n_gpu_layers=self.gpu_layers, logits_all=False, verbose=False)

    def _argmax_last(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(logits.argmax())

    def generate(self, ids: list[int], n: int, rewind: bool = False) -> tuple[float, float, int]:
        llm = self.llm
        # n_tokens: where `eval` writes next; it drops the cached keys and values from there.
        llm.n_tokens = len(ids) - 1 if rewind else 0
        t0 = time.perf_counter()
        llm.eval(ids[-1:] if rewind else ids)
        tokens = [self._argmax_last()]
        t1 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval(tokens[-1:])
            tokens.append(self._argmax_last())
        self.tokens = tokens
        return t1 - t0, time.perf_counter() - t1, n - 1

    def describe(self) -> dict:
        import llama_cpp

        return {"engine": "llamacpp", "version": llama_cpp.__version__, "n_ctx": self.n_ctx,
                "threads": self.llm.n_threads if self.llm else self.spec.threads, "gpu_layers": self.gpu_layers,
                "system_info": llama_cpp.llama_print_system_info().decode()}


ADAPTERS = {"ours": OursAdapter, "llamacpp": LlamaCppAdapter}  # bench/engines.py adds transformers


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


def run_worker(spec_path: str, out_path: str, adapters: dict = ADAPTERS, long: bool = False) -> int:
    """Child process: one measurement of one engine (a Sample, or measure_long's dict), as JSON."""
    spec = Spec(**json.loads(Path(spec_path).read_text()))
    t0 = time.perf_counter()
    import_engine(spec)
    import_s = time.perf_counter() - t0
    adapter = adapters[spec.engine](spec)
    if long:
        out = measure_long(adapter, spec, progress=report_progress)
    else:
        out = asdict(measure(adapter, spec, import_s, progress=report_progress))
    Path(out_path).write_text(json.dumps(out))
    return 0


def import_engine(spec: Spec) -> None:
    """The engine's imports, timed apart from its load."""
    if spec.engine == "llamacpp":
        import llama_cpp  # noqa: F401
        return
    if spec.engine == "ours":
        if spec.threads:  # read at load by the native backend, at import by torch
            os.environ["OMP_NUM_THREADS"] = str(spec.threads)
        import backends  # noqa: F401
        return
    import torch
    import transformers  # noqa: F401

    if spec.threads:
        torch.set_num_threads(spec.threads)


PROGRESS = "@progress "  # a child's stderr line the parent shows as it comes


def report_progress(text: str) -> None:
    print(PROGRESS + text, file=sys.stderr, flush=True)
