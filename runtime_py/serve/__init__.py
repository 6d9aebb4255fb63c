"""`elastilm serve`: an OpenAI-compatible HTTP service over one elastic model, with a latency objective per request.

protocol.py  request and response bodies (OpenAI's, plus the SLO extension)
queue.py     the fair per-app queue of jobs
metrics.py   Prometheus metrics
worker.py    the thread that runs one request at a time on the Orchestrator
app.py       the HTTP routes
"""

from __future__ import annotations

from typing import Any

from elastilm.runtime_py.serve.app import create_app
from elastilm.runtime_py.serve.worker import LOOPBACK, Service

__all__ = ["Service", "create_app", "serve"]


def serve(orch, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Run the service on an Orchestrator until interrupted (uvicorn)."""
    import uvicorn

    hosts = LOOPBACK if host in LOOPBACK else None  # bound to loopback: loopback names only (DNS rebinding)
    service = Service(orch, orch.engine.manifest["model"], hosts=hosts, **options)
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level="info")
    finally:
        service.close()
        orch.close()
