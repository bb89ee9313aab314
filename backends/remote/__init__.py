"""A remote engine: chat with a model served over HTTP (OpenAI-compatible servers, Ollama)."""

from .dialects import DIALECTS
from .errors import (
    NotOpenAICompatible,
    RemoteAuthError,
    RemoteError,
    RemoteModelNotFound,
    RemoteRateLimited,
    RemoteRequestError,
    RemoteServerError,
    RemoteStreamCut,
    RemoteTimeout,
    RemoteTLSError,
    RemoteUnreachable,
)

__all__ = [
    "DIALECTS",
    "NotOpenAICompatible",
    "RemoteAuthError",
    "RemoteEngine",
    "RemoteError",
    "RemoteModelNotFound",
    "RemoteRateLimited",
    "RemoteRequestError",
    "RemoteServerError",
    "RemoteStats",
    "RemoteStreamCut",
    "RemoteTimeout",
    "RemoteTLSError",
    "RemoteUnreachable",
]


def __getattr__(name: str):
    # The engine needs httpx, whose import brings rich, click and pygments (0.16 s, 6 MiB):
    # loaded when a remote chat asks for it, not on every local run that imports DIALECTS.
    if name in ("RemoteEngine", "RemoteStats"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
