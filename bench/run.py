"""Our engine (the backend `auto` picks: native on a CPU) against llama.cpp (and optionally transformers) on
the same GGUF files, in one command.

    python bench/run.py --results bench/RESULTS.md        # everything issue 14 asks for, ~40 min on 2 cores
    python bench/run.py --models 135m --reduced-models "" -p 32 -r 1      # a quick look (with its long and speculative rows)

What one run measures (it prints an estimate of its duration first):
- the main files (135M Q4_1, 3B-shaped Q4_K_M and Q8_0) at prompt lengths 32/128/512, each
  prompt length in a fresh process (load, a cold first token on that prompt, a warm-up, then
  the median of the repetitions), plus extra cold-only processes at the short prompts;
- the other quant types (3B-shaped Q5_K_M, Q3_K_M, Q2_K, Q5_0, Q5_1, IQ4_NL, IQ4_XS, Q6_K) at
  prompt 32 only;
- decode at a 4,096-token context (one prefill, then decode runs with the cache rewound);
- the speculative tasks (bench/speculative.py): ours plain and with speculation, llama.cpp plain;
- this machine's memory bandwidth, for the fraction of the decode ceiling each engine reaches.

Every process runs alone (the machine has 2 cores), with speculation off unless measuring it.
llama-cpp-python is pip-installed into bench/.deps by the harness itself; the 3B-shaped files
are made once into bench/models/ (see make_models.py). No measurement starts before the
preparation is done.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

from app.bench import (  # noqa: E402
    QUIET_CORES, BenchError, CpuMeter, Spec, child_env, machine_info, parse_lengths, prompt_ids_for,
    run_in_subprocess, summarize,
)
from app.bench_compare import DECODE, DECODE_SHORT, Target, ratios, target_rows  # noqa: E402
from backends.gguf_file import advise_huge_pages  # noqa: E402
from ceiling import ceiling_tok_s, gguf_tensor_bytes, kv_bytes_per_position, measure_bandwidth, weight_bytes  # noqa: E402
from deps import env_with, start_install, wait_install  # noqa: E402
from make_models import F16_NAME, MODELS_DIR, ensure_f16, ensure_models  # noqa: E402
from report import report_markdown, write_results  # noqa: E402

MODELS = {  # None: the SmolLM2 file; the rest are 3B-shaped files llama.cpp's quantizer makes (make_models.py)
    "135m": None, "3b-q4km": "Q4_K_M", "3b-q8": "Q8_0", "3b-f16": "F16", "3b-q5km": "Q5_K_M", "3b-q3km": "Q3_K_M",
    "3b-q2k": "Q2_K", "3b-q5_0": "Q5_0", "3b-q5_1": "Q5_1", "3b-iq4nl": "IQ4_NL", "3b-iq4xs": "IQ4_XS",
    "3b-q6k": "Q6_K",
}  # fmt: skip
MAIN_MODELS = "135m,3b-q4km,3b-q8"
REDUCED_MODELS = "3b-q5km,3b-q3km,3b-q2k,3b-q5_0,3b-q5_1,3b-iq4nl,3b-iq4xs,3b-q6k"
LONG_MODELS = SPEC_MODELS = "135m,3b-q4km"
SPECULATIVE = 1.5  # speculative decode tok/s over our plain decode, per task
ENGINES = ("ours", "llamacpp", "transformers")
PEER_DEPS = {"ours": (), "llamacpp": ("llamacpp",), "transformers": ("accelerate",)}  # bench/deps.py packages
# Bits per weight of each file type, and the rates the estimate assumes (this machine, 2 threads).
BITS_PER_WEIGHT = {None: 5.0, "Q4_K_M": 4.9, "Q8_0": 8.5, "F16": 16.0, "Q5_K_M": 5.7, "Q3_K_M": 3.9, "Q2_K": 3.4,
                   "Q5_0": 5.5, "Q5_1": 6.0, "IQ4_NL": 4.5, "IQ4_XS": 4.3, "Q6_K": 6.6}  # fmt: skip
PARAMS = {"135m": 135e6, "3b": 3.08e9}
EST_BANDWIDTH = 25e9  # bytes/s a decode step streams at
EST_FLOPS = 250e9  # prefill FLOP/s
EST_PROCESS_S = 8.0  # per measuring process: the quiet check, imports, load


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


def wait_for_quiet(max_s: float) -> float:
    """Wait (up to max_s) until other processes use under QUIET_CORES for 3 s; return the last reading."""
    deadline = time.perf_counter() + max_s
    while True:
        with CpuMeter() as meter:
            time.sleep(3)
        if meter.others_cores < QUIET_CORES or time.perf_counter() > deadline:
            return meter.others_cores


def warm_page_cache(path: Path) -> None:
    """Put the file in the page cache as a user's machine holds it, so neither engine's load pays
    the disk (both map the same cached pages): dropped and read back through a mapping advised
    MADV_HUGEPAGE, in 2 MiB folios, as our engine reads a file cold and as a Hub download writes
    one (10 MiB writes). llama.cpp gains from them as much as we do on the files it maps."""
    with open(path, "rb") as f:
        if hasattr(os, "posix_fadvise"):
            os.fsync(f.fileno())  # a file just written has dirty pages, which no advice drops
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            advise_huge_pages(mapped)
            for at in range(0, len(mapped), 4096):
                mapped[at]


def run_child(engine: str, spec: Spec, args, kind: str = "bench", job: dict | None = None) -> dict:
    """One measuring process. kind: bench (a Sample), long (measure_long), tasks (speculative.py)."""
    if args.wait_quiet > 0 and (busy := wait_for_quiet(args.wait_quiet)) >= QUIET_CORES:
        log(f"  still {busy:.2f} cores busy elsewhere after waiting {args.wait_quiet:.0f} s: measuring anyway")
    if kind == "tasks":
        cmd = [sys.executable, str(BENCH / "speculative.py"), "--worker"]
    elif engine == "transformers":
        cmd = [sys.executable, str(BENCH / "engines.py")]
    else:  # exactly what `smollm3 bench` runs
        cmd = [sys.executable, "-m", "app.bench", "--worker-long" if kind == "long" else "--worker"]
    env = env_with(*PEER_DEPS[engine])
    env["SMOLLM3_SPECULATE"] = "0"  # plain decoding, as the peers; the speculative tasks switch it per run
    if job is None:
        return run_in_subprocess(cmd, spec, args.timeout, env=env)
    with tempfile.TemporaryDirectory(prefix="smollm3-bench-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([*cmd, str(job_path), str(out_path)], env=env, capture_output=True, text=True,
                              timeout=args.timeout)
        if proc.returncode != 0 or not out_path.exists():
            tail = " | ".join(proc.stderr.strip().splitlines()[-6:])
            raise BenchError(f"{engine} tasks on {Path(spec.model_path).name} failed (exit {proc.returncode}): {tail}")
        return json.loads(out_path.read_text())


def measure_model(key: str, path: Path, ids: list[int], lengths: list[int], engines: list[str], args, run: dict,
                  save) -> None:
    """Warm runs per prompt length (each with a cold first token on its own prompt), then
    args.cold_reps more cold-only processes per short prompt; engines alternate."""
    short = [p for p in lengths if p < 512]
    jobs = [(p, args.reps) for p in lengths] + [(p, 0) for _ in range(args.cold_reps) for p in short]
    for length, reps in jobs:
        for engine in engines:
            spec = Spec(engine, str(path), ids, length, length, args.n_gen, reps, args.threads, device="cpu")
            what = f"prompt {length} + {args.n_gen} tokens, {reps} reps" if reps else f"cold prompt {length}"
            log(f"{engine} on {path.name}: {what}")
            t0 = time.perf_counter()
            try:
                s = run_child(engine, spec, args)
            except (BenchError, subprocess.TimeoutExpired) as e:  # keep the other engines' results
                log(f"  {e}")
                run["failures"].append(f"{engine} on {key} ({what}): {e}")
                continue
            log(f"  load {s['load_s']:.2f} s, cold first token {s['first_token_s']:.3f} s, TTFT {s['ttft_s']:.3f} s, "
                f"decode {s['decode_tok_s']:.2f} tok/s, peak RSS {s['peak_rss_mb']:.0f} MiB, "
                f"busy elsewhere {s['others_cores']:.2f} cores ({time.perf_counter() - t0:.0f} s)")
            cell = next((r for r in run["results"] if r["model"] == key and r["engine"] == engine), None)
            if cell is None:
                cell = {"model": key, "engine": engine, "samples": []}
                run["results"].append(cell)
            cell["samples"].append(s)
            save()


def measure_long(key: str, path: Path, ids: list[int], engines: list[str], args, run: dict) -> None:
    for engine in engines:
        spec = Spec(engine, str(path), ids, args.long_context, args.long_context, args.n_gen, 0, args.threads,
                    device="cpu")
        log(f"{engine} on {path.name}: prefill {args.long_context} tokens once, decode {args.n_gen} three times")
        try:
            out = run_child(engine, spec, args, kind="long")
        except (BenchError, subprocess.TimeoutExpired) as e:
            log(f"  {e}")
            run["failures"].append(f"{engine} on {key} ({args.long_context}-token context): {e}")
            continue
        log(f"  prefill {out['prefill_s']:.1f} s, decode {out['decode_tok_s']:.2f} tok/s "
            f"({', '.join(f'{x:.2f}' for x in out['decode_all'])}), peak RSS {out['peak_rss_mb']:.0f} MiB")
        run["long"].setdefault(key, {})[engine] = out


def measure_speculative(key: str, path: Path, args, run: dict) -> None:
    """Ours (plain and speculative, alternating) renders the task prompts; llama.cpp gets the same ids."""
    result, prompts = {}, None
    for engine in ("ours", "llamacpp"):
        longest = max(prompts.values(), key=len) if prompts else []
        spec = Spec(engine, str(path), longest, len(longest), len(longest), args.spec_tokens, args.spec_runs,
                    args.threads, device="cpu")
        log(f"{engine} on {path.name}: speculative tasks, {args.spec_tokens} tokens, {args.spec_runs} run(s) each")
        try:
            out = run_child(engine, spec, args, kind="tasks", job={"spec": asdict(spec), "prompts": prompts,
                                                                   "runs": args.spec_runs})
        except (BenchError, subprocess.TimeoutExpired) as e:
            log(f"  {e}")
            run["failures"].append(f"{engine} on {key} (speculative tasks): {e}")
            return
        prompts = prompts or {name: t["ids"] for name, t in out["tasks"].items()}
        for name, t in out["tasks"].items():
            log(f"  {name}: " + ", ".join(f"{m} {t[m]['decode_tok_s']:.2f} tok/s" for m in ("plain", "speculative")
                                          if m in t))
            if t.get("identical") is False:
                run["failures"].append(f"speculation changed ours' greedy output on {key}, task {name}")
        result[engine] = out
    run["speculative"][key] = result


def estimate_s(models: dict[str, str], lengths: list[int], engines: list[str], args) -> dict[str, float]:
    """Seconds each part of the run should take on this machine (rates near bench/RESULTS.md's), a rough guide."""
    parts = dict.fromkeys(("main files", "other types", "long context", "speculative", "making files"), 0.0)
    parts["bandwidth"] = 15.0
    for key, protocol in models.items():
        params = PARAMS["135m" if key == "135m" else "3b"]
        decode = EST_BANDWIDTH / (params * BITS_PER_WEIGHT[MODELS[key]] / 8)
        prefill = EST_FLOPS / (2 * params)
        run_s = lambda p, n: p / prefill + n / decode  # noqa: E731
        lens = lengths if protocol == "full" else lengths[:1]
        per_engine = sum(EST_PROCESS_S + (args.reps + 2) * run_s(p, args.n_gen) for p in lens)
        if protocol == "full":
            per_engine += args.cold_reps * sum(EST_PROCESS_S + run_s(p, 1) for p in lens if p < 512)
        parts["main files" if protocol == "full" else "other types"] += per_engine * len(engines)
        if key in args.long_models_list:
            # attention over the long cache makes the prefill ~1.5x slower per token than a short one
            parts["long context"] += 2 * (EST_PROCESS_S + 1.5 * args.long_context / prefill + 3 * args.n_gen / decode)
        if key in args.spec_models_list:
            gens = args.spec_runs * 3 * 3 + 2  # 3 tasks x (ours plain, ours speculative, llama.cpp) + warm-ups
            parts["speculative"] += 2 * EST_PROCESS_S + gens * run_s(1000, args.spec_tokens)  # prompts of ~600-1150 tokens
        if MODELS[key] and not (MODELS_DIR / F16_NAME.replace("F16", MODELS[key])).exists():
            parts["making files"] += 90
    if parts["making files"] and not (MODELS_DIR / F16_NAME).exists():
        parts["making files"] += 120  # the F16 every other type is quantized from
    return parts


def merge_runs(old: dict, new: dict) -> dict:
    """`old` with every cell `new` measured replaced: a (model, engine) prompt length's warm sample,
    its group of cold-only samples, a long-context row, a model's speculative tasks."""
    merged = {**old, "models": {**old["models"], **new["models"]}, "machine": new["machine"]}
    merged["argv"] = old["argv"] if old["argv"] and isinstance(old["argv"][0], list) else [old["argv"]]
    merged["argv"] = merged["argv"] + [new["argv"]]

    def cells(samples):
        out: dict[tuple, list] = {}
        for s in samples:
            key = ("warm", s["prompt_len"]) if s["decode_steps"] else ("cold", s["first_token_len"])
            out.setdefault(key, []).append(s)
        return out

    by_pair = {(r["model"], r["engine"]): cells(r["samples"]) for r in old["results"]}
    for r in new["results"]:
        by_pair.setdefault((r["model"], r["engine"]), {}).update(cells(r["samples"]))
    merged["results"] = [{"model": m, "engine": e, "samples": [s for k in sorted(c) for s in c[k]]}
                         for (m, e), c in by_pair.items()]
    merged["lengths"] = sorted({s["prompt_len"] for r in merged["results"] for s in r["samples"] if s["decode_steps"]})
    for part in ("long", "speculative"):
        merged[part] = {**old.get(part, {})}
        for key, value in new.get(part, {}).items():
            merged[part][key] = {**merged[part].get(key, {}), **value}
    merged["wall_s"] = old.get("wall_s", 0.0)
    merged["bandwidth"] = new.get("bandwidth") or old.get("bandwidth")
    merged.pop("partial", None)
    merged["failures"] = new.get("failures", [])
    return merged


def complete(run: dict) -> None:
    """Summaries, versions, contention, ceilings, and ours / llama.cpp ratios and targets, from the samples."""
    run["versions"], run["loadavgs"], run["others"] = {}, [], []
    summaries: dict[str, dict] = {}
    for r in run["results"]:
        r["summary"] = summarize(r["samples"])
        summaries.setdefault(r["model"], {})[r["engine"]] = r["summary"]
        info = r["summary"]["engine_info"]
        run["versions"][r["engine"]] = info.get("version")
        if info.get("torch"):
            run["versions"]["torch"] = info["torch"]
        if r["engine"] == "ours" and info.get("backend"):
            run["versions"]["ours_backend"] = f"{info['backend']} {info.get('device', '')} {info.get('dtype', '')}".strip()
        if info.get("system_info"):
            run["versions"]["llamacpp_system_info"] = info["system_info"]
        run["loadavgs"] += [s["loadavg"][0] for s in r["samples"]]
        run["others"] += [s["others_cores"] for s in r["samples"] if s["decode_steps"]]
    for key, model in run["models"].items():
        pair = summaries.get(key, {})
        long = run.get("long", {}).get(key, {})
        model["ceiling"] = ceilings(run, model, pair, long)
        if set(pair) & {"ours", "llamacpp"} == {"llamacpp"}:  # ours failed: the file's one target is missed
            model["targets"] = [{"metric": "runs on our engine", "met": False, "miss": "failed", "ratio": 0.0,
                                 "row": "| runs on our engine | decode >= llama.cpp | failed (see Failures) | **no** |"}]
        if "ours" in pair and "llamacpp" in pair:
            model["ratios"] = ratios(pair["ours"], pair["llamacpp"])
            both_long = (long["ours"], long["llamacpp"]) if {"ours", "llamacpp"} <= set(long) else None
            decode_short = DECODE_SHORT if model.get("protocol", "full") == "full" else DECODE
            rows = target_rows(pair["ours"], pair["llamacpp"], decode_short, rss=key != "135m", long=both_long)
            rows += speculative_targets(run.get("speculative", {}).get(key, {}))
            model["targets"] = [{"metric": t.metric, "bound": t.bound, "ratio": t.ratio, "at_least": t.at_least,
                                 "detail": t.detail, "met": t.met, "miss": t.miss, "row": t.row()} for t in rows]


def speculative_targets(result: dict) -> list[Target]:
    """Per task: speculation >= 1.5x our plain decode, and ahead of llama.cpp's plain decode."""
    rows = []
    peer = result.get("llamacpp", {}).get("tasks", {})
    for name, t in result.get("ours", {}).get("tasks", {}).items():
        plain, spec = t["plain"]["decode_tok_s"], t["speculative"]["decode_tok_s"]
        rows.append(Target(f"speculative / our plain, {name}", SPECULATIVE, spec / plain, True,
                           f"{spec:.2f} vs {plain:.2f}"))
        if name in peer:
            llama = peer[name]["plain"]["decode_tok_s"]
            rows.append(Target(f"speculative / llama.cpp plain, {name}", DECODE, spec / llama, True,
                               f"{spec:.2f} vs {llama:.2f}"))
    return rows


def ceilings(run: dict, model: dict, pair: dict, long: dict) -> dict:
    """Per engine and context: decode tok/s, the ceiling at that context, and the fraction reached."""
    if not run.get("bandwidth") or "weight_bytes" not in model:
        return {}
    out = {}
    kv = kv_bytes_per_position(model["dims"])
    for engine, summary in pair.items():
        for p, t in summary["tests"].items():
            context = int(p) + run["n_gen"] / 2  # the mean cache length over the decode steps
            top = ceiling_tok_s(run["bandwidth"], model["weight_bytes"], kv, context)
            out.setdefault(engine, {})[str(p)] = {"decode_tok_s": t["decode_tok_s"], "ceiling_tok_s": top,
                                                  "fraction": t["decode_tok_s"] / top}
    for engine, row in long.items():
        top = ceiling_tok_s(run["bandwidth"], model["weight_bytes"], kv, row["context"] + row["n_gen"] / 2)
        out.setdefault(engine, {})[str(row["context"])] = {"decode_tok_s": row["decode_tok_s"], "ceiling_tok_s": top,
                                                           "fraction": row["decode_tok_s"] / top}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=MAIN_MODELS, help=f"full protocol (default: {MAIN_MODELS}); from {', '.join(MODELS)}")
    p.add_argument("--reduced-models", default=REDUCED_MODELS,
                   help=f"the shortest prompt only (default: {REDUCED_MODELS}; '' for none)")
    p.add_argument("--long-models", help=f"decode at --long-context (default: those of {LONG_MODELS} measured)")
    p.add_argument("--long-context", type=int, default=4096, help="tokens of context for the long row (default: 4096)")
    p.add_argument("--spec-models", help=f"the speculative tasks (default: those of {SPEC_MODELS} measured)")
    p.add_argument("--spec-tokens", type=int, default=128, help="tokens per speculative task run (default: 128)")
    p.add_argument("--spec-runs", type=int, default=1, help="runs per task and mode (default: 1)")
    p.add_argument("--engines", default="ours,llamacpp", help="ours, llamacpp, transformers (default: ours,llamacpp)")
    p.add_argument("-p", "--prompt-lengths", default="32,128,512", help="default: 32,128,512")
    p.add_argument("-n", "--n-gen", type=int, default=32, help="generated tokens per run (default: 32)")
    p.add_argument("-r", "--reps", type=int, default=3, help="timed runs per test after a warm-up (default: 3)")
    p.add_argument("--cold-reps", type=int, default=2,
                   help="extra cold-only processes per prompt under 512, main files (default: 2)")
    p.add_argument("-t", "--threads", type=int, default=2, help="threads for every engine (default: 2)")
    p.add_argument("--transformers-on-3b", action="store_true", help="also run transformers on the 3B files (slow)")
    p.add_argument("--out", type=Path, help="raw results JSON (default: bench/runs/<time>.json)")
    p.add_argument("--results", type=Path, help="write the Markdown report here too (e.g. bench/RESULTS.md)")
    p.add_argument("--merge", type=Path,
                   help="a previous run's JSON: keep its measurements except those this run repeats (to redo a "
                        "contended cell, e.g. --models 3b-q4km --reduced-models '' --long-models '' "
                        "--spec-models '' --engines ours -p 512)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measuring process")
    p.add_argument("--wait-quiet", type=float, default=30,
                   help="before each measuring process, wait up to this many seconds for other processes to go "
                        "quiet (default: 30; 0: never wait)")
    return p


def names(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    main_models = names(args.models)
    reduced = [m for m in names(args.reduced_models) if m not in main_models]
    engines = names(args.engines)
    models = {**{m: "full" for m in main_models}, **{m: "reduced" for m in reduced}}
    args.long_models_list = names(args.long_models) if args.long_models is not None else [
        m for m in names(LONG_MODELS) if m in models]
    args.spec_models_list = names(args.spec_models) if args.spec_models is not None else [
        m for m in names(SPEC_MODELS) if m in models]
    extra = [m for m in args.long_models_list + args.spec_models_list if m not in models]
    if bad := [m for m in [*models, *extra] if m not in MODELS] + [e for e in engines if e not in ENGINES]:
        raise BenchError(f"unknown model or engine: {', '.join(bad)}")
    if extra:
        raise BenchError(f"--long-models/--spec-models not measured in this run: {', '.join(extra)}")
    lengths = parse_lengths(args.prompt_lengths)
    old = json.loads(args.merge.read_text()) if args.merge else None
    if old and old["n_gen"] != args.n_gen:
        raise BenchError(f"--merge: that run generated {old['n_gen']} tokens per run, this one -n {args.n_gen}")
    started, t_start = datetime.now(), time.perf_counter()
    parts = estimate_s(models, lengths, [e for e in engines if e != "transformers"], args)
    est = sum(parts.values())
    log(f"estimated duration: {est / 60:.0f} min (" + ", ".join(f"{k} {v / 60:.1f}" for k, v in parts.items() if v)
        + f"), plus up to {args.wait_quiet:.0f} s per process while the machine is busy elsewhere")
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
           "n_gen": args.n_gen, "reps": args.reps, "cold_reps": args.cold_reps, "threads": args.threads,
           "long_context": args.long_context, "spec_tokens": args.spec_tokens, "spec_runs": args.spec_runs,
           "estimate_s": est, "models": {}, "results": [], "long": {}, "speculative": {}, "failures": []}
    save = lambda: out.write_text(json.dumps({**run, "partial": True}, indent=1))  # noqa: E731  (a stopped run keeps what it measured)
    log("measuring memory bandwidth (a torch sum over 2 GiB)")
    run["bandwidth"] = measure_bandwidth(args.threads, env=child_env())
    log(f"  {run['bandwidth'] / 1e9:.1f} GB/s")
    for key, protocol in models.items():
        path = paths[key]
        longest = max(lengths[-1], args.long_context if key in args.long_models_list else 0)
        ids = prompt_ids_for(str(path), longest)
        run["models"][key] = {"file": path.name, "path": str(path), "size_mb": path.stat().st_size / 2**20,
                              "dims": model_dims(path), "protocol": protocol,
                              "weight_bytes": weight_bytes(gguf_tensor_bytes(str(path)))}
        warm_page_cache(path)
        measured = [e for e in engines if e != "transformers" or key == "135m" or args.transformers_on_3b]
        own = lengths if protocol == "full" else lengths[:1]
        # Only the prompts measured: llama.cpp sizes its context (and memory) by the ids it is given.
        measure_model(key, path, ids[: own[-1]], own, measured, args, run, save)
        if key in args.long_models_list:
            measure_long(key, path, ids, [e for e in measured if e != "transformers"], args, run)
            save()
        if key in args.spec_models_list and {"ours", "llamacpp"} <= set(engines):
            measure_speculative(key, path, args, run)
            save()
    if old:
        run = merge_runs(old, run)
    complete(run)
    run["wall_s"] = run.get("wall_s", 0.0) + time.perf_counter() - t_start
    out.write_text(json.dumps(run, indent=1))
    markdown = report_markdown(run)
    print(markdown)
    if args.results:
        write_results(args.results, markdown)
    log(f"took {run['wall_s'] / 60:.0f} min (estimated {est / 60:.0f}); raw results in {out}"
        + (f", report in {args.results}" if args.results else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (BenchError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"bench/run.py: error: {e}", file=sys.stderr)
        sys.exit(2)
