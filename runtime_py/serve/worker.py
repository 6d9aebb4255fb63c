"""The worker around one Orchestrator: one model, one KV cache, so one request runs at a time, on a thread of its
own; requests wait in the fair queue. Tokens go to the client through the job's buffer, so a slow reader never
stalls the model; a cancelled job (the client left) stops at its next token and frees the model."""

from __future__ import annotations

import itertools
import threading
import time

from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py.serve.metrics import Metrics
from elastilm.runtime_py.serve.queue import FairQueue, Job


class Service:
    """The worker, the queue and the metrics around one Orchestrator."""

    def __init__(
        self,
        orchestrator,
        model_id: str,
        queue: int = 16,
        max_tokens: int = 256,
        api_key: str | None = None,
        strict: bool = True,
    ):
        self.orch = orchestrator
        self.model_id = model_id
        self.queue = FairQueue(queue)
        self.max_tokens = max_tokens
        self.api_key = api_key
        self.strict = strict
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
            except Exception as e:  # noqa: BLE001  (one request's failure is reported to it, the worker goes on)
                job.put(e if isinstance(e, ElastiLMError) else ElastiLMError(f"{type(e).__name__}: {e}"))
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
