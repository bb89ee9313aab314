"""`smollm3 bench`: load time, time to first token, prefill and decode speed, peak RSS.

Like llama-bench: fixed prompt lengths (-p 32,128,512) built from token ids of a real text,
a fixed number of generated tokens (-n 32, EOS ignored), greedy, the median of a few
repetitions after a warm-up. The machine may be shared: each run measures the CPU other
processes used meanwhile, a contended run is repeated (up to twice the repetitions), and the
median is taken over the quiet runs when there are enough of them.

Each prompt length runs in a fresh process, because load time and peak RSS are only honest
in a process that has done nothing else; every such process also times a cold first token
(the first generate after load) on its own prompt: cold prefill at each length, and "load +
first token" on the shortest.

`--compare llama.cpp` measures llama-cpp-python the same way on the same token ids and prints
ours / llama.cpp against the project's targets (app/bench_compare.py). The measuring loop
(`measure`, in app/bench_measure.py) takes any engine adapter, so the cross-engine harness in
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
import threading
from dataclasses import asdict
from pathlib import Path

from .bench_compare import format_targets, llamacpp_missing, ratios, target_rows
from .bench_measure import (  # noqa: F401  (bench/ imports the measuring side from here)
    PROGRESS, QUIET_CORES, BenchAdapter, CpuMeter, Sample, Spec, measure, rss_mb, run_worker,
)

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


def run_in_subprocess(cmd: list[str], spec: Spec, timeout_s: float | None = None, env: dict | None = None,
                      on_progress=None) -> dict:
    """Run `cmd + [spec.json, out.json]` in a fresh process; return its Sample dict.

    on_progress(text) gets the child's progress lines (report_progress) as they come."""
    with tempfile.TemporaryDirectory(prefix="smollm3-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        with open(Path(tmp) / "stdout", "w+") as stdout:
            proc = subprocess.Popen([*cmd, str(spec_path), str(out_path)], stdout=stdout, stderr=subprocess.PIPE,
                                    text=True, env=env)
            timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
            if timer:
                timer.start()
            errors = []
            for line in proc.stderr:
                if line.startswith(PROGRESS):
                    if on_progress:
                        on_progress(line[len(PROGRESS):].rstrip("\n"))
                else:
                    errors.append(line)
            code = proc.wait()
            if timer:
                timer.cancel()
            stdout.seek(0)
            output = "".join(errors) or stdout.read()
        if code != 0 or not out_path.exists():
            tail = output.strip().splitlines()[-8:]
            killed = f"killed after {timeout_s:.0f} s" if timer and code < 0 else f"exit {code}"
            raise BenchError(f"{spec.engine} on {Path(spec.model_path).name} (p={spec.prompt_len}) failed "
                             f"({killed}): " + " | ".join(tail))
        return json.loads(out_path.read_text())


class BenchError(Exception):
    pass


TEST_KEYS = ("ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "others_cores", "best_prefill_tok_s",
             "best_decode_tok_s")


def summarize(samples: list[dict]) -> dict:
    """One engine on one model: medians across processes, peak RSS as the max.

    Every process times a cold first token (the first generate after load) on its first_token_len
    prompt; processes with no warm runs (decode_steps 0) only do that. "cold" holds the median per
    prompt length, and load + first token is taken on the shortest such prompt."""
    warm = [s for s in samples if s["decode_steps"] > 0] or samples
    firsts = [s.get("first_token_len", warm[0]["prompt_len"]) for s in samples]
    cold: dict[int, list[float]] = {}
    for s, n in zip(samples, firsts):
        cold.setdefault(n, []).append(s["first_token_s"])
    shortest = min(firsts)
    return {
        "load_s": statistics.median(s["load_s"] for s in samples),
        "load_first_token_s": statistics.median(s["load_s"] + s["first_token_s"]
                                                for s, n in zip(samples, firsts) if n == shortest),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in warm),
        "import_s": statistics.median(s["import_s"] for s in samples),
        "load_others_cores": max(s["load_others_cores"] for s in samples),
        "tests": {s["prompt_len"]: {k: s[k] for k in TEST_KEYS} for s in warm},
        "cold": {n: {"ttft_s": statistics.median(t), "prefill_tok_s": n / statistics.median(t), "runs": len(t)}
                 for n, t in sorted(cold.items())},
        "loadavg": [s["loadavg"] for s in samples],
        "engine_info": samples[0]["engine_info"],
    }


def format_table(rows: list[tuple[str, str, dict]]) -> str:
    """rows: (model, engine, summary) -> a Markdown table, one line per prompt length.

    "cold": the first prompt after load, in a fresh process (median over such processes);
    "busy elsewhere": CPU cores other processes used during the counted runs."""
    lines = ["| model | engine | load s | load + 1st token s | prompt | TTFT s | prefill tok/s | cold prefill tok/s "
             "| decode tok/s | peak RSS MiB | busy elsewhere |", "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for model, engine, s in rows:
        cold = {int(n): c for n, c in s.get("cold", {}).items()}
        for i, (p, t) in enumerate(sorted(s["tests"].items(), key=lambda kv: int(kv[0]))):
            head = (model, engine, f"{s['load_s']:.2f}", f"{s['load_first_token_s']:.2f}") if i == 0 else ("",) * 4
            c = cold.get(int(p))
            cells = (*head, str(p), f"{t['ttft_s']:.3f}", f"{t['prefill_tok_s']:.1f}",
                     f"{c['prefill_tok_s']:.1f}" if c else "-", f"{t['decode_tok_s']:.2f}",
                     f"{t['peak_rss_mb']:.0f}", f"{t['others_cores']:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_summary(s: dict) -> str:
    """One engine on one model for the terminal (fits 100 columns): load figures, then a table."""
    lines = [f"load {s['load_s']:.2f} s, load + first token {s['load_first_token_s']:.2f} s "
             f"(medians of {len(s['tests'])} processes); peak RSS {s['peak_rss_mb']:.0f} MiB", "",
             "| prompt | TTFT s | prefill tok/s | decode tok/s | peak RSS MiB | busy elsewhere |",
             "|--:|--:|--:|--:|--:|--:|"]
    for p, t in sorted(s["tests"].items(), key=lambda kv: int(kv[0])):
        cells = (str(p), f"{t['ttft_s']:.3f}", f"{t['prefill_tok_s']:.1f}", f"{t['decode_tok_s']:.2f}",
                 f"{t['peak_rss_mb']:.0f}", f"{t['others_cores']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("busy elsewhere: CPU cores other processes used meanwhile (runs with more are repeated)")
    return "\n".join(lines)


def show_progress(text: str) -> None:
    print(f"bench:   {text}", file=sys.stderr, flush=True)


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise BenchError(f"-p/--n-prompt takes comma-separated integers, got {text!r}") from None
    if not lengths or lengths[0] < 1:
        raise BenchError(f"-p/--n-prompt needs positive lengths, got {text!r}")
    return lengths


class BenchParser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise BenchError(f"{message} (see smollm3 bench --help)")


def build_parser() -> argparse.ArgumentParser:
    from backends import BACKENDS

    from .cli import number

    p = BenchParser(prog="smollm3 bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True, help="a local .gguf file or Hugging Face model directory")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:N, mps (default: the best available)")
    p.add_argument("--dtype", choices=("auto", "f32", "f16", "bf16"), default="auto")
    p.add_argument("-p", "--n-prompt", default="32,128,512", help="prompt lengths in tokens (default: 32,128,512)")
    # At least 2: a decode step needs a generated token before it.
    p.add_argument("-n", "--n-gen", type=number(int, minimum=2), default=32,
                   help="tokens to generate per run (default: 32)")
    p.add_argument("-r", "--repetitions", type=number(int, minimum=1), default=3,
                   help="timed runs per test, after a warm-up (default: 3)")
    p.add_argument("-t", "--threads", type=number(int, minimum=1), help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--compare", choices=("llama.cpp",),
                   help="also measure llama-cpp-python on the same file and token ids, and print ours / llama.cpp "
                        "with the project's targets (speculation off: both decode one token per forward)")
    p.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    p.add_argument("--timeout", type=number(float, above=0), default=3600,
                   help="seconds allowed per measuring process (default: 3600)")
    return p


def bench_main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
        lengths = parse_lengths(args.n_prompt)
        model = Path(args.model_path)
        if not model.exists():
            raise BenchError(f"no such file or directory: {model}")
        if args.compare and (why := llamacpp_missing()):
            raise BenchError(why)
        engines = ("ours", "llamacpp") if args.compare else ("ours",)
        ids = prompt_ids_for(str(model), lengths[-1])
        samples: dict[str, list[dict]] = {e: [] for e in engines}
        for i, length in enumerate(lengths):
            for engine in engines:  # alternating, so a change in the machine's load falls on both
                # Each process's first generate (cold) is on its own prompt: cold prefill at every length.
                spec = Spec(engine, str(model), ids, length, length, args.n_gen, args.repetitions, args.threads,
                            args.backend, args.device, args.dtype)
                print(f"bench: {engine}, prompt {length} + {args.n_gen} tokens, in a fresh process ({i + 1} of "
                      f"{len(lengths)})", file=sys.stderr, flush=True)
                samples[engine].append(run_in_subprocess(
                    [sys.executable, "-m", "app.bench", "--worker"], spec, args.timeout,
                    env=child_env(speculate="0" if args.compare else None), on_progress=show_progress))
    except Exception as e:  # BenchError, SmolLMError from the tokenizer, a timeout: one line for the user
        print(f"smollm3 bench: error: {e}", file=sys.stderr)
        return 2
    summaries = {e: summarize(samples[e]) for e in engines}
    info = summaries["ours"]["engine_info"]
    engine = f"{info['backend']} {info['device']} {info['dtype']}"
    size_mb = _size_mb(model)
    print(f"{model.name}: {info['weight_type']}, {size_mb:.0f} MiB, on {engine} with {info['threads']} threads")
    print(f"smollm3 {info['version']}, torch {info['torch']}; load average {os.getloadavg()[0]:.2f}")
    if args.compare:
        peer = summaries["llamacpp"]["engine_info"]
        print(f"llama-cpp-python {peer['version']}, {peer['threads']} threads, {peer['gpu_layers']} layers offloaded "
              f"(-1: all); {peer['system_info']}")
        print(format_table([(model.name, {"llamacpp": "llama.cpp"}.get(e, e), summaries[e]) for e in engines]))
        print()
        print(format_targets(target_rows(summaries["ours"], summaries["llamacpp"])))
    else:
        print(format_summary(summaries["ours"]))
    if args.json_path:
        report = {"model": str(model), "size_mb": size_mb, "n_gen": args.n_gen, "repetitions": args.repetitions,
                  "machine": machine_info(), "summary": summaries["ours"], "samples": samples["ours"]}
        if args.compare:
            report["llamacpp"] = {"summary": summaries["llamacpp"], "samples": samples["llamacpp"]}
            report["ratios"] = ratios(summaries["ours"], summaries["llamacpp"])
        Path(args.json_path).write_text(json.dumps(report, indent=1))
    return 0


def child_env(speculate: str | None = None) -> dict:
    """The child imports `app` and `backends` from this checkout, wherever the command runs from.

    speculate: SMOLLM3_SPECULATE for the child ("0": plain decoding, as the peers do)."""
    env = dict(os.environ)
    if speculate is not None:
        env["SMOLLM3_SPECULATE"] = speculate
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
            "python": platform.python_version(), "flags": cpu_flags()}


# The CPU features our kernels and llama.cpp's pick paths by (x86; ARM's show as asimd/dotprod/i8mm).
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm")


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return [f for f in KERNEL_FLAGS if f in flags]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] in ("--worker", "--worker-long"):
        sys.exit(run_worker(sys.argv[2], sys.argv[3], long=sys.argv[1] == "--worker-long"))
    sys.exit(bench_main(sys.argv[1:]))
