"""Load test for `smollm3 serve` (and llama-cpp-python's server under the same load).

    python bench/load_server.py [--engine smollm3|llamacpp] [--clients 32] [--turns 3] [--requests 500]

Starts the server on a free port, then runs rounds of `--clients` concurrent streaming
conversations of `--turns` turns each (every turn resends the whole conversation, greedy) until
`--requests` requests are done. Checks that every stream is whole (one id, a finish_reason,
[DONE]) and that the first round's conversations, replayed one at a time afterwards, get the
same text (no tokens lost or crossed between concurrent streams). Reports p50/p95 time to
first token, tokens/s, and the server's RSS after each round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.deps import env_with, installed  # noqa: E402

TOPICS = ["rivers", "bread", "the moon", "trains", "bees", "chess", "snow", "music", "maps", "glass", "tea",
          "bridges", "owls", "clocks", "salt", "kites"]


@dataclass
class Turn:
    text: str = ""
    ttft_s: float = 0.0
    total_s: float = 0.0
    completion_tokens: int = 0
    problems: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine: str, model: str, port: int, threads: int, server_deps: str | None,
                 log_path: str | None) -> subprocess.Popen:
    if engine == "smollm3":
        cmd = [sys.executable, "-m", "app", "serve", "--model-path", model, "--port", str(port),
               "--max-queue", "256"]
        env = env_with()
    else:
        if not installed("llamacpp"):
            raise SystemExit("llama-cpp-python is not built in bench/.deps (python bench/run.py builds it)")
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--port", str(port), "--n_ctx", "8192",
               "--n_threads", str(threads), "--n_threads_batch", str(threads)]
        env = env_with("llamacpp")
        if server_deps:
            env["PYTHONPATH"] = os.pathsep.join([server_deps, env["PYTHONPATH"]])
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log)


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            return httpx.get(f"{url}/v1/models", timeout=2).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, ValueError):
            time.sleep(0.5)
    raise SystemExit("the server did not come up")


def question(client: int, turn: int) -> str:
    topic = TOPICS[client % len(TOPICS)]
    return [f"Tell me one fact about {topic} (#{client}).", "Why is that?", "Say it in five words."][turn % 3]


async def stream_turn(http: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int) -> Turn:
    turn, ids = Turn(), set()
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "repeat_penalty": 1.0,
            "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    try:
        await read_stream(http, body, turn, ids, t0, state := {"finish": None, "done": False})
    except httpx.TransportError as e:  # a stream the server cut is a finding of the run, not its end
        turn.problems.append(f"{type(e).__name__}: {e}")
    finish, done = state["finish"], state["done"]
    turn.total_s = time.perf_counter() - t0
    if len(ids) != 1:
        turn.problems.append(f"{len(ids)} response ids in one stream")
    if finish is None or not done:
        turn.problems.append(f"incomplete stream (finish_reason={finish}, [DONE]={done})")
    return turn


async def read_stream(http: httpx.AsyncClient, body: dict, turn: Turn, ids: set, t0: float, state: dict) -> None:
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            turn.problems.append(f"status {r.status_code}: {(await r.aread())[:200]!r}")
            return
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                state["done"] = True
                continue
            chunk = json.loads(data)
            ids.add(chunk["id"])
            if chunk.get("usage"):
                turn.completion_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content") or ""
                if piece and not turn.text:
                    turn.ttft_s = time.perf_counter() - t0
                turn.text += piece
                state["finish"] = choice.get("finish_reason") or state["finish"]


async def conversation(http, model: str, client: int, turns: int, max_tokens: int) -> tuple[list[dict], list[Turn]]:
    messages, results = [], []
    for t in range(turns):
        messages.append({"role": "user", "content": question(client, t)})
        turn = await stream_turn(http, model, messages, max_tokens)
        results.append(turn)
        messages.append({"role": "assistant", "content": turn.text})
    return messages, results


async def rss_probe(http, model: str, server: psutil.Process, n: int, clients: int) -> list[float]:
    """n short streaming requests, `clients` at a time, all on one prompt (so each is a cache hit
    and one token): what a request itself costs in memory, sampled every 100 requests."""
    rss, done = [server.memory_info().rss / 2**20], 0
    messages = [{"role": "user", "content": "Say yes."}]
    while done < n:
        batch = min(clients, n - done)
        turns = await asyncio.gather(*(stream_turn(http, model, messages, 1) for _ in range(batch)))
        if any(t.problems for t in turns):
            raise SystemExit(f"probe: {[t.problems for t in turns if t.problems][0]}")
        done += batch
        if done % 100 < batch or done == n:
            rss.append(server.memory_info().rss / 2**20)
    return rss


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values or [0.0])[0]


async def run(args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(args.engine, args.model_path, port, args.threads, args.server_deps, args.server_log)
    try:
        model = wait_ready(url, proc)
        server = psutil.Process(proc.pid)
        limits = httpx.Limits(max_connections=args.clients * 2)
        async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as http:
            turns, rss_mib, first_round, t_start, rounds = [], [], None, time.perf_counter(), 0
            while len(turns) < args.requests:
                done = await asyncio.gather(*(conversation(http, model, c, args.turns, args.max_tokens)
                                              for c in range(args.clients)))
                first_round = first_round or done
                turns += [t for _, ts in done for t in ts]
                rss_mib.append(server.memory_info().rss / 2**20)
                rounds += 1
                print(f"round {rounds}: {len(turns)} requests, server RSS {rss_mib[-1]:.0f} MiB", file=sys.stderr)
            wall = time.perf_counter() - t_start
            # Replayed alone, each of a few first-round conversations must get the same text.
            crossed = 0
            for c in range(min(args.replay, args.clients)):
                _, alone = await conversation(http, model, c, args.turns, args.max_tokens)
                crossed += sum(a.text != b.text for a, b in zip(alone, first_round[c][1]))
            probe = await rss_probe(http, model, server, args.probe, args.clients) if args.probe else []
    finally:
        proc.terminate()
        proc.wait(30)
    ttft = [t.ttft_s for t in turns if t.ttft_s]
    tokens = sum(t.completion_tokens for t in turns)
    per_stream = [t.completion_tokens / (t.total_s - t.ttft_s) for t in turns if t.total_s > t.ttft_s > 0]
    return {
        "engine": args.engine, "model": model, "clients": args.clients, "turns": args.turns,
        "requests": len(turns), "max_tokens": args.max_tokens, "wall_s": round(wall, 1),
        "problems": [p for t in turns for p in t.problems][:20],
        "incomplete": sum(bool(t.problems) for t in turns),
        "replayed_turns_differing": crossed,
        "ttft_p50_s": round(pct(ttft, 50), 3), "ttft_p95_s": round(pct(ttft, 95), 3),
        "completion_tokens": tokens, "aggregate_tok_s": round(tokens / wall, 1),
        "per_stream_decode_tok_s_p50": round(pct(per_stream, 50), 2),
        "server_rss_mib": [round(r) for r in rss_mib],
        "probe_requests": args.probe, "probe_rss_mib_every_100": [round(r, 1) for r in probe],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", choices=("smollm3", "llamacpp"), default="smollm3")
    p.add_argument("--model-path", default=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--requests", type=int, default=500, help="keep running rounds until this many are done")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--probe", type=int, default=0, help="then this many one-token requests, for server RSS")
    p.add_argument("--replay", type=int, default=4, help="first-round conversations replayed alone to compare")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads")
    p.add_argument("--server-deps", help="llamacpp: a `pip install --target` directory with llama_cpp.server's own "
                   "packages (--no-deps: 'fastapi<0.136' pydantic-settings 'starlette-context<0.4' python-dotenv)")
    p.add_argument("--server-log", help="write the server's output (one line per request for smollm3) here")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
