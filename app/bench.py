"""`smollm3 bench`: load time, time to first token, prefill and decode speed, peak RSS.

Like llama-bench: fixed prompt lengths (-p 32,128,512) built from token ids of a real text,
a fixed number of generated tokens (-n 32, EOS ignored), greedy, the median of a few
repetitions after a warm-up. The machine may be shared: each run measures the CPU other
processes used meanwhile, a contended run is repeated (up to twice the repetitions), and the
median is taken over the quiet runs when there are enough of them.

Each prompt length runs in a fresh process, because load time and peak RSS are only honest
in a process that has done nothing else; every such process also times a cold first token
on the shortest prompt, so "load + first token" has as many samples as prompt lengths.

The measuring loop (`measure`) takes any engine adapter, so the cross-engine harness in
bench/ measures llama.cpp and transformers with the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

# A public-domain paragraph (Darwin, On the Origin of Species, ch. III), repeated to the
# prompt length: real text gives real token ids, unlike random ids.
PROMPT_TEXT = (
    "It is good thus to try in our imagination to give any form some advantage over another. "
    "Probably in no single instance should we know what to do, so as to succeed. It will "
    "convince us of our ignorance on the mutual relations of all organic beings; a conviction "
    "as necessary as it seems to be difficult to acquire. All that we can do, is to keep "
    "steadily in mind that each organic being is striving to increase at a geometrical ratio; "
    "that each at some period of its life, during some season of the year, during each "
    "generation or at intervals, has to struggle for life, and to suffer great destruction. "
    "When we reflect on this struggle, we may console ourselves with the full belief, that the "
    "war of nature is not incessant, that no fear is felt, that death is generally prompt, and "
    "that the vigorous, the healthy, and the happy survive and multiply.\n\n"
)


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


def measure(adapter: BenchAdapter, spec: Spec, import_s: float) -> Sample:
    with CpuMeter() as load_meter:
        t0 = time.perf_counter()
        adapter.load()
        load_s = time.perf_counter() - t0
        rss_after_load, _ = rss_mb()
        first_token_s, _, _ = adapter.generate(spec.prompt_ids[: spec.first_token_len], 1)
    ids = spec.prompt_ids[: spec.prompt_len]
    adapter.generate(ids, spec.n_gen)  # warm-up: caches, compiled kernels, allocator
    runs = []  # (ttft, decode tok/s, others' cores); repeated while contended, up to twice the repetitions
    while len(runs) < 2 * spec.reps and sum(r[2] < QUIET_CORES for r in runs) < spec.reps:
        with CpuMeter() as meter:
            ttft, decode_s, steps = adapter.generate(ids, spec.n_gen)
        runs.append((ttft, steps / decode_s if decode_s > 0 else 0.0, meter.others_cores))
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
        from backends import settings

        i = self.engine.info
        return {"engine": "ours", "backend": i.backend, "device": i.device, "dtype": i.dtype,
                "weight_type": i.weight_type, "version": _our_version(), "torch": _torch_version(),
                "threads": _torch_threads(), "kernels": settings.kernels(),
                "backends_module": Path(backends.__file__).parent.name}


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
    sample = measure(OursAdapter(spec), spec, import_s)
    Path(out_path).write_text(json.dumps(asdict(sample)))
    return 0


# --- the parent: prompts, one process per measurement, the table ---


def prompt_ids_for(model_path: str, length: int, tokenizer_path: str | None = None) -> list[int]:
    """`length` token ids of PROMPT_TEXT repeated, from the checkpoint's own tokenizer (no torch import)."""
    from backends import load_tokenizer
    from backends.checkpoint import open_checkpoint
    from backends.numbers import ceil_div

    tok = load_tokenizer(open_checkpoint(model_path), tokenizer_path)
    paragraph = tok.encode(PROMPT_TEXT)
    repeats = ceil_div(length, len(paragraph))
    return (paragraph * repeats)[:length]


def run_in_subprocess(cmd: list[str], spec: Spec, timeout_s: float | None = None, env: dict | None = None) -> dict:
    """Run `cmd + [spec.json, out.json]` in a fresh process; return its Sample dict."""
    with tempfile.TemporaryDirectory(prefix="smollm3-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        proc = subprocess.run([*cmd, str(spec_path), str(out_path)], capture_output=True, text=True,
                              timeout=timeout_s, env=env)
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
            raise BenchError(f"{spec.engine} on {Path(spec.model_path).name} (p={spec.prompt_len}) failed "
                             f"(exit {proc.returncode}): " + " | ".join(tail))
        return json.loads(out_path.read_text())


class BenchError(Exception):
    pass


TEST_KEYS = ("ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "others_cores", "best_prefill_tok_s",
             "best_decode_tok_s")


def summarize(samples: list[dict]) -> dict:
    """One engine on one model: medians across processes, peak RSS as the max."""
    loads = [s["load_s"] for s in samples]
    firsts = [s["load_s"] + s["first_token_s"] for s in samples]
    return {
        "load_s": statistics.median(loads),
        "load_first_token_s": statistics.median(firsts),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in samples),
        "import_s": statistics.median(s["import_s"] for s in samples),
        "load_others_cores": max(s["load_others_cores"] for s in samples),
        "tests": {s["prompt_len"]: {k: s[k] for k in TEST_KEYS} for s in samples},
        "loadavg": [s["loadavg"] for s in samples],
        "engine_info": samples[0]["engine_info"],
    }


def format_table(rows: list[tuple[str, str, dict]]) -> str:
    """rows: (model, engine, summary) -> a Markdown table, one line per prompt length.

    "busy elsewhere": CPU cores other processes used during the counted runs (2 cores here)."""
    lines = ["| model | engine | load s | load + 1st token s | prompt | TTFT s | prefill tok/s | decode tok/s "
             "| peak RSS MiB | busy elsewhere |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for model, engine, s in rows:
        for i, (p, t) in enumerate(sorted(s["tests"].items(), key=lambda kv: int(kv[0]))):
            head = (model, engine, f"{s['load_s']:.2f}", f"{s['load_first_token_s']:.2f}") if i == 0 else ("",) * 4
            cells = (*head, str(p), f"{t['ttft_s']:.3f}", f"{t['prefill_tok_s']:.1f}", f"{t['decode_tok_s']:.2f}",
                     f"{t['peak_rss_mb']:.0f}", f"{t['others_cores']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise BenchError(f"-p/--n-prompt takes comma-separated integers, got {text!r}") from None
    if not lengths or lengths[0] < 1:
        raise BenchError(f"-p/--n-prompt needs positive lengths, got {text!r}")
    return lengths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smollm3 bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True, help="a local .gguf file or Hugging Face model directory")
    p.add_argument("--backend", choices=("auto", "torch", "mlx"), default="auto")
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:N, mps (default: the best available)")
    p.add_argument("--dtype", choices=("auto", "f32", "f16", "bf16"), default="auto")
    p.add_argument("-p", "--n-prompt", default="32,128,512", help="prompt lengths in tokens (default: 32,128,512)")
    p.add_argument("-n", "--n-gen", type=int, default=32, help="tokens to generate per run (default: 32)")
    p.add_argument("-r", "--repetitions", type=int, default=3, help="timed runs per test, after a warm-up (default: 3)")
    p.add_argument("-t", "--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per measuring process")
    return p


def bench_main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed usage or help
        return int(e.code or 0)
    try:
        lengths = parse_lengths(args.n_prompt)
        if args.n_gen < 2 or args.repetitions < 1:
            raise BenchError("-n must be at least 2 (a decode step needs a token before it) and -r at least 1")
        model = Path(args.model_path)
        if not model.exists():
            raise BenchError(f"no such file or directory: {model}")
        ids = prompt_ids_for(str(model), lengths[-1])
        samples = []
        for length in lengths:
            spec = Spec("ours", str(model), ids, length, lengths[0], args.n_gen, args.repetitions, args.threads,
                        args.backend, args.device, args.dtype)
            print(f"bench: {model.name} prompt {length} + {args.n_gen} tokens ...", file=sys.stderr, flush=True)
            samples.append(run_in_subprocess([sys.executable, "-m", "app.bench", "--worker"], spec, args.timeout,
                                             env=child_env()))
    except Exception as e:  # BenchError, SmolLMError from the tokenizer, a timeout: one line for the user
        print(f"smollm3 bench: error: {e}", file=sys.stderr)
        return 2
    summary = summarize(samples)
    info = summary["engine_info"]
    engine = f"{info['backend']} {info['device']} {info['dtype']}"
    size_mb = _size_mb(model)
    print(f"{model.name}: {info['weight_type']}, {size_mb:.0f} MiB; {engine}, {info['threads']} threads; "
          f"smollm3 {info['version']}, torch {info['torch']}; load avg {os.getloadavg()[0]:.2f}")
    print(format_table([(model.name, engine, summary)]))
    if args.json_path:
        report = {"model": str(model), "size_mb": size_mb, "n_gen": args.n_gen, "repetitions": args.repetitions,
                  "machine": machine_info(), "summary": summary, "samples": samples}
        Path(args.json_path).write_text(json.dumps(report, indent=1))
    return 0


def child_env() -> dict:
    """The child imports `app` and `backends` from this checkout, wherever the command runs from."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _size_mb(path: Path) -> float:
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / 2**20


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    ram_gb = None
    try:
        ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram_gb, "platform": platform.platform(),
            "python": platform.python_version()}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(run_worker(sys.argv[2], sys.argv[3]))
    sys.exit(bench_main(sys.argv[1:]))
