"""Where the one-shot path's memory and start-up time go, phase by phase.

    python bench/profile_memory.py MODEL.gguf [--tokens 32] [--prompt-tokens N] [--modules] [--smaps]

Runs what `smollm3 --model-path MODEL --prompt ...` runs (app.cli's imports, load_engine,
one generation) in this process, and after each phase prints the seconds since start, CPU
seconds (user + system: what a busy shared machine inflates least; OMP_NUM_THREADS=1 makes
them steadier still), VmRSS (resident now), VmHWM (peak so far), RssAnon (heap: torch's own
tables, Python objects, tensors) and RssFile (mapped pages: libraries and the GGUF file), all
from /proc/self/status (Linux only). --prompt-tokens feeds a prompt of that many tokens as the
benchmark does (no template). --smaps lists the largest mappings at the end.
--modules lists the heavy packages each phase imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

T0 = time.perf_counter()
HEAVY = ("torch", "numpy", "gguf", "jinja2", "tokenizers", "transformers", "huggingface_hub", "textual", "mlx",
         "sympy", "networkx", "safetensors", "rich", "httpx", "requests", "regex", "yaml", "sqlite3")


def status() -> dict[str, int]:
    """The process's memory figures in MiB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) // 1024
    return fields


def mappings(top: int = 12) -> list[tuple[int, int, str]]:
    """(resident MiB, of which anonymous, mapping) for the largest mappings, from /proc/self/smaps."""
    rss: dict[str, int] = {}
    anon: dict[str, int] = {}
    name = ""
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":"):  # a mapping's first line: range, perms, offset, dev, inode[, path]
                name = parts[5] if len(parts) > 5 else "[anonymous]"
            elif parts[0] == "Rss:":
                rss[name] = rss.get(name, 0) + int(parts[1])
            elif parts[0] == "Anonymous:":
                anon[name] = anon.get(name, 0) + int(parts[1])
    biggest = sorted(rss, key=rss.get, reverse=True)[:top]
    return [(rss[n] // 1024, anon.get(n, 0) // 1024, n) for n in biggest]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--prompt", default="Give me a short haiku about autumn leaves.")
    p.add_argument("--tokens", type=int, default=32, help="tokens to decode before stopping")
    p.add_argument("-n", "--sample-len", type=int, default=1000,
                   help="the generation's length limit, as the CLI's -n (what the KV cache is reserved for)")
    p.add_argument("--prompt-tokens", type=int, help="feed this many tokens of the prompt repeated, without the template")
    p.add_argument("--modules", action="store_true", help="the heavy packages each phase imported")
    p.add_argument("--smaps", action="store_true", help="at the end, the largest mappings (libraries, heap, the file)")
    p.add_argument("--backend", default="auto", help="as the CLI's (torch: what the torch backend holds)")
    args = p.parse_args()

    seen: set[str] = set()

    def phase(name: str) -> None:
        s = status()
        cpu = sum(os.times()[:2])
        print(f"{name:<22} {time.perf_counter() - T0:6.2f}s  cpu {cpu:6.2f}s  RSS {s['VmRSS']:5} MiB  peak {s['VmHWM']:5}  "
              f"anon {s['RssAnon']:5}  file {s['RssFile']:5}", flush=True)
        if args.modules:
            new = {m.split(".")[0] for m in sys.modules} - seen
            seen.update(new)
            heavy = sorted(new & set(HEAVY))
            if heavy:
                print(f"{'':<22} imported: {', '.join(heavy)}")

    phase("python")
    import backends  # noqa: F401

    phase("import backends")
    from app import cli

    phase("import app.cli")
    cli_args = cli.build_parser().parse_args(
        ["--model-path", args.model, "--prompt", args.prompt, "--temperature", "0", "--backend", args.backend]
    )
    cli.check_flags(cli_args)
    engine, use_template = cli.load_engine(cli_args, backends.Tracer(), chatter=False)
    phase("load")
    if args.prompt_tokens:
        text_ids = engine.tokenizer.encode(args.prompt)
        ids = (text_ids * (args.prompt_tokens // len(text_ids) + 1))[: args.prompt_tokens]
        stream = engine.generate(ids, args.sample_len, cli.sampling_from(cli_args))
    else:
        from app.session import ChatSession

        stream = ChatSession(engine, use_template=use_template).reply(args.prompt, args.sample_len, cli.sampling_from(cli_args))
    next(stream)
    phase(f"first token (p={engine.stats.prompt_tokens})")
    n = 1
    for _ in stream:
        n += 1
        if engine.stats.generated_tokens >= args.tokens:
            break
    phase(f"{engine.stats.generated_tokens} tokens ({n} texts)")

    if args.smaps:
        for mib, anon, name in mappings():
            print(f"{mib:6} MiB ({anon:5} anonymous)  {name}")


if __name__ == "__main__":
    main()
