"""`smollm3 serve [model flags] [sampling flags] [--host --port --api-key --max-queue]`.

The model flags (with --ctx-size) and the sampling flags are the CLI's own; the sampling flags
become the defaults of requests that leave a field out. The server adds where it listens and
who it serves.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import uvicorn

from backends import Engine, SmolLMError, settings
from backends.tracing import NullTracer

from ..cli import (Parser, UsageError, add_model_arguments, add_sampling_arguments, check_model_flags, load_engine,
                   number, one_line, sampling_from)
from .app import ServerConfig, create_app


def build_serve_parser() -> Parser:
    p = Parser(prog="smollm3 serve", description="Serve SmolLM3 (or SmolLM2) over an OpenAI-compatible HTTP API.")
    add_model_arguments(p)
    add_sampling_arguments(p.add_argument_group("defaults for requests that leave a field out"))
    p.set_defaults(seed=None)  # a request without a seed gets a fresh one, unless --seed is given
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=number(int, minimum=0, maximum=65535), default=8080,
                   help="port to listen on (default: 8080; 0: any free port)")
    s.add_argument("--api-key", default=settings.api_key(),
                   help="require 'Authorization: Bearer KEY' (default: $SMOLLM3_API_KEY; unset: no key)")
    s.add_argument("--max-queue", type=number(int, minimum=1), default=64,
                   help="requests that may wait for the engine; more get 429 (default: 64)")
    return p


def check_serve_flags(args) -> None:
    check_model_flags(args)
    if args.api_key is not None and not args.api_key:
        raise UsageError("--api-key is empty")


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading the model: a taken port is one line at once, not after the load."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn, with our one ready line once it accepts connections."""

    def __init__(self, config: uvicorn.Config, ready_line: str):
        super().__init__(config)
        self.ready_line = ready_line

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started:
            print(self.ready_line, file=sys.stderr, flush=True)


def load_served_engine(args) -> Engine:
    """The engine the model flags describe, with its context from --ctx-size, else what fits in
    memory. It traces nothing: a Tracer keeps every span (about 600 bytes each, two per token),
    which over a server's life is resident memory without end: 3.6 MiB per 100 requests of 32
    tokens (bench/rss_server_path.py)."""
    engine, _ = load_engine(args, NullTracer())
    return engine


def serve_main(argv: list[str]) -> int:
    parser = build_serve_parser()
    sock = None
    try:
        args = parser.parse_args(argv)
        check_serve_flags(args)
        defaults = sampling_from(args)
        sock = listen(args.host, args.port)
        engine = load_served_engine(args)
        info = engine.info
        model_id = Path(info.checkpoint).name.removesuffix(".gguf")
        config = ServerConfig(model_id=model_id, ctx_size=engine.config.context_length, defaults=defaults,
                              default_max_tokens=args.sample_len, api_key=args.api_key, max_queue=args.max_queue)
        app = create_app(engine, config)
    except SmolLMError as e:
        if sock is not None:
            sock.close()
        print(f"smollm3: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    ready = (f"smollm3: serving {model_id} on http://{shown}:{port}/v1 ({info.backend} {info.device} "
             f"{info.dtype}, {info.weight_type}, ctx {config.ctx_size}{', API key required' if args.api_key else ''})")
    uv = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2)
    Server(uv, ready).run(sockets=[sock])
    return 0
