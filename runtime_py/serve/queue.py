"""Requests waiting for the model: one FIFO per app, served round-robin, so an app that sends many requests
cannot starve the others; bounded in total (a full queue is answered 429)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from elastilm.runtime_py.orchestrator import Request


@dataclass
class Job:
    app: str  # the "user" field, else the API key, else the client address
    request: Request
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # text pieces, then the Answer or an exception
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    def put(self, item) -> None:
        """From the worker thread to the request's event loop."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class FairQueue:
    """Per-app FIFOs served round-robin; bounded in total."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._apps: OrderedDict[str, deque] = OrderedDict()
        self._cond = threading.Condition()
        self._size = 0
        self._closed = False

    def __len__(self) -> int:
        return self._size

    def put(self, job) -> bool:
        """False when full."""
        with self._cond:
            if self._size >= self.capacity:
                return False
            self._apps.setdefault(job.app, deque()).append(job)
            self._size += 1
            self._cond.notify()
            return True

    def get(self, timeout: float | None = None):
        """The next job: the head of the app served longest ago (None on timeout or close)."""
        with self._cond:
            while not self._size and not self._closed:
                if not self._cond.wait(timeout):
                    return None
            if self._closed:
                return None
            app, jobs = next(iter(self._apps.items()))
            job = jobs.popleft()
            self._size -= 1
            del self._apps[app]
            if jobs:
                self._apps[app] = jobs  # to the back of the round
            return job

    def remove(self, job) -> bool:
        with self._cond:
            jobs = self._apps.get(job.app)
            if jobs is None or job not in jobs:
                return False
            jobs.remove(job)
            self._size -= 1
            if not jobs:
                del self._apps[job.app]
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
