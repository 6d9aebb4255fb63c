"""The worker around one Orchestrator: one model, one KV cache, so one request runs at a time, on a thread of its
own; requests wait in the fair queue. Tokens go to the client through the job's buffer, so a slow reader never
stalls the model; a cancelled job (the client left) stops at its next token and frees the model."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
import uuid
from pathlib import Path

from elastilm.formats.errors import ElastiLMError
from elastilm.runtime_py.orchestrator import InvalidRequest
from elastilm.runtime_py.serve.metrics import Metrics
from elastilm.runtime_py.serve.queue import FairQueue, Job
from elastilm.runtime_py.session import DeviceLost

LOG = logging.getLogger("elastilm.serve")


class InternalError(ElastiLMError):
    """What a client sees of a failure inside the server: an id to quote; the details are in the server's log."""

    def __init__(self):
        self.error_id = uuid.uuid4().hex[:12]
        super().__init__(f"internal error {self.error_id}; the server's log has the details")


def check_app_keys(keys) -> None:
    """{app name: key}, each key a non-empty string of its own."""
    if not isinstance(keys, dict) or not keys:
        raise ElastiLMError('the apps\' keys must be a JSON object of app names to keys, e.g. {"mail": "..."}')
    if not all(isinstance(a, str) and isinstance(k, str) and k for a, k in keys.items()):
        raise ElastiLMError("the apps' keys must be non-empty strings, one per app")
    if len(set(keys.values())) != len(keys):
        raise ElastiLMError("two apps share one key: each app needs its own")


def read_app_keys(path: Path) -> dict[str, str]:
    """The apps' keys from a JSON file (`serve --app-keys`), checked."""
    try:
        keys = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ElastiLMError(f"{path}: not a readable JSON file ({err})") from None
    try:
        check_app_keys(keys)
    except ElastiLMError as err:
        raise ElastiLMError(f"{path}: {err}") from None
    return keys


class Unavailable(ElastiLMError):
    """The service cannot answer: its worker died or is stuck, or the device is lost (503)."""


class Service:
    """The worker, the queue and the metrics around one Orchestrator, and the limits of what a request may hold.

    queue: requests that may wait, app_share: the share of them one app may hold. app_keys: {app: key}; a request
    must carry one of them (Authorization: Bearer KEY) and counts as that app, whatever its "user" field says;
    without them (a single `api_key` or none) the app is the request's "user" field or the client's address, as
    the client says (cooperating apps).

    max_body: bytes of a request body (413 beyond, before parsing); max_chars: characters of all text in a request
    (prompt, messages, context, options), checked before anything is tokenized; hosts: the Host headers accepted
    (None: any; a server bound to loopback accepts only loopback names, against DNS rebinding).

    step_deadline: seconds the worker may go without progress (a token, or the end of a request) before the service
    counts as stuck; a stuck or dead worker makes /health 503 and waiting requests 503, and `on_unhealthy(reason)`
    is called once (`serve` exits the process non-zero, for its supervisor to restart it: a thread stuck inside a
    device call cannot be stopped from outside)."""

    def __init__(
        self,
        orchestrator,
        model_id: str,
        queue: int = 16,
        max_tokens: int = 256,
        api_key: str | None = None,
        app_keys: dict[str, str] | None = None,
        app_share: float = 0.5,
        strict: bool = True,
        max_body: int = 1 << 20,
        max_chars: int = 64_000,
        hosts: tuple[str, ...] | None = None,
        step_deadline: float = 120.0,
        on_unhealthy=None,
    ):
        self.orch = orchestrator
        self.model_id = model_id
        if app_keys is not None:
            if api_key is not None:
                raise ElastiLMError("give either one API key or the apps' keys, not both")
            check_app_keys(app_keys)
        self.queue = FairQueue(queue, app_share)
        self.max_tokens = max_tokens
        self.api_key, self.app_keys = api_key, app_keys
        self.strict = strict
        self.max_body, self.max_chars, self.hosts = max_body, max_chars, hosts
        self.metrics = Metrics()
        self.mean_seconds = 1.0  # running mean service time, for Retry-After
        self.busy = False
        self.step_deadline, self.on_unhealthy = step_deadline, on_unhealthy
        self.progress = time.monotonic()  # the worker's last sign of life while busy
        self._ids = itertools.count(1)
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._work, name="elastilm-worker", daemon=True)
        self._worker.start()
        self._watchdog = threading.Thread(target=self._watch, name="elastilm-watchdog", daemon=True)
        self._watchdog.start()

    def close(self) -> None:
        self._closed.set()
        self.queue.close()
        self._worker.join(timeout=30)

    def problem(self) -> str | None:
        """Why the service cannot answer (the worker died, or is stuck in a step), or None."""
        if not self._worker.is_alive() and not self._closed.is_set():
            return "the worker has stopped"
        if self.busy and time.monotonic() - self.progress > self.step_deadline:
            return f"the worker has made no progress for more than {self.step_deadline:g} s"
        return None

    def _watch(self) -> None:
        while not self._closed.wait(min(1.0, self.step_deadline / 4)):
            reason = self.problem()
            if reason is not None:
                LOG.error("service unhealthy: %s", reason)
                if self.on_unhealthy is not None:
                    self.on_unhealthy(reason)
                return

    def _work(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.metrics.queue.set(len(self.queue))
            if job.cancelled.is_set():
                continue
            self.progress = time.monotonic()
            self.busy = True
            start = time.perf_counter()
            try:
                run = self.orch.answer(job.request, stream=True, cancelled=job.cancelled)
                for item in run:
                    self.progress = time.monotonic()
                    if job.cancelled.is_set():
                        run.close()  # the client left: stop generating, free the model
                        break
                    job.put(item)
            except InvalidRequest as e:  # the request's own fault: its reason goes back to the client
                job.put(e)
            except DeviceLost as e:  # stalled or gone past the reconnect time: the next request tries again
                LOG.error("request failed: %s", e)
                job.put(Unavailable(f"{e}; retry later"))
            except Exception:  # noqa: BLE001  (one request's failure is reported to it, the worker goes on)
                error = InternalError()
                LOG.exception("request failed (error %s)", error.error_id)
                job.put(error)
            finally:
                self.busy = False
                self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.perf_counter() - start)

    def retry_after(self) -> int:
        return max(1, round((len(self.queue) + 1) * self.mean_seconds))

    def submit(self, job: Job) -> str | None:
        """None once queued, else why it is refused."""
        refused = self.queue.put(job)
        self.metrics.queue.set(len(self.queue))
        return refused

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        self.queue.remove(job)
        self.metrics.queue.set(len(self.queue))

    def next_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"
