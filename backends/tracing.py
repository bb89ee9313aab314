"""A minimal Chrome trace (chrome://tracing, Perfetto) of load, prefill and each decode step."""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path


class Tracer:
    def __init__(self):
        self.events: list[dict] = []
        self._t0 = time.perf_counter()

    @contextmanager
    def span(self, name: str, **args):
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self.events.append(
                {
                    "name": name,
                    "ph": "X",
                    "ts": (start - self._t0) * 1e6,
                    "dur": (end - start) * 1e6,
                    "pid": os.getpid(),
                    "tid": threading.get_ident(),
                    "args": args,
                }
            )

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"traceEvents": self.events, "displayTimeUnit": "ms"}))


class NullTracer(Tracer):
    @contextmanager
    def span(self, name: str, **args):
        yield
