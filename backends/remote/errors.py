"""Typed errors of the remote engine, each with a one-line message the CLI/TUI can show as is."""

from __future__ import annotations

import json

from ..errors import SmolLMError

MESSAGE_CHARS = 200  # a server's error text can be a whole HTML page or a stack trace


class RemoteError(SmolLMError):
    """A remote (OpenAI-compatible) server could not give an answer."""


class RemoteUnreachable(RemoteError):
    """No connection: DNS, refused, or no answer to the connection attempt."""


class RemoteTLSError(RemoteError):
    """The TLS handshake failed (certificate, or plain HTTP on an https:// URL)."""


class RemoteAuthError(RemoteError):
    """401 / 403: the API key is missing or refused."""


class RemoteModelNotFound(RemoteError):
    """404 on a chat request: the server does not serve the model asked for."""


class RemoteRateLimited(RemoteError):
    """429: too many requests."""


class RemoteServerError(RemoteError):
    """5xx, or an error the server reported inside a stream."""


class RemoteRequestError(RemoteError):
    """Another 4xx: the server refused the request (a prompt over its context, a bad value)."""


class RemoteTimeout(RemoteError):
    """The server accepted the request but sent nothing within the read timeout."""


class RemoteStreamCut(RemoteError):
    """The answer stopped mid-stream; the text yielded before it stays with the caller."""


class NotOpenAICompatible(RemoteError):
    """The endpoint does not speak the OpenAI (or Ollama) API."""


def one_line(text: str, limit: int = MESSAGE_CHARS) -> str:
    """Server text made safe for one terminal line: printable, single-spaced, bounded."""
    text = " ".join(text.split())
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def server_message(body: bytes | str) -> str:
    """The error text of a response body in any of the shapes servers use.

    OpenAI / llama-server / SGLang: {"error": {"message": ...}}; older vLLM: {"object": "error",
    "message": ...}; Ollama and mlx_lm.server: {"error": "..."}; FastAPI: {"detail": ...}.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return one_line(text)
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return one_line(str(error["message"]))
        if isinstance(error, str) and error:
            return one_line(error)
        for key in ("message", "detail"):
            if data.get(key):
                return one_line(str(data[key]))
    return one_line(text)


def status_error(status: int, body: bytes, host: str, model: str, retry_after: str | None = None) -> RemoteError:
    """The typed error for an HTTP error status of a chat request."""
    message = server_message(body)
    detail = f": {message}" if message else ""
    if status in (401, 403):
        return RemoteAuthError(f"{host} refused the request ({status}){detail} (set --api-key or OPENAI_API_KEY)")
    if status == 404:
        return RemoteModelNotFound(f"{host} does not serve the model '{model}' (404){detail}")
    if status == 429:
        wait = f"; retry after {retry_after} s" if retry_after else ""
        return RemoteRateLimited(f"{host} is rate-limiting requests (429){detail}{wait}")
    if status >= 500:
        return RemoteServerError(f"{host} failed with a server error ({status}){detail}")
    return RemoteRequestError(f"{host} rejected the request ({status}){detail}")
