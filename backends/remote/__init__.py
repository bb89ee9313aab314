"""A remote engine: chat with a model served over HTTP (OpenAI-compatible servers, Ollama)."""

from .dialects import DIALECTS
from .engine import RemoteEngine, RemoteStats
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
