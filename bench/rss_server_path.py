"""The server's resident memory over many requests, without HTTP: what `smollm3 serve` runs for a
chat request (parse_chat, chat_prompt on a pool thread, Api.job, run_job on the engine's own
thread), for the conversations bench/load_server.py sends, in the order it serves them.

    python bench/rss_server_path.py [--requests 500] [--max-tokens 32] [--every 50] [--threads 1]

Prints RSS and glibc's heap (in use, free but held), MiB, every `--every` requests; with
--tracemalloc also Python's traced total, and at the end the Python allocations that
grew most between the first sample and the last.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from app.cli import sampling_from  # noqa: E402
from app.server.main import build_serve_parser, check_serve_flags, load_served_engine  # noqa: E402
from app.server.app import Api, ServerConfig  # noqa: E402
from app.server.prompts import chat_prompt  # noqa: E402
from app.server.protocol import parse_chat  # noqa: E402
from app.server.reply import run_job  # noqa: E402
from bench.load_server import question  # noqa: E402


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = MallInfo2


def heap() -> str:
    """glibc's view: bytes in use (uordblks + mmapped hblkhd) and free but held (fordblks), MiB."""
    m = LIBC.mallinfo2()
    traced = f", python {tracemalloc.get_traced_memory()[0] / 2**20:.1f}" if tracemalloc.is_tracing() else ""
    return f"malloc in use {(m.uordblks + m.hblkhd) / 2**20:.1f}, free held {m.fordblks / 2**20:.1f}{traced}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-path", default=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--trim", action="store_true", help="malloc_trim(0) after every request")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    serve_args = build_serve_parser().parse_args(["--model-path", args.model_path])
    check_serve_flags(serve_args)
    engine = load_served_engine(serve_args)

    api = Api.__new__(Api)  # its job() only: no engine thread of its own
    api.engine = engine
    api.config = ServerConfig(model_id="m", ctx_size=engine.config.context_length, defaults=sampling_from(serve_args))
    pool = ThreadPoolExecutor(40)  # anyio's default thread limiter is 40
    engine_thread = ThreadPoolExecutor(1)

    def serve(messages: list[dict]) -> str:
        req = parse_chat({"messages": messages, "max_tokens": args.max_tokens, "temperature": 0,
                          "repeat_penalty": 1.0, "stream": True})
        prompt = pool.submit(chat_prompt, engine, req).result()
        job = api.job(req, prompt.ids, tool_names=prompt.tool_names, thinking_first=prompt.thinking_first,
                      forced_text=prompt.forced_text, thinking_budget=req.thinking_budget)
        pieces: list[str] = []
        emit = lambda e: pieces.append(e[1]) if e[0] == "content" else None  # noqa: E731
        engine_thread.submit(run_job, engine, job, emit, lambda: False).result()
        return "".join(pieces)

    if args.tracemalloc:
        tracemalloc.start(8)
    done, t0 = 0, time.perf_counter()
    print(f"requests 0: {rss_mib():.1f} MiB", flush=True)
    snapshot = None
    while done < args.requests:
        # bench/load_server.py's order: every client's turn t, then every client's turn t + 1
        conversations: list[list[dict]] = [[] for _ in range(args.clients)]
        for t in range(args.turns):
            for c, messages in enumerate(conversations):
                if done >= args.requests:
                    break
                messages.append({"role": "user", "content": question(c, t)})
                messages.append({"role": "assistant", "content": serve(messages)})
                done += 1
                if args.trim:
                    LIBC.malloc_trim(0)
                if done % args.every == 0:
                    print(f"requests {done}: {rss_mib():.1f} MiB ({time.perf_counter() - t0:.0f} s; {heap()})", flush=True)
                    if args.tracemalloc and snapshot is None:
                        snapshot = tracemalloc.take_snapshot()
    if snapshot is not None:
        for stat in tracemalloc.take_snapshot().compare_to(snapshot, "traceback")[:8]:
            print(stat)
            for line in stat.traceback.format()[-6:]:
                print("   ", line)


if __name__ == "__main__":
    main()
