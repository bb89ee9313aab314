"""`smollm3 serve [model flags] [--host --port --api-key --ctx-size --max-queue]`.

The model and sampling flags are the CLI's own (the sampling flags become the defaults of
requests that leave a field out); the server adds where it listens and who it serves.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import uvicorn

from backends import SmolLMError, Tracer

from ..cli import UsageError, build_parser, check_flags, load_engine, one_line, sampling_from
from .app import ServerConfig, create_app

NOT_FOR_SERVE = ("prompt", "resume", "split_prompt", "tracing", "no_chat_template")


def build_serve_parser():
    p = build_parser()
    p.prog = "smollm3 serve"
    p.description = "Serve SmolLM3 (or SmolLM2) over an OpenAI-compatible HTTP API."
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    s.add_argument("--api-key", default=os.environ.get("SMOLLM3_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SMOLLM3_API_KEY; unset: no key)")
    s.add_argument("--ctx-size", type=int, help="most tokens of prompt plus reply (default: the model's context)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for the engine; more get 429 (default: 64)")
    return p


def check_serve_flags(args) -> None:
    check_flags(args)
    for name in NOT_FOR_SERVE:
        if getattr(args, name) not in (None, False):
            raise UsageError(f"--{name.replace('_', '-')} is not a server flag")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}")
    if args.ctx_size is not None and args.ctx_size < 2:
        raise UsageError(f"--ctx-size must be at least 2, got {args.ctx_size}")
    if args.max_queue < 1:
        raise UsageError(f"--max-queue must be at least 1, got {args.max_queue}")
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


def serve_main(argv: list[str]) -> int:
    parser = build_serve_parser()
    sock = None
    try:
        args = parser.parse_args(argv)
        check_serve_flags(args)
        defaults = sampling_from(args)
        sock = listen(args.host, args.port)
        engine, _ = load_engine(args, Tracer())
        context = engine.config.context_length
        if args.ctx_size is not None and args.ctx_size > context:
            raise UsageError(f"--ctx-size {args.ctx_size} is over the model's context of {context} tokens")
        info = engine.info
        model_id = Path(info.checkpoint).name.removesuffix(".gguf")
        config = ServerConfig(model_id=model_id, ctx_size=args.ctx_size or context, defaults=defaults,
                              api_key=args.api_key, max_queue=args.max_queue)
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
