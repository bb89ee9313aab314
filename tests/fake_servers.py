"""Fake inference servers on 127.0.0.1 that speak each peer's wire format as its docs show it.

vLLM / SGLang: `delta.reasoning_content` (vLLM >= 0.11: `delta.reasoning`), a usage chunk with
`choices: []` when `stream_options.include_usage`, errors as {"object": "error", "message": ...}.
llama-server: `reasoning_content`, a final chunk carrying `usage` and `timings`, errors as
{"error": {"code", "message", "type"}}, owned_by "llamacpp". mlx_lm.server: `delta.reasoning`,
`: keepalive` comments, models listed without `owned_by`, errors as {"error": "..."}.
Ollama: /api/version, /api/chat as NDJSON with `message.thinking`, durations in nanoseconds,
errors as {"error": "..."} (also as a line mid-stream). OpenAI: {"error": {"message", "type",
"param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

OWNED_BY = {"vllm": "vllm", "sglang": "sglang", "llama-server": "llamacpp", "ollama": "library", "openai": "openai",
            "smollm3": "smollm3"}
REASONING_FIELD = {"vllm": "reasoning_content", "sglang": "reasoning_content", "llama-server": "reasoning_content",
                   "mlx-lm": "reasoning", "smollm3": "reasoning_content"}


@dataclass
class Script:
    """What the fake answers to a chat request."""

    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    finish_reason: str = "stop"
    delay_s: float = 0.0  # before each piece
    first_byte_delay_s: float = 0.0  # before the response starts
    cut_after: int | None = None  # drop the connection after this many pieces
    error_after: int | None = None  # report an error in the stream after this many pieces
    status: int | None = None  # answer with this HTTP error instead
    send_usage: bool = True  # False: a server that ignores stream_options
    no_stream: bool = False  # answer with one JSON completion, ignoring "stream": true
    reasoning_field: str | None = None  # override the peer's field (vLLM >= 0.11: "reasoning")
    prompt_tokens: int = 21
    cached_tokens: int = 5


class FakePeer:
    def __init__(self, kind: str, model: str = "HuggingFaceTB/SmolLM3-3B", script: Script | None = None,
                 api_key: str | None = None, thinks: bool = True):
        self.kind = kind
        self.thinks = thinks  # Ollama: the model has the "thinking" capability
        self.model = model
        self.script = script or Script()
        self.api_key = api_key
        self.requests: list[dict] = []  # chat request bodies, as received
        self.pieces_sent = 0
        self.disconnected = threading.Event()

    # --- routes ---

    def app(self) -> Starlette:
        routes = [Route("/v1/models", self.models), Route("/v1/chat/completions", self.chat, methods=["POST"])]
        if self.kind == "ollama":
            routes += [Route("/api/version", self.version), Route("/api/chat", self.ollama_chat, methods=["POST"]),
                       Route("/api/show", self.show, methods=["POST"])]
        return Starlette(routes=routes)

    def _refused(self, request: Request) -> Response | None:
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return self.error(401, "Invalid API Key")
        return None

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": "0.12.3"})

    async def show(self, request: Request) -> Response:
        body = await request.json()
        if body.get("model") != self.model:
            return self.error(404, f"model '{body.get('model')}' not found")
        capabilities = ["completion", "thinking"] if self.thinks else ["completion"]
        return JSONResponse({"modelfile": "", "details": {"family": "smollm3"}, "capabilities": capabilities})

    async def models(self, request: Request) -> Response:
        if refused := self._refused(request):
            return refused
        entry = {"id": self.model, "object": "model", "created": 1735142223}
        if self.kind in OWNED_BY:
            entry["owned_by"] = OWNED_BY[self.kind]
        if self.kind == "vllm":
            entry.update(root=self.model, parent=None, max_model_len=65536)
        if self.kind == "llama-server":
            entry["meta"] = {"vocab_type": 2, "n_vocab": 128256, "n_ctx_train": 65536}
        return JSONResponse({"object": "list", "data": [entry]})

    def error(self, status: int, message: str) -> Response:
        if self.kind in ("ollama", "mlx-lm"):
            body = {"error": message}
        elif self.kind in ("vllm", "sglang"):
            body = {"object": "error", "message": message, "type": "NotFoundError" if status == 404 else "Error",
                    "param": None, "code": status}
        elif self.kind == "llama-server":
            kinds = {401: "authentication_error", 404: "not_found_error", 503: "unavailable_error"}
            body = {"error": {"code": status, "message": message, "type": kinds.get(status, "server_error")}}
        else:
            codes = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}
            body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                              "code": codes.get(status)}}
        headers = {"retry-after": "20"} if status == 429 else None
        return JSONResponse(body, status_code=status, headers=headers)

    async def _check_chat(self, request: Request) -> tuple[dict, Response | None]:
        body = await request.json()
        self.requests.append(body)
        if refused := self._refused(request):
            return body, refused
        if self.script.status:
            return body, self.error(self.script.status, SCRIPTED_ERRORS.get(self.script.status, "error"))
        if body.get("model") != self.model and self.kind != "llama-server":  # llama-server serves one model
            missing = (f'model "{body.get("model")}" not found, try pulling it first' if self.kind == "ollama"
                       else f"The model `{body.get('model')}` does not exist.")
            return body, self.error(404, missing)
        return body, None

    def _pieces(self) -> list[tuple[str, str]]:
        """(kind, text) pieces; a server that does not split reasoning sends it inline in <think> tags."""
        reasoning = [("reasoning", r) for r in self.script.reasoning]
        if reasoning and self.kind != "ollama" and not (self.script.reasoning_field or REASONING_FIELD.get(self.kind)):
            texts = [r for _, r in reasoning]
            texts[0], texts[-1] = "<think>" + texts[0], texts[-1] + "</think>"
            reasoning = [("content", t) for t in texts]
        return reasoning + [("content", c) for c in self.script.content]

    async def _paced(self, pieces):
        """The pieces, at the script's pace, with the cut / error / disconnect behaviour."""
        try:
            for i, piece in enumerate(pieces):
                if self.script.cut_after is not None and i == self.script.cut_after:
                    raise ConnectionAbortedError("scripted cut")  # the server drops the connection
                if self.script.error_after is not None and i == self.script.error_after:
                    yield None
                    return
                await asyncio.sleep(self.script.delay_s)
                yield piece
                self.pieces_sent += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.disconnected.set()
            raise

    # --- OpenAI chat completions (SSE) ---

    async def chat(self, request: Request) -> Response:
        body, refused = await self._check_chat(request)
        if refused:
            return refused
        if self.script.no_stream:
            message = {"role": "assistant", "content": "".join(self.script.content)}
            return JSONResponse({"id": "chatcmpl-1", "object": "chat.completion", "model": self.model,
                                 "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
        return StreamingResponse(self._sse(body), media_type="text/event-stream")

    def _chunk(self, delta: dict, finish: str | None = None, **extra) -> str:
        data = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1735142223, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(data)}\n\n"

    async def _sse(self, body: dict):
        field_name = self.script.reasoning_field or REASONING_FIELD.get(self.kind)
        await asyncio.sleep(self.script.first_byte_delay_s)
        yield self._chunk({"role": "assistant", "content": ""})
        if self.kind == "mlx-lm":
            yield ": keepalive 21/21\n\n"
        async for piece in self._paced(self._pieces()):
            if piece is None:
                error = {"message": "the engine died", "type": "InternalServerError", "code": 500}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            kind, text = piece
            yield self._chunk({field_name if kind == "reasoning" else "content": text})
        n = len(self._pieces())
        usage = {"prompt_tokens": self.script.prompt_tokens, "completion_tokens": n,
                 "total_tokens": self.script.prompt_tokens + n,
                 "prompt_tokens_details": {"cached_tokens": self.script.cached_tokens}}
        wants_usage = (body.get("stream_options") or {}).get("include_usage") and self.script.send_usage
        if self.kind == "smollm3":
            # smollm3 serve: llama-server's shape, the first token's time counted to the prompt.
            prefilled = self.script.prompt_tokens - self.script.cached_tokens
            timings = {"cache_n": self.script.cached_tokens, "prompt_n": prefilled, "prompt_ms": 40.0,
                       "prompt_per_second": prefilled / 0.04, "predicted_n": n, "predicted_ms": 300.0, "predicted_per_second": (n - 1) / 0.3}
            yield self._chunk({}, self.script.finish_reason, timings=timings)
            if wants_usage:
                last = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": usage}
                yield f"data: {json.dumps(last)}\n\n"
        elif self.kind == "llama-server":
            cached = self.script.cached_tokens
            timings = {"cache_n": cached, "prompt_n": self.script.prompt_tokens - cached,
                       "prompt_ms": 32.0, "prompt_per_token_ms": 2.0, "prompt_per_second": 500.0,
                       "predicted_n": n, "predicted_ms": 250.0, "predicted_per_token_ms": 250.0 / n,
                       "predicted_per_second": n / 0.25}
            yield self._chunk({}, self.script.finish_reason, usage=usage, timings=timings)
        else:
            yield self._chunk({}, self.script.finish_reason)
            if wants_usage:
                last = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": usage}
                yield f"data: {json.dumps(last)}\n\n"
        yield "data: [DONE]\n\n"

    # --- Ollama /api/chat (NDJSON) ---

    async def ollama_chat(self, request: Request) -> Response:
        body, refused = await self._check_chat(request)
        if refused:
            return refused
        if body.get("think") and not self.thinks:
            return self.error(400, f'"{self.model}" does not support thinking')
        return StreamingResponse(self._ndjson(), media_type="application/x-ndjson")

    async def _ndjson(self):
        await asyncio.sleep(self.script.first_byte_delay_s)
        stamp = {"model": self.model, "created_at": "2025-10-26T17:21:21.196249Z"}
        async for piece in self._paced(self._pieces()):
            if piece is None:
                yield json.dumps({"error": "an error was encountered while running the model"}) + "\n"
                return
            kind, text = piece
            message = {"role": "assistant", "content": text if kind == "content" else ""}
            if kind == "reasoning":
                message["thinking"] = text
            yield json.dumps({**stamp, "message": message, "done": False}) + "\n"
        n = len(self._pieces())
        yield json.dumps({**stamp, "message": {"role": "assistant", "content": ""}, "done": True,
                          "done_reason": self.script.finish_reason, "total_duration": 4883583458,
                          "load_duration": 1334875, "prompt_eval_count": self.script.prompt_tokens,
                          "prompt_eval_duration": 42_000_000, "eval_count": n,
                          "eval_duration": 500_000_000}) + "\n"


SCRIPTED_ERRORS = {429: "Rate limit reached for requests", 500: "the model failed to generate a response",
                   503: "Loading model"}


def html_site() -> Starlette:
    """A web server that is not an inference server."""

    async def page(request: Request) -> Response:
        return HTMLResponse("<html><body><h1>Welcome</h1></body></html>")

    async def missing(request: Request) -> Response:
        return HTMLResponse("<html><body>Not Found</body></html>", status_code=404)

    return Starlette(routes=[Route("/site/v1/models", page), Route("/v1/models", missing)])


class ServerThread:
    """An ASGI app served by uvicorn on a free 127.0.0.1 port, in a daemon thread."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="critical", lifespan="off", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the fake server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(command: list[str], url: str, name: str, timeout_s: float, **popen):
    """A real server started as a process, yielded once `url`/models answers 200; stopped after."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                if httpx.get(url + "/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)
