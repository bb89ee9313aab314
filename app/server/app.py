"""The HTTP side: OpenAI's routes on Starlette, responses and SSE streams built from a job's events.

Nothing here blocks the event loop: templates and tokenizers run in the thread pool, the engine
on its own thread (worker.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Callable

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from backends import Engine, SamplingParams, SmolLMError

from .prompts import chat_prompt
from .protocol import ApiError, CompletionRequest, parse_chat, parse_completion, parse_json_body
from .reply import Job, Outcome
from .toolcalls import ToolCall
from .worker import EngineWorker, QueueFull, Ticket

MAX_BODY_BYTES = 4 << 20


@dataclass
class ServerConfig:
    model_id: str
    ctx_size: int
    defaults: SamplingParams  # for fields a request leaves out
    default_max_tokens: int | None = None  # a chat request without max_tokens: this, else up to the context
    api_key: str | None = None
    max_queue: int = 64
    max_body_bytes: int = MAX_BODY_BYTES


def log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def create_app(engine: Engine, config: ServerConfig, log: Callable[[str], None] = log_to_stderr) -> Starlette:
    api = Api(engine, config)
    routes = [
        Route("/health", guarded(api.health), methods=["GET"]),
        Route("/v1/models", guarded(api.models), methods=["GET"]),
        Route("/v1/chat/completions", guarded(api.chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(api.completions), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={  # unknown paths, wrong methods
        HTTPException: lambda request, e: error_response(ApiError(e.status_code, str(e.detail))),
    })
    return RequestLog(app, log)


def guarded(handler):
    """Errors as OpenAI answers them; a bug of ours is a 500 naming the exception, never a traceback."""

    async def route(request: Request):
        try:
            return await handler(request)
        except ApiError as e:
            return error_response(e)
        except Exception as e:
            request.scope["smollm3.log"] = f" internal error: {type(e).__name__}: {e}"[:300]
            return error_response(ApiError(500, f"internal error: {type(e).__name__}", type="server_error"))

    return route


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class RequestLog:
    """One stderr line per request, written when its response (a whole stream) has ended."""

    def __init__(self, app, log: Callable[[str], None]):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), 0
        scope["smollm3.log"] = ""

        async def send_logged(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            client = scope.get("client") or ("-", 0)
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            path = scope["path"] if len(scope["path"]) <= 80 else scope["path"][:77] + "..."
            self.log(f"{stamp} {client[0]} {scope['method']} {ascii(path)[1:-1]} {status or '-'} "
                     f"{(time.perf_counter() - t0) * 1e3:.0f}ms{scope['smollm3.log']}")


class Api:
    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine, self.config = engine, config
        self.worker = EngineWorker(engine, config.max_queue)
        self.created = int(time.time())

    # --- routes ---

    async def health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "waiting": self.worker.waiting})

    async def models(self, request: Request) -> JSONResponse:
        self.authorize(request)
        info = self.engine.info
        return JSONResponse({"object": "list", "data": [{
            "id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "smollm3",
            "meta": {"n_ctx": self.config.ctx_size, "backend": info.backend, "device": info.device,
                     "weight_type": info.weight_type},
        }]})

    async def chat_completions(self, request: Request):
        self.authorize(request)
        req = parse_chat(await self.read_json(request))
        self.check_model(req.model)
        try:
            prompt = await run_in_threadpool(chat_prompt, self.engine, req)
        except SmolLMError as e:  # the template refused the conversation (raise_exception)
            raise ApiError(400, str(e), param="messages", code="template_error") from None
        job = self.job(req, prompt.ids, tool_names=prompt.tool_names, thinking_first=prompt.thinking_first,
                       forced_text=prompt.forced_text, thinking_budget=req.thinking_budget)
        return await self.respond(request, req, job, ChatShape(self.config.model_id))

    async def completions(self, request: Request):
        self.authorize(request)
        req = parse_completion(await self.read_json(request))
        self.check_model(req.model)
        ids = await run_in_threadpool(self.engine.tokenizer.encode, req.prompt)
        job = self.job(req, ids, prompt_param="prompt", split_thinking=False)
        return await self.respond(request, req, job, CompletionShape(self.config.model_id))

    # --- request checks ---

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {key}".encode()):
            raise ApiError(401, "invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_json(self, request: Request) -> dict:
        limit = self.config.max_body_bytes
        too_large = ApiError(413, f"the body is over {limit} bytes", code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "the client left before sending the whole body", code="client_disconnected") from None
        return parse_json_body(b"".join(chunks))

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in (self.config.model_id, self.engine.info.checkpoint):
            raise ApiError(404, f"the model '{model[:100]}' does not exist: this server serves "
                                f"'{self.config.model_id}'", param="model", code="model_not_found")

    def job(self, req: CompletionRequest, ids: list[int], prompt_param: str = "messages", **kw) -> Job:
        ctx = self.config.ctx_size
        if len(ids) >= ctx:
            raise ApiError(400, f"the prompt is {len(ids)} tokens, the context is {ctx} tokens: "
                                f"this leaves no room for a reply", param=prompt_param, code="context_length_exceeded")
        asked = req.max_tokens or self.config.default_max_tokens
        max_tokens = min(asked, ctx - len(ids)) if asked else ctx - len(ids)
        given = {k: v for k, v in vars(req.sampling).items() if v is not None}
        sampling = replace(self.config.defaults, **given)
        return Job(ids, max_tokens, sampling, stop=req.stop, **kw)

    # --- responses ---

    async def respond(self, request: Request, req: CompletionRequest, job: Job, shape: "Shape"):
        try:
            ticket = self.worker.submit(job)
        except QueueFull:
            raise ApiError(429, f"the server is busy: {self.config.max_queue} requests are waiting",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        if req.stream:
            return EventSourceResponse(self.stream(request, ticket, shape, req.include_usage), sep="\n")
        watcher = asyncio.create_task(cancel_on_disconnect(request, ticket))
        try:
            events = []
            while True:
                kind, value = await ticket.next_event()
                if kind == "error":
                    request.scope["smollm3.log"] = f" generation failed: {value}"[:300]
                    raise ApiError(500, f"generation failed: {value}", type="server_error")
                if kind == "done":
                    note(request, value)
                    return JSONResponse(shape.whole(events, value))
                events.append((kind, value))
        finally:
            watcher.cancel()
            if ticket.cancelled:
                request.scope["smollm3.log"] = " client left"
            ticket.cancel()

    async def stream(self, request: Request, ticket: Ticket, shape: "Shape", include_usage: bool):
        request.scope["smollm3.log"] = " client left mid-stream"  # replaced when the reply ends
        try:
            yield shape.data(shape.first())
            while True:
                kind, value = await ticket.next_event()
                if kind == "error":
                    request.scope["smollm3.log"] = f" generation failed: {value}"[:300]
                    yield json.dumps(ApiError(500, f"generation failed: {value}", type="server_error").body())
                    break
                if kind == "done":
                    note(request, value)
                    yield shape.data(shape.last(value))
                    if include_usage:
                        yield shape.data(shape.usage(value))
                    yield "[DONE]"
                    break
                yield shape.data(shape.delta(kind, value))
        finally:  # also when the client left: the engine stops after this token
            ticket.cancel()


async def cancel_on_disconnect(request: Request, ticket: Ticket) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            ticket.cancel()
            return


def note(request: Request, outcome: Outcome) -> None:
    """What the request log line adds for a generation."""
    t = outcome.timings()
    request.scope["smollm3.log"] = (
        f" prompt={outcome.prompt_tokens} cached={outcome.cached_tokens} completion={outcome.completion_tokens}"
        f" prefill={t['prompt_per_second']:.1f}t/s decode={t['predicted_per_second']:.1f}t/s"
        f" finish={outcome.finish_reason}")


class Shape:
    """How events become an OpenAI response object or stream chunks."""

    object_name = ""
    chunk_name = ""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.tool_calls = 0

    def envelope(self, name: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model_id,
                "choices": choices, **extra}

    def data(self, chunk: dict) -> str:
        return json.dumps(chunk, ensure_ascii=False)

    def usage(self, outcome: Outcome) -> dict:
        return self.envelope(self.chunk_name, [], usage=outcome.usage())

    def finish(self, outcome: Outcome) -> str:
        return "stop" if outcome.finish_reason == "cancelled" else outcome.finish_reason


class ChatShape(Shape):
    prefix, object_name, chunk_name = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def whole(self, events: list, outcome: Outcome) -> dict:
        content = "".join(v for k, v in events if k == "content")
        reasoning = "".join(v for k, v in events if k == "reasoning")
        calls = [v.as_openai() for k, v in events if k == "tool_call"]
        message = {"role": "assistant", "content": content if content or not calls else None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish(outcome)}
        return self.envelope(self.object_name, [choice], usage=outcome.usage(), timings=outcome.timings())

    def first(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""})

    def delta(self, kind: str, value) -> dict:
        if kind == "tool_call":
            call: ToolCall = value
            self.tool_calls += 1
            return self._chunk({"tool_calls": [call.as_openai(index=self.tool_calls - 1)]})
        return self._chunk({"reasoning_content" if kind == "reasoning" else "content": value})

    def last(self, outcome: Outcome) -> dict:
        return self._chunk({}, self.finish(outcome), timings=outcome.timings())

    def _chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self.envelope(self.chunk_name, [choice], **extra)


class CompletionShape(Shape):
    prefix, object_name, chunk_name = "cmpl", "text_completion", "text_completion"

    def whole(self, events: list, outcome: Outcome) -> dict:
        text = "".join(v for k, v in events if k == "content")
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": self.finish(outcome)}
        return self.envelope(self.object_name, [choice], usage=outcome.usage(), timings=outcome.timings())

    def first(self) -> dict:
        return self._chunk("")

    def delta(self, kind: str, value) -> dict:
        return self._chunk(value)

    def last(self, outcome: Outcome) -> dict:
        return self._chunk("", self.finish(outcome), timings=outcome.timings())

    def _chunk(self, text: str, finish_reason: str | None = None, **extra) -> dict:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self.envelope(self.chunk_name, [choice], **extra)

