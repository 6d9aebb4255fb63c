"""Requests waiting for the model: one FIFO per app, served round-robin, so an app that sends many requests
cannot starve the others; bounded in total and per app (each app may hold `share` of the places, so one app's
burst leaves the rest to the others; a refused request is answered 429)."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from elastilm.runtime_py.orchestrator import Request


@dataclass
class Job:
    app: str  # the app of the request's key (--app-keys), else the "user" field, else the client address
    request: Request
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # text pieces, then the Answer or an exception
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)

    def put(self, item) -> None:
        """From the worker thread to the request's event loop."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class FairQueue:
    """Per-app FIFOs served round-robin; bounded in total, and per app to ceil(share x capacity) places."""

    def __init__(self, capacity: int, share: float = 0.5):
        if capacity < 1 or not 0 < share <= 1:
            raise ValueError(f"a queue needs capacity >= 1 and 0 < share <= 1, got {capacity}, {share}")
        self.capacity = capacity
        self.per_app = max(1, math.ceil(share * capacity))
        self._apps: OrderedDict[str, deque] = OrderedDict()
        self._cond = threading.Condition()
        self._size = 0
        self._closed = False

    def __len__(self) -> int:
        return self._size

    def put(self, job) -> str | None:
        """None once queued, else why it is refused: the queue is full, or the app holds its share."""
        with self._cond:
            if self._size >= self.capacity:
                return f"the queue is full ({self.capacity} waiting)"
            if len(self._apps.get(job.app, ())) >= self.per_app:
                return f"this app already has {self.per_app} requests waiting, its share of the {self.capacity} places"
            self._apps.setdefault(job.app, deque()).append(job)
            self._size += 1
            self._cond.notify()
            return None

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
