"""The engine's own thread: jobs run one at a time, in arrival order, from a bounded queue.

The engine is blocking (torch) and holds one KV cache, so a single thread owns it; the event
loop only enqueues jobs and awaits their events, which come back through a Ticket.
"""

from __future__ import annotations

import asyncio
import queue
import threading

from backends import Engine

from .reply import Event, Job, Outcome, run_job


class QueueFull(Exception):
    pass


class Ticket:
    """One request's side of a job: its events arrive on the event loop, cancel() reaches the engine."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop):
        self.job = job
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    def emit(self, event: Event) -> None:  # called on the engine's thread
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is going down
            self._cancelled.set()

    async def next_event(self) -> Event:
        return await self._events.get()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class EngineWorker:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine = engine
        self._jobs: queue.Queue[Ticket] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="smollm3-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: Job) -> Ticket:
        ticket = Ticket(job, asyncio.get_running_loop())
        try:
            self._jobs.put_nowait(ticket)
        except queue.Full:
            raise QueueFull from None
        return ticket

    def _run(self) -> None:
        while True:
            ticket = self._jobs.get()
            if ticket.cancelled:  # its client left while it waited
                continue
            try:
                outcome = run_job(self.engine, ticket.job, ticket.emit, lambda: ticket.cancelled)
            except Exception as e:  # a bug or a backend failure: this request fails, the server stays up
                ticket.emit(("error", f"{type(e).__name__}: {e}"))
                self.engine.cached_ids = []  # the cache may hold a half-written step
                continue
            ticket.emit(("done", outcome))


__all__ = ["EngineWorker", "QueueFull", "Ticket", "Outcome"]
