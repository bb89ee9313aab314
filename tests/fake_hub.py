"""A Hugging Face Hub on 127.0.0.1 that speaks the download API huggingface_hub 2.4 uses.

Point huggingface_hub at it with HF_ENDPOINT (see `FakeHub.env`). It answers:

- HEAD/GET /{repo}/resolve/{revision}/{path}: ETag (sha256 for LFS-like files, the git blob
  id otherwise, as the Hub does), X-Repo-Commit, Content-Length, Accept-Ranges, and 206 with
  Content-Range for `Range: bytes=N-`; 404 with X-Error-Code EntryNotFound / RepoNotFound /
  RevisionNotFound like the Hub (hf_raise_for_status types its errors by that header).
- GET /api/models/{repo}[/revision/{revision}]: id, sha, siblings (model_info, repo_info).
- GET /api/models/{repo}/tree/{revision}: the file list with oid, size, lfs (list_repo_tree,
  snapshot_download).

Faults on demand, per file name: `fail(name, 500)` answers an error status, `drop(name,
after=N)` sends the headers and N bytes of the body then closes the connection, `throttle(name,
bytes_per_s)` streams slowly. Every request is logged (`requests`). The server stops by itself
after `lifetime_s` so a test that forgets it cannot hang the suite.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")  # served like LFS/Xet files: the ETag is the sha256


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class Fault:
    status: int | None = None  # answer this status instead of the file
    drop_after: int | None = None  # close the connection after this many body bytes
    bytes_per_s: float | None = None  # stream the body at this rate
    times: int | None = None  # how many GETs it applies to (None: until cleared)
    methods: tuple[str, ...] = ("GET",)


@dataclass
class RepoFiles:
    files: dict[str, bytes]
    sha: str = field(init=False)

    def __post_init__(self):
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        self.sha = h.hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def etag_of(name: str, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_blob_id(data)


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes | Path]], lifetime_s: float = 300.0):
        self.repos = {
            repo: RepoFiles({name: (src.read_bytes() if isinstance(src, Path) else src) for name, src in files.items()})
            for repo, files in repos.items()
        }
        self.lifetime_s = lifetime_s
        self.requests: list[Request] = []
        self.faults: dict[str, list[Fault]] = {}
        self.bytes_sent: dict[str, int] = {}  # body bytes sent per file name, over all GETs
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        timer = threading.Timer(self.lifetime_s, self.stop)
        timer.daemon = True
        timer.start()
        self._timer = timer
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        self._timer.cancel()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "the fake hub is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def env(self, hf_home: Path) -> dict[str, str]:
        """Environment for a process that must talk to this hub only, with its cache under hf_home."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(hf_home / "hub"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_TOKEN": "",
            "NO_PROXY": "127.0.0.1,localhost",
        }

    # --- faults and observations -----------------------------------------------------------
    def fail(self, name: str, status: int, times: int | None = None, methods=("GET", "HEAD")) -> None:
        self._add(name, Fault(status=status, times=times, methods=tuple(methods)))

    def drop(self, name: str, after: int, times: int | None = 1) -> None:
        self._add(name, Fault(drop_after=after, times=times))

    def throttle(self, name: str, bytes_per_s: float) -> None:
        self._add(name, Fault(bytes_per_s=bytes_per_s))

    def clear(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self.faults.clear()
            else:
                self.faults.pop(name, None)

    def _add(self, name: str, fault: Fault) -> None:
        """Faults of a file apply in the order they were added, each for its `times` requests."""
        with self._lock:
            self.faults.setdefault(name, []).append(fault)

    def _take_fault(self, name: str, method: str) -> Fault | None:
        with self._lock:
            queue = self.faults.get(name, [])
            fault = next((f for f in queue if method in f.methods), None)
            if fault is not None and fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    queue.remove(fault)
            return fault

    def requests_for(self, name: str, method: str | None = None) -> list[Request]:
        return [r for r in list(self.requests) if r.path.endswith("/" + name) and method in (None, r.method)]

    def sha(self, repo: str) -> str:
        return self.repos[repo].sha

    def etag(self, repo: str, name: str) -> str:
        return etag_of(name, self.repos[repo].files[name])


_RESOLVE = re.compile(r"^/(?:models/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(
    r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+)|/tree/(?P<tree>[^/]+)(?P<sub>/.*)?)?$"
)


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the test reads hub.requests instead
        pass

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    # --- routing ---------------------------------------------------------------------------
    def _route(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append(Request(method, path, self.headers.get("Range")))
        if m := _RESOLVE.match(path):
            return self._resolve(method, m["repo"], m["rev"], m["path"])
        if m := _API.match(path):
            return self._api(method, m["repo"], m["rev"] or m["tree"] or "main", tree=m["tree"] is not None)
        self._error(404, "not a Hub route")

    def _repo(self, repo: str, rev: str) -> RepoFiles | None:
        files = self.hub.repos.get(repo)
        if files is None:
            self._error(404, "Repository not found", code="RepoNotFound")
            return None
        if rev not in ("main", files.sha):
            self._error(404, "Revision not found", code="RevisionNotFound")
            return None
        return files

    def _resolve(self, method: str, repo: str, rev: str, name: str) -> None:
        files = self._repo(repo, rev)
        if files is None:
            return
        if name not in files.files:
            return self._error(404, "Entry not found", code="EntryNotFound", commit=files.sha)
        fault = self.hub._take_fault(name, method)
        if fault is not None and fault.status is not None:
            return self._error(fault.status, "injected failure", commit=files.sha)
        data = files.files[name]
        start = 0
        status = 200
        headers = {
            "ETag": f'"{etag_of(name, data)}"',
            "X-Repo-Commit": files.sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if method == "GET" and (rng := self.headers.get("Range")):
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            if m is None or int(m[1]) >= len(data):
                return self._error(416, "Range not satisfiable", extra={"Content-Range": f"bytes */{len(data)}"})
            start, status = int(m[1]), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method == "HEAD":
            return
        self._send_body(name, body, fault)

    def _send_body(self, name: str, body: bytes, fault: Fault | None) -> None:
        limit = len(body) if fault is None or fault.drop_after is None else min(fault.drop_after, len(body))
        chunk = 64 * 1024
        rate = fault.bytes_per_s if fault is not None else None
        if rate:
            chunk = max(1024, int(rate / 20))
        sent = 0
        try:
            while sent < limit:
                piece = body[sent : min(sent + chunk, limit)]
                self.wfile.write(piece)
                self.wfile.flush()
                sent += len(piece)
                with self.hub._lock:
                    self.hub.bytes_sent[name] = self.hub.bytes_sent.get(name, 0) + len(piece)
                if rate:
                    time.sleep(len(piece) / rate)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if limit < len(body):  # the dropped connection: the client sees a body shorter than promised
            self.close_connection = True

    def _api(self, method: str, repo: str, rev: str, tree: bool) -> None:
        files = self._repo(repo, rev)
        if files is None:
            return
        if tree:
            listing = []
            for name, data in sorted(files.files.items()):
                entry = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": etag_of(name, data), "size": len(data), "pointerSize": 134}
                listing.append(entry)
            return self._json(listing, files.sha)
        info = {
            "id": repo,
            "modelId": repo,
            "sha": files.sha,
            "private": False,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": [{"rfilename": name} for name in sorted(files.files)],
        }
        self._json(info, files.sha)

    # --- responses -------------------------------------------------------------------------
    def _json(self, payload, commit: str) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Repo-Commit", commit)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None, commit: str | None = None, extra=None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Error-Message", message)
        if code:
            self.send_header("X-Error-Code", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


_TINY = Path(__file__).parent / "fixtures" / "tiny-smollm3"
GGUF_REPO, GGUF_NAME = "unsloth/SmolLM3-3B-GGUF", "SmolLM3-3B-Q4_K_M.gguf"
FULL_REPO = "HuggingFaceTB/SmolLM3-3B"
PICKLES = ("pytorch_model.bin", "onnx/model.onnx")  # decoys a safetensors download must never fetch


def smollm3_repos() -> dict[str, dict[str, bytes | Path]]:
    """The tiny SmolLM3 under the names `--model 3b` resolves to: a GGUF repo and a safetensors repo."""
    return {
        GGUF_REPO: {
            GGUF_NAME: _TINY / "tiny-smollm3-Q4_K_M.gguf",
            "SmolLM3-3B-Q8_0.gguf": _TINY / "tiny-smollm3-Q8_0.gguf",
            "README.md": b"# tiny SmolLM3 GGUF\n",
        },
        FULL_REPO: {
            **{p.name: p for p in sorted((_TINY / "hf").iterdir())},
            "README.md": b"# tiny SmolLM3\n",
            "pytorch_model.bin": b"\x80\x04 not to be unpickled",
            "onnx/model.onnx": b"onnx decoy",
        },
    }


def point_huggingface_hub_at(hub: FakeHub, hf_home: Path, monkeypatch, offline: bool = False) -> dict[str, str]:
    """Send this process's huggingface_hub (and subprocesses, through the environment) to `hub`.

    huggingface_hub reads its settings into `constants` once, at import: they are patched too.
    """
    from huggingface_hub import constants

    env = hub.env(hf_home)
    env["HF_HUB_OFFLINE"] = "1" if offline else "0"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return env
