"""`elastilm serve`: an OpenAI-compatible HTTP service over one elastic model, with a latency objective per request.

protocol.py  request and response bodies (OpenAI's, plus the SLO extension)
queue.py     the fair per-app queue of jobs
metrics.py   Prometheus metrics
worker.py    the thread that runs one request at a time on the Orchestrator
app.py       the HTTP routes
"""

from __future__ import annotations

import signal
from typing import Any

from elastilm.runtime_py.device import LOOPBACK
from elastilm.runtime_py.serve.app import create_app
from elastilm.runtime_py.serve.worker import Service

__all__ = ["Service", "create_app", "serve"]


UNHEALTHY_EXIT = 70  # the exit status when the worker died or is stuck (EX_SOFTWARE): for a supervisor to restart


def _exit_unhealthy(reason: str) -> None:
    """Give waiting clients their 503 (they poll every 0.5 s), then leave with UNHEALTHY_EXIT."""
    import os
    import sys
    import time

    time.sleep(2)
    print(
        f"elastilm: error: the service is unhealthy ({reason}); exiting with status {UNHEALTHY_EXIT}", file=sys.stderr
    )
    os._exit(UNHEALTHY_EXIT)


def serve(orch, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Run the service on an Orchestrator until interrupted (uvicorn). SIGTERM or Ctrl-C: stop accepting, let the
    requests in flight finish for up to 30 s, exit 0. A dead or stuck worker: exit UNHEALTHY_EXIT."""
    import uvicorn

    hosts = LOOPBACK if host in LOOPBACK else None  # bound to loopback: loopback names only (DNS rebinding)
    service = Service(orch, orch.engine.manifest["model"], hosts=hosts, on_unhealthy=_exit_unhealthy, **options)
    # uvicorn shuts down gracefully on these, then raises the signal again under the handler it found: a no-op
    # one here, so that a graceful stop ends with status 0 rather than death by the signal
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="info", timeout_graceful_shutdown=30)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        service.close()
        orch.close()
