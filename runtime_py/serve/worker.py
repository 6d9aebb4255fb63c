"""The worker around one Orchestrator: one model, one KV cache, so one request runs at a time, on a thread of its
own; requests wait in the fair queue. Tokens go to the client through the job's buffer, so a slow reader never
stalls the model; a cancelled job (the client left) stops at its next token and frees the model."""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid

from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py.orchestrator import InvalidRequest
from elastilm.runtime_py.serve.metrics import Metrics
from elastilm.runtime_py.serve.queue import FairQueue, Job

LOG = logging.getLogger("elastilm.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class InternalError(ElastiLMError):
    """What a client sees of a failure inside the server: an id to quote; the details are in the server's log."""

    def __init__(self):
        self.error_id = uuid.uuid4().hex[:12]
        super().__init__(f"internal error {self.error_id}; the server's log has the details")


class Service:
    """The worker, the queue and the metrics around one Orchestrator, and the limits of what a request may hold.

    max_body: bytes of a request body (413 beyond, before parsing); max_chars: characters of all text in a request
    (prompt, messages, context, options), checked before anything is tokenized; hosts: the Host headers accepted
    (None: any; a server bound to loopback accepts only loopback names, against DNS rebinding)."""

    def __init__(
        self,
        orchestrator,
        model_id: str,
        queue: int = 16,
        max_tokens: int = 256,
        api_key: str | None = None,
        strict: bool = True,
        max_body: int = 1 << 20,
        max_chars: int = 64_000,
        hosts: tuple[str, ...] | None = None,
    ):
        self.orch = orchestrator
        self.model_id = model_id
        self.queue = FairQueue(queue)
        self.max_tokens = max_tokens
        self.api_key = api_key
        self.strict = strict
        self.max_body, self.max_chars, self.hosts = max_body, max_chars, hosts
        self.metrics = Metrics()
        self.mean_seconds = 1.0  # running mean service time, for Retry-After
        self.busy = False
        self._ids = itertools.count(1)
        self._worker = threading.Thread(target=self._work, name="elastilm-worker", daemon=True)
        self._worker.start()

    def close(self) -> None:
        self.queue.close()
        self._worker.join(timeout=30)

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.metrics.queue.set(len(self.queue))
            if job.cancelled.is_set():
                continue
            self.busy = True
            start = time.perf_counter()
            try:
                run = self.orch.answer(job.request, stream=True)
                for item in run:
                    if job.cancelled.is_set():
                        run.close()  # the client left: stop generating, free the model
                        break
                    job.put(item)
            except InvalidRequest as e:  # the request's own fault: its reason goes back to the client
                job.put(e)
            except Exception:  # noqa: BLE001  (one request's failure is reported to it, the worker goes on)
                error = InternalError()
                LOG.exception("request failed (error %s)", error.error_id)
                job.put(error)
            finally:
                self.busy = False
                self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.perf_counter() - start)

    def retry_after(self) -> int:
        return max(1, round((len(self.queue) + 1) * self.mean_seconds))

    def submit(self, job: Job) -> bool:
        ok = self.queue.put(job)
        self.metrics.queue.set(len(self.queue))
        return ok

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        self.queue.remove(job)
        self.metrics.queue.set(len(self.queue))

    def next_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"
