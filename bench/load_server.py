"""Load test for `smollm3 serve`, and llama-cpp-python's server under the same load.

    python bench/load_server.py [--engine smollm3 llamacpp] [--clients 32] [--turns 3] [--requests 96]

Starts each server in turn on a free port on a free port, then runs rounds of `--clients` concurrent streaming
conversations of `--turns` turns each (every turn resends the whole conversation, greedy) until
`--requests` requests are done. Checks that every stream is whole (one id, a finish_reason,
[DONE]); then sends each first-round request again, alone, one after the other, and compares the
reply piece by piece with what the concurrent run streamed for it (a reply that belongs to another
request, or lost a token, differs). Reports p50/p95 time to first token, tokens/s, and the
server's RSS before the run and every 100 requests.
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
from importlib.metadata import PathDistribution
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.numbers import ceil_div  # noqa: E402
from bench.deps import DEPS_DIR, env_with, installed, target  # noqa: E402

TOPICS = ["rivers", "bread", "the moon", "trains", "bees", "chess", "snow", "music", "maps", "glass", "tea",
          "bridges", "owls", "clocks", "salt", "kites"]


@dataclass
class Turn:
    pieces: list[str] = field(default_factory=list)  # content deltas as streamed: about one token each
    ttft_s: float = 0.0
    total_s: float = 0.0
    usage_tokens: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        # llama_cpp.server sends no usage in a stream (stream_options is ignored): count its chunks
        return self.usage_tokens if self.usage_tokens is not None else len(self.pieces)


@dataclass
class RssLog:
    """The server's resident memory before the run and after every `every` requests."""
    server: psutil.Process
    every: int = 100
    done: int = 0
    samples: list[tuple[int, float]] = field(default_factory=list)  # (requests done, MiB)

    def sample(self) -> None:
        self.samples.append((self.done, self.server.memory_info().rss / 2**20))

    def count(self) -> None:
        self.done += 1
        if self.done % self.every == 0:
            self.sample()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_requirements() -> list[str]:
    """llama-cpp-python's own requirements plus its `server` extra, read from the installed METADATA."""
    info = next(target("llamacpp").glob("llama_cpp_python-*.dist-info"))
    requirements = []
    for line in PathDistribution(info).requires or []:
        requirement, _, marker = line.partition(";")
        if not marker.strip() or marker.replace("'", '"').strip() == 'extra == "server"':
            requirements.append(requirement.strip())
    return requirements


def llamacpp_server_python(venv: Path) -> Path:
    """The python of a virtual environment that holds llama_cpp.server's web stack (fastapi,
    sse-starlette, starlette-context, ...) as pip resolves it for llama-cpp-python's own pins,
    apart from the project's venv, which they would otherwise change. llama_cpp itself is the
    harness's build in bench/.deps (AMX-free where the native build crashes), put on PYTHONPATH."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} for llama_cpp.server", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *server_requirements()], check=True)
    return python


def start_server(engine: str, model: str, port: int, threads: int, server_venv: Path,
                 log_path: str | None) -> subprocess.Popen:
    if engine == "smollm3":
        cmd = [sys.executable, "-m", "app", "serve", "--model-path", model, "--port", str(port),
               "--max-queue", "256"]
        env = env_with()
        env["OMP_NUM_THREADS"] = str(threads)  # torch and the native kernels take their thread count from it
    else:
        if not installed("llamacpp"):
            raise SystemExit("llama-cpp-python is not built in bench/.deps (python bench/deps.py llamacpp builds it)")
        # --interrupt_requests False: by default llama_cpp.server ends the running stream with [DONE]
        # and drops the connection as soon as another request waits (app.py get_event_publisher), so
        # under concurrent clients every stream but the last is cut after a token or two.
        cmd = [str(llamacpp_server_python(server_venv)), "-m", "llama_cpp.server", "--model", model,
               "--port", str(port), "--n_ctx", "8192", "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--interrupt_requests", "False"]
        env = dict(os.environ, PYTHONPATH=str(target("llamacpp")))
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
            "stream": True, "stream_options": {"include_usage": True}}
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
                turn.usage_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content") or ""
                if piece and not turn.pieces:
                    turn.ttft_s = time.perf_counter() - t0
                if piece:
                    turn.pieces.append(piece)
                state["finish"] = choice.get("finish_reason") or state["finish"]


async def conversation(http, model: str, client: int, turns: int, max_tokens: int,
                       rss: RssLog) -> tuple[list[dict], list[Turn]]:
    messages, results = [], []
    for t in range(turns):
        messages.append({"role": "user", "content": question(client, t)})
        turn = await stream_turn(http, model, messages, max_tokens)
        rss.count()
        results.append(turn)
        messages.append({"role": "assistant", "content": turn.text})
    return messages, results


def first_difference(a: list[str], b: list[str]) -> int | None:
    """Index of the first streamed piece where two replies part, None when they are the same."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


async def replay_alone(http, model: str, first_round, max_tokens: int, rss: RssLog) -> list[dict]:
    """Each first-round request sent again with the very messages it had, one at a time; the
    differences from what the concurrent run streamed for it."""
    differing = []
    for client, (messages, turns) in enumerate(first_round):
        for t, concurrent in enumerate(turns):
            alone = await stream_turn(http, model, messages[:2 * t + 1], max_tokens)
            rss.count()
            if (at := first_difference(concurrent.pieces, alone.pieces)) is not None:
                differing.append({"client": client, "turn": t, "first_differing_piece": at,
                                  "pieces": [len(concurrent.pieces), len(alone.pieces)]})
    return differing


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else (values or [0.0])[0]


async def run(args, engine: str) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(engine, args.model_path, port, args.threads, args.server_venv,
                        args.server_log and f"{args.server_log}-{engine}.log")
    try:
        model = wait_ready(url, proc)
        rss = RssLog(psutil.Process(proc.pid))
        rss.sample()
        limits = httpx.Limits(max_connections=args.clients * 2)
        async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as http:
            turns, first_round, t_start, rounds = [], None, time.perf_counter(), 0
            while len(turns) < args.requests:
                # the last round has only as many conversations as requests are left
                clients = min(args.clients, ceil_div(args.requests - len(turns), args.turns))
                done = await asyncio.gather(*(conversation(http, model, c, args.turns, args.max_tokens, rss)
                                              for c in range(clients)))
                first_round = first_round or done
                turns += [t for _, ts in done for t in ts]
                rounds += 1
                print(f"round {rounds}: {len(turns)} requests, server RSS "
                      f"{rss.server.memory_info().rss / 2**20:.0f} MiB", file=sys.stderr)
            wall = time.perf_counter() - t_start
            rss.sample()
            differing = await replay_alone(http, model, first_round, args.max_tokens, rss) if args.replay else None
    finally:
        proc.terminate()
        proc.wait(30)
    ttft = [t.ttft_s for t in turns if t.ttft_s]
    tokens = sum(t.completion_tokens for t in turns)
    per_stream = [t.completion_tokens / (t.total_s - t.ttft_s) for t in turns if t.total_s > t.ttft_s > 0]
    replayed = sum(len(ts) for _, ts in first_round) if args.replay else 0
    if differing is not None:
        print(f"replayed alone: {len(differing)} of {replayed} replies differ from the concurrent run", file=sys.stderr)
    return {
        "engine": engine, "model": model, "clients": args.clients, "turns": args.turns, "threads": args.threads,
        "requests": len(turns), "max_tokens": args.max_tokens, "wall_s": round(wall, 1),
        "problems": [p for t in turns for p in t.problems][:20],
        "incomplete": sum(bool(t.problems) for t in turns),
        "replayed_alone": replayed, "replayed_differing": len(differing or []), "differing": differing,
        "ttft_p50_s": round(pct(ttft, 50), 3), "ttft_p95_s": round(pct(ttft, 95), 3),
        "completion_tokens": tokens, "aggregate_tok_s": round(tokens / wall, 1),
        "per_stream_decode_tok_s_p50": round(pct(per_stream, 50), 2),
        "server_rss_mib": [[n, round(mib, 1)] for n, mib in rss.samples],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", nargs="+", choices=("smollm3", "llamacpp"), default=["smollm3", "llamacpp"],
                   help="the servers to load, one after the other (default: both)")
    p.add_argument("--model-path", default=str(ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--requests", type=int, default=96, help="keep running rounds until this many are done")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--no-replay", dest="replay", action="store_false",
                   help="skip sending the first round's requests again one at a time")
    p.add_argument("--threads", type=int, default=2, help="the server's CPU threads (default: 2)")
    p.add_argument("--server-venv", type=Path, default=DEPS_DIR / "llamacpp-server-venv",
                   help="llamacpp: a virtual environment for llama_cpp.server's packages, made on first use "
                        "(default: bench/.deps/llamacpp-server-venv)")
    p.add_argument("--server-log", metavar="PREFIX",
                   help="write each server's output (one line per request for smollm3) to PREFIX-ENGINE.log")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    results = [asyncio.run(run(args, engine)) for engine in args.engine]
    result = results[0] if len(results) == 1 else results
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
