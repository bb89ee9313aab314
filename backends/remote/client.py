"""HTTP for the remote engine: one httpx client, JSON GETs, and streamed POSTs as JSON events.

Transport failures become typed errors here. Connection setup is retried by httpx's transport
(it retries connect errors only); a request that reached the server is never sent twice, so a
half-streamed answer is never restarted behind the caller's back.
"""

from __future__ import annotations

import json
import socket
import ssl
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
from httpx_sse import EventSource, SSEError

from .errors import (
    NotOpenAICompatible,
    RemoteError,
    RemoteStreamCut,
    RemoteTimeout,
    RemoteTLSError,
    RemoteUnreachable,
    server_message,
    status_error,
)

CONNECT_TIMEOUT_S = 10.0
# Time allowed between two bytes of an answer: a long prompt's prefill on a busy server comes first.
READ_TIMEOUT_S = 120.0
CONNECT_RETRIES = 3  # httpx waits 0, 0.5, 1 s between them: a refused port fails within 2 s


def split_endpoint(endpoint: str) -> tuple[str, str]:
    """(root, api): `http://h:8000/v1` -> (`http://h:8000`, `http://h:8000/v1`).

    The OpenAI API lives under `/v1`; an endpoint given without it (as Ollama users write
    `http://h:11434`) gets it added. Ollama's native API lives at the root.
    """
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RemoteError(f"--endpoint must be an http:// or https:// URL, got '{endpoint}'")
    path = parts.path.rstrip("/")
    root_path = path[: -len("/v1")] if path.endswith("/v1") else path
    root = f"{parts.scheme}://{parts.netloc}{root_path}"
    return root, root + "/v1"


def host_of(endpoint: str) -> str:
    return urlsplit(endpoint).netloc


def _is_tls_failure(exc: BaseException) -> bool:
    seen = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "SSL" in str(exc) or "CERTIFICATE" in str(exc)


def transport_error(exc: httpx.TransportError, host: str, started: bool, timeout: httpx.Timeout) -> RemoteError:
    """The typed error for a failure below HTTP; `started` when part of an answer has arrived."""
    if isinstance(exc, httpx.ConnectTimeout):
        return RemoteUnreachable(f"cannot reach {host}: no answer to the connection within {timeout.connect:g} s")
    if isinstance(exc, httpx.ConnectError):
        if _is_tls_failure(exc):
            return RemoteTLSError(f"TLS with {host} failed: {exc}")
        reason = str(exc) or type(exc).__name__
        return RemoteUnreachable(f"cannot reach {host}: {reason}")
    if isinstance(exc, httpx.ReadTimeout):
        if started:
            return RemoteStreamCut(f"{host} stopped sending mid-answer (nothing for {timeout.read:g} s)")
        return RemoteTimeout(f"{host} sent no answer within {timeout.read:g} s")
    if started:
        return RemoteStreamCut(f"the connection to {host} broke mid-answer ({type(exc).__name__}: {exc})")
    return RemoteUnreachable(f"the connection to {host} failed ({type(exc).__name__}: {exc})")


class RemoteClient:
    def __init__(
        self,
        endpoint: str,
        api_key: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        read_timeout: float = READ_TIMEOUT_S,
        verify: bool | str = True,
    ):
        self.root, self.api = split_endpoint(endpoint)
        self.host = host_of(self.api)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self.http = httpx.Client(
            headers=headers,
            timeout=self.timeout,
            transport=httpx.HTTPTransport(retries=CONNECT_RETRIES, verify=verify),
        )
        self.interrupted = False  # set by interrupt(); the caller clears it before a request
        self._response: httpx.Response | None = None  # the stream being read

    def close(self) -> None:
        self.http.close()

    def interrupt(self) -> None:
        """End the stream being read, from any thread.

        Closing a socket does not wake a read blocked on it in another thread (on Linux), so
        this shuts the socket down instead: the blocked read returns at once, even while the
        server is still reading a long prompt and has sent nothing.
        """
        self.interrupted = True
        response = self._response
        network = response.extensions.get("network_stream") if response is not None else None
        sock = network.get_extra_info("socket") if network is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def request_json(self, method: str, url: str, body: dict | None = None) -> tuple[int, Any, bytes]:
        """(status, the body parsed, or None when it is not JSON, the body's bytes)."""
        try:
            response = self.http.request(method, url, json=body)
        except httpx.TransportError as exc:
            raise transport_error(exc, self.host, False, self.timeout) from exc
        try:
            return response.status_code, response.json(), response.content
        except ValueError:
            return response.status_code, None, response.content

    @contextmanager
    def stream(self, url: str, body: dict, model: str, sse: bool) -> Iterator[Iterator[dict]]:
        """POST `body` and give its answer as parsed JSON events (SSE `data:` or NDJSON lines).

        Leaving the `with` block closes the connection, which is how a server learns to stop.
        """
        started = False
        try:
            with self.http.stream("POST", url, json=body) as response:
                self._response = response
                if self.interrupted:  # interrupted while connecting
                    self.interrupt()
                if response.status_code >= 400:
                    raise status_error(
                        response.status_code, response.read(), self.host, model, response.headers.get("retry-after")
                    )

                def events() -> Iterator[dict]:
                    nonlocal started
                    lines = self._sse_data(response) if sse else response.iter_lines()
                    for line in lines:
                        if not line.strip():
                            continue
                        started = True
                        if line.strip() == "[DONE]":
                            return
                        try:
                            event = json.loads(line)
                        except ValueError:
                            raise NotOpenAICompatible(
                                f"{self.host} sent a stream that is not JSON events: {server_message(line)}"
                            ) from None
                        if isinstance(event, dict):
                            yield event

                yield events()
        except httpx.TransportError as exc:
            raise transport_error(exc, self.host, started, self.timeout) from exc
        finally:
            self._response = None

    def _sse_data(self, response: httpx.Response) -> Iterator[str]:
        try:
            for event in EventSource(response).iter_sse():
                yield event.data
        except SSEError:
            raise NotOpenAICompatible(
                f"{self.host} answered a streaming request with "
                f"'{response.headers.get('content-type', 'no content type')}', not server-sent events"
            ) from None
