"""Our torch backend against llama.cpp and transformers on the same GGUF files, in one command.

    python bench/run.py                                   # everything, then bench/runs/<time>.json
    python bench/run.py --models 135m --engines ours,llamacpp -p 32,128 --results bench/RESULTS.md

Each (model, engine, prompt length) is measured by app.bench's loop in its own fresh process,
one after another (never in parallel: the machine has 2 cores). llama-cpp-python is
pip-installed into bench/.deps by the harness itself, in the background while the 3B F16
file is written; the 3B-shaped files are made once into bench/models/ (see make_models.py).
No measurement starts before the preparation is done.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

from app.bench import (  # noqa: E402
    QUIET_CORES, BenchError, CpuMeter, Spec, child_env, format_table, machine_info, parse_lengths, prompt_ids_for,
    run_in_subprocess, summarize,
)
from deps import env_with, start_install, wait_install  # noqa: E402

MODELS = {  # None: the SmolLM2 file; the rest are 3B-shaped files llama.cpp's quantizer makes (make_models.py)
    "135m": None, "3b-q4km": "Q4_K_M", "3b-q8": "Q8_0", "3b-f16": "F16", "3b-q5km": "Q5_K_M", "3b-q3km": "Q3_K_M",
    "3b-q2k": "Q2_K", "3b-q5_0": "Q5_0", "3b-q5_1": "Q5_1", "3b-iq4nl": "IQ4_NL", "3b-iq4xs": "IQ4_XS",
}  # fmt: skip
ENGINES = ("ours", "llamacpp", "transformers")
PEER_DEPS = {"llamacpp": "llamacpp", "transformers": "accelerate"}  # bench/deps.py packages each peer imports
KV_BYTES = 2  # our CPU engine keeps keys and values in f16, as llama.cpp



def log(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def smollm2_path() -> Path:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_smollm2.py")], capture_output=True,
                         text=True, check=True)
    return Path(out.stdout.strip())


def model_dims(path: Path) -> dict:
    from backends.checkpoint import open_checkpoint

    c = open_checkpoint(path).config
    return {"layers": c.num_layers, "kv_heads": c.num_kv_heads, "head_dim": c.head_dim}


def kv_cache_mb(dims: dict, tokens: int) -> float:
    return 2 * dims["layers"] * dims["kv_heads"] * dims["head_dim"] * tokens * KV_BYTES / 2**20


def wait_for_quiet(max_s: float) -> float:
    """Wait (up to max_s) until other processes use under QUIET_CORES for 3 s; return the last reading."""
    deadline = time.perf_counter() + max_s
    while True:
        with CpuMeter() as meter:
            time.sleep(3)
        if meter.others_cores < QUIET_CORES or time.perf_counter() > deadline:
            return meter.others_cores


def measure_engine(engine: str, model: Path, ids: list[int], lengths: list[int], args) -> dict:
    samples = []
    for length in lengths:
        if args.wait_quiet > 0 and (busy := wait_for_quiet(args.wait_quiet)) >= QUIET_CORES:
            log(f"  still {busy:.2f} cores busy elsewhere after waiting {args.wait_quiet:.0f} s: measuring anyway")
        spec = Spec(engine, str(model), ids, length, args.first_token_len, args.n_gen, args.reps, args.threads)
        log(f"{engine} on {model.name}: prompt {length} + {args.n_gen} tokens, {args.reps} reps after a warm-up")
        if engine == "ours":  # exactly what `smollm3 bench` runs
            cmd = [sys.executable, "-m", "app.bench", "--worker"]
        else:
            cmd = [sys.executable, str(BENCH / "engines.py")]
        env = child_env() if engine == "ours" else env_with(PEER_DEPS[engine])
        t0 = time.perf_counter()
        sample = run_in_subprocess(cmd, spec, args.timeout, env=env)
        log(f"  load {sample['load_s']:.2f} s, TTFT {sample['ttft_s']:.3f} s, prefill {sample['prefill_tok_s']:.1f} "
            f"tok/s, decode {sample['decode_tok_s']:.2f} tok/s, peak RSS {sample['peak_rss_mb']:.0f} MiB, "
            f"busy elsewhere {sample['others_cores']:.2f} cores ({time.perf_counter() - t0:.0f} s)")
        samples.append(sample)
    return {"samples": samples, "summary": summarize(samples)}


def ratios(ours: dict, peer: dict) -> dict:
    """ours / peer for every headline metric and every prompt length."""
    out = {k: ours[k] / peer[k] for k in ("load_s", "load_first_token_s", "peak_rss_mb")}
    for p, t in ours["tests"].items():
        if p in peer["tests"]:
            for k in ("prefill_tok_s", "decode_tok_s", "ttft_s", "best_prefill_tok_s", "best_decode_tok_s"):
                out[f"{k}@{p}"] = t[k] / peer["tests"][p][k]
    return out


def check_targets(key: str, model: dict, ours: dict, peer: dict) -> list[tuple[str, str, str, bool]]:
    """(metric, target, what we got, met) rows; prefill at the longest prompt, decode at the shortest."""
    tests = sorted(ours["tests"], key=int)
    longest, shortest = tests[-1], tests[0]
    r = ratios(ours, peer)
    prefill_bound = 1.5 if key == "135m" else 1.0
    budget = model["size_mb"] + model["kv_mb"] + 512
    rows = [
        (f"decode tok/s (p={shortest})", ">= 1.00x",
         f"{r[f'decode_tok_s@{shortest}']:.2f}x (best runs: {r[f'best_decode_tok_s@{shortest}']:.2f}x)",
         r[f"decode_tok_s@{shortest}"] >= 1.0),
        (f"prefill tok/s (p={longest})", f">= {prefill_bound:.2f}x",
         f"{r[f'prefill_tok_s@{longest}']:.2f}x (best runs: {r[f'best_prefill_tok_s@{longest}']:.2f}x)",
         r[f"prefill_tok_s@{longest}"] >= prefill_bound),
        ("peak RSS", f"<= {budget:.0f} MiB (file {model['size_mb']:.0f} + KV {model['kv_mb']:.0f} + 512)",
         f"{ours['peak_rss_mb']:.0f} MiB", ours["peak_rss_mb"] <= budget),
        ("load + first token", f"<= {peer['load_first_token_s']:.2f} s (llama.cpp)",
         f"{ours['load_first_token_s']:.2f} s ({r['load_first_token_s']:.2f}x)", r["load_first_token_s"] <= 1.0),
    ]
    return rows


def merge_runs(old: dict, new: dict) -> dict:
    """`old` with every (model, engine, prompt length) that `new` measured replaced by the new sample."""
    merged = {**old, "models": {**old["models"], **new["models"]}, "machine": new["machine"]}
    merged["argv"] = old["argv"] if old["argv"] and isinstance(old["argv"][0], list) else [old["argv"]]
    merged["argv"] = merged["argv"] + [new["argv"]]
    cells = {(r["model"], r["engine"]): {s["prompt_len"]: s for s in r["samples"]} for r in old["results"]}
    for r in new["results"]:
        cells.setdefault((r["model"], r["engine"]), {}).update({s["prompt_len"]: s for s in r["samples"]})
    merged["results"] = [{"model": m, "engine": e, "samples": [by_len[p] for p in sorted(by_len)]}
                         for (m, e), by_len in cells.items()]
    merged["lengths"] = sorted({s["prompt_len"] for r in merged["results"] for s in r["samples"]})
    merged["wall_s"] = old.get("wall_s", 0.0)
    merged.pop("partial", None)
    merged["failures"] = new.get("failures", [])
    return merged


def complete(run: dict) -> None:
    """Summaries, versions, contention, and ours / llama.cpp ratios and targets, from the samples."""
    run["versions"], run["loadavgs"], run["others"] = {}, [], []
    summaries: dict[str, dict] = {}
    for r in run["results"]:
        r["summary"] = summarize(r["samples"])
        summaries.setdefault(r["model"], {})[r["engine"]] = r["summary"]
        info = r["summary"]["engine_info"]
        run["versions"][r["engine"]] = info.get("version")
        if info.get("torch"):
            run["versions"]["torch"] = info["torch"]
        run["loadavgs"] += [s["loadavg"][0] for s in r["samples"]]
        run["others"] += [s["others_cores"] for s in r["samples"]]
    for key, model in run["models"].items():
        longest = max(s["prompt_len"] for r in run["results"] if r["model"] == key for s in r["samples"])
        if "dims" in model:  # (runs written before dims were recorded carry kv_mb already)
            model["kv_mb"] = kv_cache_mb(model["dims"], longest + run["n_gen"])
        pair = summaries.get(key, {})
        if "ours" in pair and "llamacpp" in pair:
            model["ratios"] = ratios(pair["ours"], pair["llamacpp"])
            model["targets"] = check_targets(key, model, pair["ours"], pair["llamacpp"])


def report_markdown(run: dict) -> str:
    m = run["machine"]
    argvs = run["argv"] if run["argv"] and isinstance(run["argv"][0], list) else [run["argv"]]
    commands = " then ".join(f"`python bench/run.py {' '.join(a)}`" for a in argvs)
    v = {**run["versions"], "llamacpp": run["versions"].get("llamacpp", "-"),
         "transformers": run["versions"].get("transformers", "-")}
    lines = [
        "# Benchmark: our torch backend vs llama.cpp and transformers",
        "",
        f"Generated by {commands} on {run['started']} ({run['wall_s'] / 60:.0f} min).",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']:.0f} GB RAM, {m['platform']}, Python {m['python']}",
        f"- Versions: smollm3 {v.get('ours')}, torch {v.get('torch')}, llama-cpp-python {v['llamacpp']}, "
        f"transformers {v['transformers']}",
        f"- Protocol: {run['threads']} threads, greedy, EOS ignored; prompt lengths {run['lengths']} of real text "
        f"(the same token ids for every engine), {run['n_gen']} generated tokens; each prompt length in a fresh "
        f"process: load, a cold first token on the {run['lengths'][0]}-token prompt, a warm-up run, then the median "
        f"of {run['reps']} runs. Load and load + first token are medians over those processes; peak RSS is the "
        "largest VmHWM.",
        f"- Contention (the machine is shared): load average (1 min) seen by the measuring processes "
        f"{min(run['loadavgs']):.2f} to {max(run['loadavgs']):.2f}; CPU that other processes used during the "
        f"counted runs, in cores: median {statistics.median(run['others']):.2f}, max {max(run['others']):.2f} "
        f"(column \"busy elsewhere\"). A run with more than {QUIET_CORES} cores busy elsewhere is repeated (up to "
        "twice the repetitions) and the median taken over the quiet ones when enough are quiet; \"best runs\" "
        "ratios use each engine's fastest run.",
        "",
        "## Results",
        "",
    ]
    rows = [(r["model"], r["engine"], r["summary"]) for r in run["results"]]
    lines += [format_table(rows), ""]
    lines += [f"Failed: {f}" for f in run.get("failures", [])] + ([""] if run.get("failures") else [])
    for key, model in run["models"].items():
        if not model.get("ratios"):
            continue
        lines += [f"### {key}: {model['file']} ({model['size_mb']:.0f} MiB), ours / llama.cpp", "",
                  "| metric | target | ours | met |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {'yes' if ok else '**no**'} |" for a, b, c, ok in model["targets"]]
        lines += ["", "All ratios (ours / llama.cpp; speeds: higher is better, times and RSS: lower is better): "
                  + ", ".join(f"{k} {x:.2f}" for k, x in model["ratios"].items()), ""]
    return "\n".join(lines)


def write_results(path: Path, markdown: str) -> None:
    """Replace the generated part of RESULTS.md; keep everything from a `## Notes` heading on."""
    notes = ""
    if path.exists():
        text = path.read_text()
        if (i := text.find("\n## Notes")) >= 0:
            notes = text[i:]
    path.write_text(markdown.rstrip() + "\n" + notes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="135m,3b-q4km,3b-q8",
                   help=f"from {', '.join(MODELS)} (default: the first three)")
    p.add_argument("--engines", default=",".join(ENGINES), help="ours, llamacpp, transformers (default: all)")
    p.add_argument("-p", "--prompt-lengths", default="32,128,512", help="default: 32,128,512")
    p.add_argument("-n", "--n-gen", type=int, default=32, help="generated tokens per run (default: 32)")
    p.add_argument("-r", "--reps", type=int, default=3, help="timed runs per test after a warm-up (default: 3)")
    p.add_argument("-t", "--threads", type=int, default=2, help="threads for every engine (default: 2)")
    p.add_argument("--transformers-on-3b", action="store_true", help="also run transformers on the 3B files (slow)")
    p.add_argument("--out", type=Path, help="raw results JSON (default: bench/runs/<time>.json)")
    p.add_argument("--results", type=Path, help="write the Markdown report here too (e.g. bench/RESULTS.md)")
    p.add_argument("--merge", type=Path,
                   help="a previous run's JSON: keep its measurements except those this run repeats (to redo a "
                        "contended cell, e.g. --models 3b-q4km --engines ours -p 512)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per measuring process")
    p.add_argument("--wait-quiet", type=float, default=120,
                   help="before each measuring process, wait up to this many seconds for other processes to go "
                        "quiet (default: 120; 0: never wait)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if bad := [m for m in models if m not in MODELS] + [e for e in engines if e not in ENGINES]:
        raise BenchError(f"unknown model or engine: {', '.join(bad)}")
    lengths = parse_lengths(args.prompt_lengths)
    old = json.loads(args.merge.read_text()) if args.merge else None
    if old and old["n_gen"] != args.n_gen:
        raise BenchError(f"--merge: that run generated {old['n_gen']} tokens per run, this one -n {args.n_gen}")
    # The cold first token is always timed on the same prompt, so load + first token stays comparable.
    args.first_token_len = old["lengths"][0] if old else lengths[0]
    started, t_start = datetime.now(), time.perf_counter()
    with_transformers = "transformers" in engines and ("135m" in models or args.transformers_on_3b)
    needed = ["llamacpp"] * ("llamacpp" in engines or any(MODELS[m] for m in models))
    needed += ["accelerate"] * with_transformers
    installs = {name: start_install(name) for name in needed}
    if installs.get("llamacpp"):
        log("installing llama-cpp-python into bench/.deps in the background (it builds llama.cpp: minutes)")

    # Preparation first, measurements after: nothing else of ours runs while an engine is timed.
    smollm2 = smollm2_path()
    paths = {key: smollm2 for key in models if MODELS[key] is None}
    quantized = [MODELS[key] for key in models if MODELS[key]]
    if quantized:
        from make_models import ensure_f16, ensure_models

        ensure_f16(smollm2, log=log)  # needs no llama.cpp: overlaps its build
    for name, proc in installs.items():
        if proc is not None:
            log(f"waiting for the {name} install")
        wait_install(name, proc)
    if quantized:
        made = ensure_models(quantized, smollm2, args.threads, log=log)
        paths.update({key: made[MODELS[key]] for key in models if MODELS[key]})

    out = args.out or BENCH / "runs" / f"{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    run = {"argv": argv, "started": f"{started:%Y-%m-%d %H:%M}", "machine": machine_info(), "lengths": lengths,
           "n_gen": args.n_gen, "reps": args.reps, "threads": args.threads, "models": {}, "results": []}
    for key in models:
        path = paths[key]
        ids = prompt_ids_for(str(path), max(lengths[-1], args.first_token_len))
        run["models"][key] = {"file": path.name, "path": str(path), "size_mb": path.stat().st_size / 2**20,
                              "dims": model_dims(path)}
        for engine in engines:
            if engine == "transformers" and key != "135m" and not args.transformers_on_3b:
                continue
            try:
                result = measure_engine(engine, path, ids, lengths, args)
            except (BenchError, subprocess.TimeoutExpired) as e:  # keep the other engines' results
                log(f"  {e}")
                run.setdefault("failures", []).append(f"{engine} on {key}: {e}")
                continue
            run["results"].append({"model": key, "engine": engine, "samples": result["samples"]})
            out.write_text(json.dumps({**run, "partial": True}, indent=1))  # a stopped run keeps what it measured
    if old:
        run = merge_runs(old, run)
    complete(run)
    run["wall_s"] = run.get("wall_s", 0.0) + time.perf_counter() - t_start
    out.write_text(json.dumps(run, indent=1))
    markdown = report_markdown(run)
    print(markdown)
    if args.results:
        write_results(args.results, markdown)
    log(f"raw results in {out}" + (f", report in {args.results}" if args.results else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (BenchError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"bench/run.py: error: {e}", file=sys.stderr)
        sys.exit(2)
